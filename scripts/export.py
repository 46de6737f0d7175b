"""Export a checkpoint to ONNX, TorchScript or torch.export and check it against PyTorch.

python scripts/export.py --ckpt CKPT --format onnx|torchscript|torch_export --out FILE
"""

import argparse
import sys

from alexnet_lit.errors import UserError
from alexnet_lit.export import FORMATS, TOLERANCE, export_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="a checkpoint from scripts/train.py")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="file to write (.onnx, .pt, .pt2)")
    args = parser.parse_args(argv)
    try:
        difference = export_checkpoint(args.ckpt, args.format, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}; max abs difference from PyTorch on random input (batch 1 and 3): "
        f"{difference:.3g} (limit {TOLERANCE})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
