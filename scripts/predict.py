"""Predict image files or folders with a checkpoint and write one CSV row per image.

python scripts/predict.py --ckpt CKPT PATH [PATH ...] [--out predictions.csv] [--top-k 3]
"""

import argparse
import sys

from alexnet_lit.data import default_num_workers
from alexnet_lit.errors import UserError
from alexnet_lit.inference import predict_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint from scripts/train.py")
    parser.add_argument("paths", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--out", default="predictions.csv", help="CSV file to write")
    parser.add_argument("--top-k", type=int, default=3, help="top classes listed per image")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers", type=int, default=default_num_workers(),
        help="image loading processes (default: the usable CPUs minus one, at most 16)",
    )  # fmt: skip
    parser.add_argument(
        "--no-calibration", action="store_true",
        help="raw softmax probabilities, not those scaled by the checkpoint's fitted temperature",
    )  # fmt: skip
    parser.add_argument(
        "--explain", metavar="DIR",
        help="also write a Grad-CAM overlay PNG per image (what the network looks at) into DIR",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        rows, failed = predict_files(
            args.ckpt, args.paths, args.out, args.top_k, args.device, args.batch_size,
            args.num_workers, calibrated=not args.no_calibration, explain_dir=args.explain,
        )  # fmt: skip
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    unreadable = f" ({failed} unreadable, see the error column)" if failed else ""
    print(f"wrote {rows} predictions to {args.out}{unreadable}")
    if args.explain:
        print(f"wrote Grad-CAM overlays to {args.explain}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
