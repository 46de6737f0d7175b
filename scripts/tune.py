"""Search hyperparameters with Optuna; each trial is an ordinary train.py fit.

python scripts/tune.py --config configs/default.yaml --search configs/search/recipe.yaml --trials 20
"""

import sys

from alexnet_lit.training.sweep import tune_main

if __name__ == "__main__":
    sys.exit(tune_main())
