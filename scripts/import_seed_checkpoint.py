"""Convert the tutorial's alexnet.pt (a state_dict) into a checkpoint this project can use.

python scripts/import_seed_checkpoint.py alexnet.pt --classes husky shiba --out model.ckpt
"""

import argparse
import sys

from alexnet_lit.errors import UserError
from alexnet_lit.seed_import import import_seed_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seed", help="the state_dict file saved by the tutorial's script")
    parser.add_argument(
        "--classes", nargs="+", required=True,
        help="class names in the tutorial's order (its ImageFolder's sorted folder names)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="checkpoint file to write (.ckpt)")
    args = parser.parse_args(argv)
    try:
        out = import_seed_checkpoint(args.seed, args.classes, args.out)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(args.classes)} classes: {', '.join(args.classes)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
