"""Do the confidences mean anything? Reliability diagrams, and one temperature fitted on each
validation epoch (temperature scaling, Guo et al. 2017).

A model is calibrated when, among the images it gives 80% confidence, 80% are right. The
expected calibration error (ECE, :func:`alexnet_lit.metrics.expected_calibration_error`) is
torchmetrics' multiclass calibration error with 15 bins:
the gap between confidence and accuracy, averaged over the bins by their share of images.
Temperature scaling divides the logits by one scalar ``T`` fitted on the validation set (L-BFGS on
the negative log-likelihood): the predicted class never changes, only how sure the model says
it is.
"""

from pathlib import Path

import numpy as np
import torch

from alexnet_lit.evaluation.pictures import figure
from alexnet_lit.metrics import ECE_BINS, expected_calibration_error


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The ``T > 0`` minimizing the cross-entropy of ``logits / T`` (L-BFGS on ``log T``).

    1 when every image is classified correctly: the cross-entropy then falls all the way to
    T -> 0, so such a set cannot say how sure the model should be, and the model's own
    confidences are kept rather than pushed to 100% on every input.
    """
    logits, targets = logits.detach().float().cpu(), targets.detach().cpu()
    if len(targets) == 0 or bool((logits.argmax(dim=1) == targets).all()):
        return 1.0
    log_t = torch.zeros(1, requires_grad=True)  # T = exp(log_t) stays positive
    optimizer = torch.optim.LBFGS([log_t], max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    return temperature if np.isfinite(temperature) else 1.0


def reliability_bins(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per confidence bin: its range, mean confidence, accuracy and number of images."""
    probs = (logits.float() / temperature).softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == targets).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows = []
    for low, high in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        inside = (confidence > low) & (confidence <= high)
        count = int(inside.sum())
        rows.append(
            {
                "low": low,
                "high": high,
                "confidence": float(confidence[inside].mean()) if count else float("nan"),
                "accuracy": float(correct[inside].mean()) if count else float("nan"),
                "count": count,
            }
        )
    return rows


def render_reliability(
    logits: torch.Tensor,
    targets: torch.Tensor,
    path: str | Path,
    temperature: float = 1.0,
    title: str = "Reliability",
    eces: tuple[float, float] | None = None,
) -> Path:
    """Write a reliability diagram: accuracy against confidence per bin, raw and (when
    ``temperature`` is not 1) after temperature scaling, with each curve's ECE (``eces``: raw
    and calibrated, when already computed)."""
    if eces is None:
        eces = tuple(expected_calibration_error(logits, targets, t) for t in (1.0, temperature))
    curves = [("raw", 1.0, "#1f77b4", eces[0])]
    if abs(temperature - 1.0) > 1e-6:
        curves.append((f"T = {temperature:.2f}", temperature, "#d62728", eces[1]))
    with figure((4.8, 4.8), path) as axes:
        axes.plot([0, 1], [0, 1], color="#999999", linestyle="--", linewidth=1, label="calibrated")
        for label, t, color, ece in curves:
            rows = [row for row in reliability_bins(logits, targets, t) if row["count"]]
            axes.plot(
                [row["confidence"] for row in rows],
                [row["accuracy"] for row in rows],
                marker="o",
                color=color,
                label=f"{label} (ECE {ece:.3f})",
            )
        axes.set_xlim(0, 1)
        axes.set_ylim(0, 1)
        axes.set_xlabel("confidence")
        axes.set_ylabel("accuracy")
        axes.set_title(f"{title} ({len(targets)} images, {ECE_BINS} bins)")
        axes.legend(loc="upper left", fontsize=8)
    return Path(path)
