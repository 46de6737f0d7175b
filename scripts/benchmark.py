"""Training speed against the tutorial's own loop and the compute ceiling.

python scripts/benchmark.py [--quick] [--json FILE] [--device cpu|cuda]
"""

from alexnet_lit.benchmark import main

if __name__ == "__main__":
    main()
