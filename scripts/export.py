"""Export a checkpoint to ONNX, TorchScript or torch.export and check it against PyTorch.

python scripts/export.py --ckpt CKPT --format onnx|torchscript|torch_export --out FILE
"""

import sys

from alexnet_lit.inference.export import export_main

if __name__ == "__main__":
    sys.exit(export_main())
