"""Training speed against the tutorial's own loop and the compute ceiling.

python scripts/benchmark.py [--quick] [--json FILE] [--device cpu|cuda]
"""

import gc


def main() -> None:
    # Started as scripts/train.py is (see there), so that the plain loop it runs as a contender
    # differs from train.py's fit by Lightning only.
    gc.disable()
    from alexnet_lit.benchmark import main as benchmark_main
    from alexnet_lit.memory import freeze_imported_objects

    freeze_imported_objects()
    benchmark_main()


if __name__ == "__main__":
    main()
