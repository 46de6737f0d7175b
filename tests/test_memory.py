"""keep_freed_memory (freed memory stays with the process; fast.yaml turns it on), gradients freed
early (after the step, or in backward with optimizer_in_backward), and the entry scripts'
garbage-collector start-up (freeze_imported_objects)."""

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from alexnet_lit import LitAlexNet, cli, module

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Allocates and frees 256 MB, then prints how much of it is still resident (MB). It loads
# memory.py by its path: the package's __init__ would import torch and Lightning, for nothing.
_PROBE = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("memory", sys.argv[2])
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory()
before = rss_mb()
buffer = b"x" * (256 << 20)  # written, so every page is resident
del buffer
print(rss_mb() - before)
"""


def _resident_after_free(mode: str) -> float:
    command = [sys.executable, "-c", _PROBE, mode, str(ROOT / "alexnet_lit" / "memory.py")]
    return float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="a glibc malloc setting",
)
def test_freed_memory_stays_resident_only_when_kept():
    assert _resident_after_free("default") < 64  # glibc gave the 256 MB back to the kernel
    assert _resident_after_free("keep") > 192  # kept for the next allocation


@pytest.mark.parametrize(
    ("configs", "applied"),
    [(["default.yaml"], False), (["default.yaml", "fast.yaml"], True)],
)
def test_fast_yaml_keeps_freed_memory_before_building_the_model(
    configs, applied, image_folder, tmp_path, monkeypatch
):
    calls = []  # the setting is process-wide and for good: record it instead of making it
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True) or True)
    built = []  # how many settings had been made when the network was built
    network = module.AlexNet

    def build(*args, **kwargs):
        built.append(len(calls))
        return network(*args, **kwargs)

    monkeypatch.setattr(module, "AlexNet", build)
    monkeypatch.chdir(tmp_path)
    configs = [arg for name in configs for arg in ("--config", str(CONFIGS / name))]
    cli.cli_main(
        ["fit", *configs, f"--data.data_dir={image_folder}", "--data.image_size=96",
         "--data.batch_size=4", "--trainer.fast_dev_run=1", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    assert calls == ([True] if applied else [])
    assert built == [len(calls)]  # built once, after the setting (if any)


class _GradientsAfterEachBatch(L.Callback):
    def __init__(self) -> None:
        self.present: list[bool] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.present.append(any(p.grad is not None for p in pl_module.parameters()))


@pytest.mark.parametrize(("accumulate", "expected"), [(1, [False, False]), (2, [True, False])])
def test_gradients_are_freed_once_applied_and_kept_while_accumulating(accumulate, expected):
    images, targets = torch.randn(4, 3, 72, 72), torch.tensor([0, 1, 0, 1])
    loader = DataLoader(TensorDataset(images, targets), batch_size=2)
    probe = _GradientsAfterEachBatch()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[probe],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(LitAlexNet(num_classes=2), loader)
    # Lightning alone zeroes them only after the next forward pass: [True, True] here.
    assert probe.present == expected


# --- optimizer_in_backward -----------------------------------------------------------------------


class _GradientsAfterBackward(L.Callback):
    def __init__(self) -> None:
        self.present: list[bool] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.present.append(any(p.grad is not None for p in pl_module.parameters()))


def _fit_four_steps(in_backward: bool, **trainer_args) -> tuple[list, list[bool]]:
    """Weights after 4 training steps, and whether gradients were left after each backward."""
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 72, 72), torch.tensor([0, 1] * 4)
    model = LitAlexNet(num_classes=2, channels_last=True, optimizer_in_backward=in_backward)
    probe = _GradientsAfterBackward()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, callbacks=[probe], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        **trainer_args,
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(images, targets), batch_size=2))
    assert model._in_backward_hooks == []  # removed when the fit ends
    return [p.detach().clone() for p in model.parameters()], probe.present


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_optimizer_in_backward_frees_each_gradient_and_trains_the_same(precision):
    usual, kept = _fit_four_steps(False, precision=precision)
    weights, left = _fit_four_steps(True, precision=precision)
    assert kept == [True] * 4 and left == [False] * 4  # applied and freed during backward
    assert all(torch.equal(a, b) for a, b in zip(usual, weights, strict=True))  # bit-identical


def test_optimizer_in_backward_steps_after_backward_where_clipping_needs_every_gradient(caplog):
    usual, _ = _fit_four_steps(False, gradient_clip_val=0.01)
    with caplog.at_level(logging.INFO):
        weights, left = _fit_four_steps(True, gradient_clip_val=0.01)
    assert left == [True] * 4  # the gradients were there for the clipping
    assert all(torch.equal(a, b) for a, b in zip(usual, weights, strict=True))
    assert "stepping after backward, as trainer.gradient_clip_val" in caplog.text


def test_default_config_applies_the_optimizer_in_backward():
    config = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert config["model"]["optimizer_in_backward"] is True


# --- freeze_imported_objects --------------------------------------------------------------------

_FREEZE_PROBE = """
import gc, json, weakref
gc.disable()
class Node: pass
node = Node(); node.itself = node; garbage = weakref.ref(node); del node  # a cycle: garbage
from alexnet_lit.memory import freeze_imported_objects
freeze_imported_objects()
print(json.dumps({"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                  "garbage_freed": garbage() is None}))
"""

# Runs scripts/train.py as python would, with cli_main replaced by a probe of the collector.
_TRAIN_PROBE = """
import gc, json, runpy, sys
import alexnet_lit.cli
seen = {}
alexnet_lit.cli.cli_main = lambda: seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
runpy.run_path(sys.argv[1], run_name="__main__")
print(json.dumps(seen))
"""


def _probe(script: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", script, *args]
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout)


def test_freeze_imported_objects_collects_once_then_freezes_the_survivors():
    seen = _probe(_FREEZE_PROBE)
    assert seen["garbage_freed"]  # the garbage made while collection was off is gone
    assert seen["frozen"] > 100_000  # the imports' objects: out of every later collection
    assert seen["enabled"]  # and collection is back on for everything made from now on


def test_train_script_runs_the_cli_with_the_imports_frozen():
    seen = _probe(_TRAIN_PROBE, str(ROOT / "scripts" / "train.py"))
    assert seen["enabled"] and seen["frozen"] > 100_000
