"""What the network looks at: Grad-CAM on AlexNet's last convolution, with Captum.

Grad-CAM (Selvaraju et al. 2017) weighs the last convolution's feature maps by the gradient of
the chosen class's logit and keeps the positive part: a coarse map (12x12 for a 224 input) of
where the evidence for that class is, upsampled to the image.
"""

import numpy as np
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last convolution of either AlexNet's ``features``: ``[256, 12, 12]`` (the tutorial's)
    or ``[256, 13, 13]`` (torchvision's) for a 224x224 input."""
    return [layer for layer in model.features if isinstance(layer, nn.Conv2d)][-1]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Grad-CAM heatmaps ``[B, H, W]`` in [0, 1] (each scaled to its own maximum) of the network
    inputs ``images`` ``[B, C, H, W]`` for the classes ``targets`` ``[B]``.

    Works inside evaluation code: gradients are turned on here, and inference tensors are
    copied into ordinary ones. The model runs in eval mode and is left in the mode it was in;
    its parameters get no ``.grad``.
    """
    training = model.training
    model.eval()  # no dropout, whether called in validation or after training
    try:
        with torch.inference_mode(False), torch.enable_grad():
            inputs = images.detach().clone().requires_grad_(True)
            cam = LayerGradCam(model, last_conv(model))
            attributions = cam.attribute(inputs, target=targets.tolist(), relu_attributions=True)
            heat = LayerAttribution.interpolate(
                attributions.detach(), tuple(images.shape[-2:]), interpolate_mode="bilinear"
            )[:, 0]
    finally:
        model.train(training)
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
