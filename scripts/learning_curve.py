"""Would more labelled data help? Train on nested subsets of train/ and plot best val/acc.

python scripts/learning_curve.py --config configs/default.yaml --data.data_dir DATA \
    --fractions 0.1 0.25 0.5 1.0 --seeds 0 1 2

Writes learning_curve.csv and learning_curve.png into lightning_logs/version_N/ and prints a
one-line reading of the curve.
"""

import sys

from alexnet_lit.training.audits import learning_curve_main

if __name__ == "__main__":
    sys.exit(learning_curve_main())
