"""What the network looks at: Grad-CAM on AlexNet's last convolution, with Captum.

Grad-CAM (Selvaraju et al. 2017) weighs the last convolution's feature maps by the gradient of
the chosen class's logit and keeps the positive part: a coarse map (12x12 for a 224 input) of
where the evidence for that class is, upsampled to the image.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from PIL import Image, ImageDraw

from alexnet_lit.model import AlexNet
from alexnet_lit.reports import load_font

LAST_CONV = 11  # features[11]: Conv2d(384, 256, 3), [256,12,12] for a 224x224 input


def grad_cam(model: AlexNet, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heatmaps ``[B, H, W]`` in [0, 1] (each scaled to its own maximum) of the network
    inputs ``images`` ``[B, C, H, W]`` for the classes ``targets`` ``[B]``.

    Works inside evaluation code: gradients are turned on here, and inference tensors are
    copied into ordinary ones. The model's parameters get no ``.grad``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        inputs = images.detach().clone().requires_grad_(True)
        cam = LayerGradCam(model, model.features[LAST_CONV])
        attributions = cam.attribute(inputs, target=targets.tolist(), relu_attributions=True)
        heat = LayerAttribution.interpolate(
            attributions.detach(), tuple(images.shape[-2:]), interpolate_mode="bilinear"
        )[:, 0]
    peak = heat.flatten(1).amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (heat / peak).clamp(0, 1)


def colorize(heat: np.ndarray) -> np.ndarray:
    """A ``[H, W]`` map in [0, 1] as ``[H, W, 3]`` uint8, dark blue (0) to yellow (1) (viridis)."""
    from matplotlib import colormaps

    return (colormaps["viridis"](heat)[..., :3] * 255).round().astype(np.uint8)


def overlay(pixels: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The heatmap blended over ``[H, W, 3]`` uint8 pixels of the same size."""
    blended = (1 - alpha) * pixels.astype(np.float32) + alpha * colorize(heat).astype(np.float32)
    return blended.round().clip(0, 255).astype(np.uint8)


def captioned(picture: np.ndarray, lines: Sequence[str]) -> Image.Image:
    """``picture`` (``[H, W, 3]`` uint8) with text lines under it."""
    text_font = load_font(13)
    height = 6 + 16 * len(lines)
    image = Image.new("RGB", (picture.shape[1], picture.shape[0] + height), "white")
    image.paste(Image.fromarray(picture), (0, 0))
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(lines):
        draw.text((4, picture.shape[0] + 3 + 16 * i), line, fill="black", font=text_font)
    return image


def explain_files(
    model,
    paths: Sequence[Path],
    out_dir: str | Path,
    batch_size: int = 32,
    num_workers: int = 0,
    temperature: float = 1.0,
    progress: bool = True,
) -> list[Path]:
    """Write one PNG per readable image into ``out_dir``: the Grad-CAM of the predicted class over
    the image as the network saw it, captioned with the class and its confidence. Returns the
    files, named ``NNNNN_<stem>.png`` after each image's place in ``paths``."""
    from tqdm import tqdm

    from alexnet_lit.inference import eval_batches
    from alexnet_lit.runs import printable

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model.hparams["class_names"]
    written = []
    with tqdm(total=len(paths), unit="img", desc="grad-cam", disable=not progress) as bar:
        for batch, images, probs in eval_batches(
            model, paths, batch_size, num_workers, temperature
        ):
            if len(batch.indices):
                confidence, predicted = probs.max(dim=1)
                heat = grad_cam(model.model, images, predicted).cpu().numpy()
                pixels = batch.images.numpy()
                if pixels.shape[-1] == 1:
                    pixels = pixels.repeat(3, axis=-1)
                for j, index in enumerate(batch.indices.tolist()):
                    caption = [
                        printable(f"{names[int(predicted[j])]} ({float(confidence[j]):.2f})")
                    ]
                    picture = captioned(overlay(pixels[j], heat[j]), caption)
                    path = out_dir / f"{index:05d}_{Path(paths[index]).stem}.png"
                    picture.save(path)
                    written.append(path)
            bar.update(len(batch.indices) + len(batch.skipped))
    return written
