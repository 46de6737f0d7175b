"""Train, validate, test or predict AlexNet on an ImageFolder.

python scripts/train.py fit --config configs/default.yaml [--data.data_dir DATASET]
"""

import gc


def main() -> None:
    gc.disable()  # no collections while the imports run: see freeze_imported_objects
    from alexnet_lit.cli import cli_main
    from alexnet_lit.memory import freeze_imported_objects

    freeze_imported_objects()
    cli_main()


if __name__ == "__main__":
    main()
