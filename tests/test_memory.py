"""keep_freed_memory (freed memory stays with the process while fast.yaml's runs step),
gradients freed early (after the step, or in backward with optimizer_in_backward), and the entry
scripts' garbage-collector start-up (freeze_imported_objects)."""

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

from alexnet_lit import LitAlexNet, cli, memory

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# Allocates and frees 256 MB, then prints how much of it is still resident (MB).
_PROBE = """
import sys
from alexnet_lit import memory
def rss_mb():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024
if sys.argv[1] != "default":
    assert memory.keep_freed_memory()
before = rss_mb()
buffer = b"x" * (256 << 20)  # written, so every page is resident
del buffer
if sys.argv[1] == "given back":
    assert memory.give_back_freed_memory()
    buffer = b"x" * (256 << 20)  # and a buffer freed after that is given back at once
    del buffer
print(rss_mb() - before)
"""


def _resident_after_free(mode: str) -> float:
    command = [sys.executable, "-c", _PROBE, mode]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(run.stdout)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="a glibc malloc setting",
)
def test_freed_memory_stays_resident_only_while_kept():
    assert _resident_after_free("default") < 64  # glibc gave the 256 MB back to the kernel
    assert _resident_after_free("kept") > 192  # kept for the next allocation
    assert _resident_after_free("given back") < 64


@pytest.fixture
def malloc_calls(monkeypatch) -> list[str]:
    """Records the settings KeepFreedMemory makes instead of making them: they are process-wide."""
    calls = []
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(memory, "give_back_freed_memory", lambda: calls.append("give back"))
    return calls


@pytest.mark.parametrize(
    ("configs", "expected"),
    [(["default.yaml"], []), (["default.yaml", "fast.yaml"], ["keep", "give back"])],
)
def test_fast_yaml_keeps_freed_memory_for_the_run(
    configs, expected, image_folder, tmp_path, monkeypatch, malloc_calls
):
    monkeypatch.chdir(tmp_path)
    configs = [arg for name in configs for arg in ("--config", str(CONFIGS / name))]
    cli.cli_main(
        ["fit", *configs, f"--data.data_dir={image_folder}", "--data.image_size=96",
         "--data.batch_size=4", "--trainer.fast_dev_run=2", "--trainer.enable_progress_bar=false"]
    )  # fmt: skip
    assert malloc_calls == expected


def _trainer(**trainer_args) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_args,
    )  # fmt: skip


def _loader() -> DataLoader:
    images, targets = torch.randn(8, 3, 72, 72), torch.tensor([0, 1] * 4)
    return DataLoader(TensorDataset(images, targets), batch_size=2)


@pytest.mark.parametrize(
    ("in_backward", "accumulate"), [(False, 2), (True, 1)], ids=["accumulating", "in backward"]
)
def test_keep_freed_memory_starts_after_the_first_optimizer_step(
    in_backward, accumulate, malloc_calls, monkeypatch
):
    model = LitAlexNet(num_classes=2, optimizer_in_backward=in_backward)
    seen = []  # the step and optimizer state when the setting was made

    def keep() -> bool:
        optimizer = model.trainer.optimizers[0]
        seen.append((model.trainer.global_step, len(optimizer.state)))
        return True

    monkeypatch.setattr(memory, "keep_freed_memory", keep)
    trainer = _trainer(accumulate_grad_batches=accumulate, num_sanity_val_steps=1,
                       callbacks=[memory.KeepFreedMemory()])  # fmt: skip
    strategy_teardown = trainer.strategy.teardown

    def teardown() -> None:  # where Lightning moves the weights off a GPU, into host memory
        malloc_calls.append("strategy teardown")
        strategy_teardown()

    monkeypatch.setattr(trainer.strategy, "teardown", teardown)
    trainer.fit(model, _loader(), _loader())
    # Not in the sanity check, nor while the first gradients were only accumulated.
    assert seen == [(1, len(list(model.parameters())))]
    assert malloc_calls == ["give back", "strategy teardown"]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_keep_freed_memory_holds_for_a_whole_evaluation(stage, malloc_calls):
    getattr(_trainer(callbacks=[memory.KeepFreedMemory()]), stage)(
        LitAlexNet(num_classes=2), _loader()
    )
    assert malloc_calls == ["keep", "give back"]


def test_keep_freed_memory_gives_memory_back_after_a_fit_that_raised(malloc_calls):
    trainer = _trainer(callbacks=[memory.KeepFreedMemory(), _FailAtSecondStep()])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(LitAlexNet(num_classes=2), _loader())
    assert malloc_calls == ["keep", "give back"]


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
    trainer = _trainer(accumulate_grad_batches=accumulate, callbacks=[probe])
    trainer.fit(LitAlexNet(num_classes=2), loader)
    # Lightning alone zeroes them only after the next forward pass: [True, True] here.
    assert probe.present == expected


# --- optimizer_in_backward -----------------------------------------------------------------------


