"""Train each research recipe through the real CLI, one run at a time, and tabulate the results.

    python scripts/run_recipes.py                                # every recipe, seed 0
    python scripts/run_recipes.py --recipes default adamw --seeds 0 1 2
    python scripts/run_recipes.py --recipes default -- --trainer.max_epochs 1   # extra CLI args

See alexnet_lit/training/recipes.py.
"""

import sys

from alexnet_lit.training.recipes import recipes_main

if __name__ == "__main__":
    sys.exit(recipes_main())
