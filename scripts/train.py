"""Train, validate, test or predict AlexNet on an ImageFolder.

python scripts/train.py fit --config configs/default.yaml [--data.data_dir DATASET]
"""

from alexnet_lit.training.cli import cli_main

if __name__ == "__main__":
    cli_main()