class _GradientsAfterBackward(L.Callback):
    def __init__(self) -> None:
        self.present: list[bool] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.present.append(any(p.grad is not None for p in pl_module.parameters()))


def _fit_four_steps(
    in_backward: bool, callbacks: list | None = None, model_args: dict | None = None, **trainer_args
) -> tuple[list, list[bool]]:
    """Weights after 4 training steps, and whether gradients were left after each backward."""
    torch.manual_seed(0)
    images, targets = torch.randn(8, 3, 72, 72), torch.tensor([0, 1] * 4)
    model_args = {"channels_last": True, **(model_args or {})}
    model = LitAlexNet(num_classes=2, optimizer_in_backward=in_backward, **model_args)
    probe = _GradientsAfterBackward()
    trainer = _trainer(callbacks=[probe, *(callbacks or [])], **trainer_args)
    trainer.fit(model, DataLoader(TensorDataset(images, targets), batch_size=2))
    assert model._in_backward_hooks == []  # removed when the fit ends
    return [p.detach().clone() for p in model.parameters()], probe.present


def _same(first: list, second: list) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_optimizer_in_backward_frees_each_gradient_and_trains_the_same(precision):
    usual, kept = _fit_four_steps(False, precision=precision)
    weights, left = _fit_four_steps(True, precision=precision)
    assert kept == [True] * 4 and left == [False] * 4  # applied and freed during backward
    assert _same(usual, weights)  # bit-identical


def _lbfgs(params):
    return torch.optim.LBFGS(params, lr=0.1, max_iter=2)


# LBFGS's step needs a closure; it flattens the weights with view(), so no channels-last.
@pytest.mark.parametrize(
    ("setting", "trainer_args", "model_args"),
    [
        ("trainer.gradient_clip_val", {"gradient_clip_val": 0.01}, None),
        ("trainer.accumulate_grad_batches", {"accumulate_grad_batches": 2}, None),
        ("per-parameter optimizers", {}, {"optimizer": _lbfgs, "channels_last": False}),
    ],
)
def test_optimizer_in_backward_steps_after_backward_where_it_cannot_apply(
    setting, trainer_args, model_args, caplog
):
    usual, _ = _fit_four_steps(False, model_args=model_args, **trainer_args)
    with caplog.at_level(logging.INFO):
        weights, left = _fit_four_steps(True, model_args=model_args, **trainer_args)
    assert all(left)  # the gradients were there after backward
    assert _same(usual, weights)
    assert "model.optimizer_in_backward: stepping after backward" in caplog.text
    assert setting in caplog.text


class _UnfreezeAfterFirstStep(L.Callback):
    """Freezes the last layer's weight before the fit and unfreezes it after the first step,
    as fine-tuning callbacks do: a parameter that gets gradients but no hook."""

    def setup(self, trainer, pl_module, stage) -> None:
        pl_module.model.classifier[-1].weight.requires_grad_(False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.model.classifier[-1].weight.requires_grad_(True)


def test_optimizer_in_backward_steps_a_parameter_unfrozen_later_once_per_batch():
    usual, _ = _fit_four_steps(False, callbacks=[_UnfreezeAfterFirstStep()])
    weights, _ = _fit_four_steps(True, callbacks=[_UnfreezeAfterFirstStep()])
    assert _same(usual, weights)


class _FailAtSecondStep(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 1:
            raise RuntimeError("stop here")


def test_optimizer_in_backward_does_nothing_after_a_fit_that_raised():
    model = LitAlexNet(num_classes=2, optimizer_in_backward=True)
    images, targets = torch.randn(4, 3, 72, 72), torch.tensor([0, 1, 0, 1])
    trainer = _trainer(callbacks=[_FailAtSecondStep()])
    with pytest.raises(RuntimeError, match="stop here"):
        trainer.fit(model, DataLoader(TensorDataset(images, targets), batch_size=2))
    before = [p.detach().clone() for p in model.parameters()]
    model(images).sum().backward()  # by hand, in a notebook say
    assert _same(before, [p.detach() for p in model.parameters()])  # no step was taken
    assert all(p.grad is not None for p in model.parameters())  # gradients as usual


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

# Runs scripts/train.py as python would. A stand-in alexnet_lit.cli records the collector's state
# when cli_main is called; gc.disable records whether Lightning was imported before it.
_TRAIN_PROBE = """
import gc, json, runpy, sys, types
seen = {}
real_disable = gc.disable
def disable():
    seen["lightning_before_disable"] = "lightning" in sys.modules
    real_disable()
gc.disable = disable
cli = types.ModuleType("alexnet_lit.cli")
cli.cli_main = lambda: seen.update(enabled=gc.isenabled(), frozen=gc.get_freeze_count())
sys.modules["alexnet_lit.cli"] = cli
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
    assert seen["lightning_before_disable"] is False  # collection was off for the imports
    assert seen["enabled"] and seen["frozen"] > 100_000
