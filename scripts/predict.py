"""Predict image files or folders with a checkpoint and write one CSV row per image.

python scripts/predict.py --ckpt CKPT PATH [PATH ...] [--out predictions.csv] [--top-k 3]
"""

import sys

from alexnet_lit.inference.predict import predict_main

if __name__ == "__main__":
    sys.exit(predict_main())
