"""Export a checkpoint's AlexNet (ONNX, TorchScript, torch.export) and check it against PyTorch.
``scripts/export.py`` is its command line.
"""

import argparse
import json
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from alexnet_lit.checkpoints import CKPT_HELP, checkpoint_argument
from alexnet_lit.errors import InferenceError, run_main
from alexnet_lit.inference.predict import load_model
from alexnet_lit.runs import check_writable

FORMATS = ("onnx", "torchscript", "torch_export")
# fp32 outputs of the exported model may differ from PyTorch's by at most this much.
TOLERANCE = 1e-4
# Metadata key (ONNX metadata_props, TorchScript extra file) holding class names and preprocessing.
METADATA_KEY = "alexnet_lit"


def export_metadata(hparams: dict[str, Any]) -> str:
    """Class names and preprocessing as JSON, so the exported file is usable on its own."""
    return json.dumps(
        {
            "class_names": list(hparams["class_names"]),
            "preprocessing": dict(hparams["preprocessing"]),
            "temperature": float(hparams.get("temperature", 1.0)),
            "input": "images: float32 [batch, channels, size, size], normalized",
            "output": "logits: float32 [batch, num_classes]; calibrated probabilities are "
            "softmax(logits / temperature)",
        }
    )


def export_onnx(model: torch.nn.Module, example: torch.Tensor, out: Path, metadata: str) -> None:
    """Write ``model`` as one ONNX file with a dynamic batch axis and the metadata attached."""
    import onnx

    torch.onnx.export(
        model,
        (example,),
        out,
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
        external_data=False,  # one self-contained file (~187 MB), not weights beside it
    )
    proto = onnx.load(out)
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata})
    onnx.save(proto, out)


def check_onnx(model: torch.nn.Module, out: Path, inputs: list[torch.Tensor]) -> float:
    """Max abs difference between onnxruntime and PyTorch over ``inputs``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        (logits,) = session.run(["logits"], {"images": x.numpy()})
        worst = max(worst, (torch.from_numpy(logits) - model(x)).abs().max().item())
    return worst


def export_torchscript(
    model: torch.nn.Module, example: torch.Tensor, out: Path, metadata: str
) -> None:
    """Write ``model`` as a traced TorchScript file with the metadata as an extra file."""
    traced = torch.jit.trace(model, example)
    # _extra_files is torch.jit.save's documented way to attach files, despite its name.
    torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": metadata})


def check_torchscript(model: torch.nn.Module, out: Path, inputs: list[torch.Tensor]) -> float:
    """Max abs difference between the reloaded TorchScript module and PyTorch over ``inputs``."""
    loaded = torch.jit.load(str(out), map_location="cpu")
    return max((loaded(x) - model(x)).abs().max().item() for x in inputs)


def export_program(model: torch.nn.Module, example: torch.Tensor, out: Path, metadata: str) -> None:
    """Write ``model`` as a ``torch.export`` program (``.pt2``) with a dynamic batch axis."""
    program = torch.export.export(
        model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
    )
    torch.export.save(program, out, extra_files={f"{METADATA_KEY}.json": metadata})


def check_program(model: torch.nn.Module, out: Path, inputs: list[torch.Tensor]) -> float:
    """Max abs difference between the reloaded ``torch.export`` program and PyTorch."""
    loaded = torch.export.load(out).module()
    return max((loaded(x) - model(x)).abs().max().item() for x in inputs)


def export_checkpoint(ckpt: str | Path, fmt: str, out: str | Path) -> float:
    """Export a checkpoint's network and verify it on random input of batch sizes 1 and 3.

    Returns:
        The maximum absolute difference from PyTorch's outputs (fp32).

    Raises:
        CheckpointError: A bad checkpoint.
        InferenceError: A bad format, or the export does not match PyTorch.
    """
    if fmt not in FORMATS:
        raise InferenceError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'.")
    if fmt == "onnx":
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if not find_spec(name)]
        if missing:
            raise InferenceError(
                f"ONNX export needs {', '.join(missing)}; install them with "
                "pip install 'alexnet-lit[export]'."
            )
    lit = load_model(ckpt, map_location="cpu")
    network = lit.model.eval()
    pre = lit.hparams["preprocessing"]
    shape = (pre["in_channels"], pre["image_size"], pre["image_size"])
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *shape, generator=generator)
    # Batch sizes other than the example's prove that the batch axis is dynamic.
    inputs = [torch.randn(n, *shape, generator=generator) for n in (1, 3)]
    out = Path(out)
    check_writable(out, "--out")
    metadata = export_metadata(lit.hparams)
    with torch.no_grad():
        if fmt == "onnx":
            export_onnx(network, example, out, metadata)
            check = check_onnx
        elif fmt == "torchscript":
            export_torchscript(network, example, out, metadata)
            check = check_torchscript
        else:
            export_program(network, example, out, metadata)
            check = check_program
    with torch.inference_mode():
        difference = check(network, out, inputs)
    if not difference <= TOLERANCE:
        raise InferenceError(
            f"the exported '{out}' differs from PyTorch by {difference:.3g} (more than "
            f"{TOLERANCE}); do not use it and report this."
        )
    return difference


def export_main(argv: Sequence[str] | None = None) -> int:
    """``scripts/export.py``: exit code 0, or 2 with one line for a user's mistake."""
    parser = argparse.ArgumentParser(
        description="Export a checkpoint to ONNX, TorchScript or torch.export and check it "
        "against PyTorch."
    )
    parser.add_argument("--ckpt", required=True, help=CKPT_HELP)
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="file to write (.onnx, .pt, .pt2)")
    args = parser.parse_args(argv)

    def main() -> None:
        ckpt = checkpoint_argument(args.ckpt)
        difference = export_checkpoint(ckpt, args.format, args.out)
        print(
            f"wrote {args.out}; max abs difference from PyTorch on random input (batch 1 and 3): "
            f"{difference:.3g} (limit {TOLERANCE})"
        )

    return run_main(main)
