"""Convert the tutorial's alexnet.pt (a state_dict) into a checkpoint this project can use.

python scripts/import_tutorial_weights.py alexnet.pt --classes husky shiba --out model.ckpt
"""

import sys

from alexnet_lit.inference.tutorial_weights import import_main

if __name__ == "__main__":
    sys.exit(import_main())
