"""Rank the training images whose labels are probably wrong: out-of-fold confident learning.

python scripts/find_label_issues.py --config configs/default.yaml --data.data_dir DATA [--folds 5]

Trains one model per fold (stratified, seeded) with the fit arguments given, scores the fold it
did not see, and ranks the likely label errors with cleanlab (pip install -e ".[audit]").
Writes label_issues.csv and label_issues.png into lightning_logs/version_N/.
"""

import sys

from alexnet_lit.training.audits import find_label_issues_main

if __name__ == "__main__":
    sys.exit(find_label_issues_main())
