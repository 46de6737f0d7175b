"""Process-wide memory settings that make runs faster: keep freed memory, freeze the imports."""

import ctypes
import functools
import gc
import platform
import sys
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

# mallopt(3) parameters of glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# What give_back_freed_memory sets: glibc's default number of mappings, and the thresholds its
# dynamic adjustment reaches at most (mallopt(3)), as in a process that has freed large buffers.
_MMAP_MAX = 65536
_MMAP_THRESHOLD = 32 << 20
_TRIM_THRESHOLD = 64 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    return libc


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep the memory this process frees, for its next allocations.

    Every training step allocates and frees the same large buffers: activations, and the bf16
    copies and gradients of the 105 MB and 67 MB linear weights. By default glibc returns each
    buffer over 32 MB to the kernel as soon as it is freed (mmap and munmap) and trims the heap,
    so every step faults the same memory back in, page by page. Serving all allocations from the
    heap and never trimming it keeps those pages. On the 2-core benchmark machine the compute
    ceiling rose ~10% in fp32 and 10-20% under bf16 autocast (README, Speed). What is freed
    stays with the process: turn it on once the long-lived memory is allocated, and give it back
    with ``give_back_freed_memory`` (``KeepFreedMemory`` does both). Applies to this process
    from now on, and to the processes it forks afterwards.

    Returns:
        Whether glibc took the setting: False where the C library is not glibc. A malloc
        preloaded in its place (jemalloc, tcmalloc) does not see it, and has its own caching.
    """
    libc = _glibc()
    # mallopt returns 1 on success. A trim threshold of -1 turns trimming off (mallopt(3)).
    return (
        libc is not None
        and libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1
    )


def give_back_freed_memory() -> bool:
    """Undo ``keep_freed_memory``: return the heap's free memory to the kernel, and let glibc
    map large buffers and trim its heap again.

    glibc's dynamic thresholds cannot be turned back on once ``mallopt`` has set one, so this
    sets the values they reach at most: buffers over 32 MB get mappings of their own, and the heap
    is trimmed when over 64 MB at its top is free.

    Returns:
        Whether glibc took the settings: False where the C library is not glibc.
    """
    libc = _glibc()
    if libc is None:
        return False
    settings = (
        libc.mallopt(_M_MMAP_MAX, _MMAP_MAX) == 1
        and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    )
    libc.malloc_trim(0)  # returns 1 if it released memory, 0 if there was none to release
    return settings


class KeepFreedMemory(L.Callback):
    """Keep freed memory (``keep_freed_memory``) while a trainer runs its steps; give it back
    when they are done. ``configs/fast.yaml`` adds it through ``keep_freed_memory: true``.

    A fit turns it on after its first optimizer step, once the weights and the optimizer state
    exist: allocated before, each of their large tensors has a mapping of its own. Turned on
    earlier, the 374 MB of Adam state, which the first step allocates, landed in the heap among
    that step's buffers, leaving holes that later buffers did not fit: ~0.1 GB more at the peak.
    Validate, test and predict turn it on when they start. When the steps end, or a run raises,
    the free heap goes back to the kernel: kept to the exit, it set the process's peak there
    (README, Speed). Loader workers forked before it is on do not keep freed memory.
    """

    def __init__(self) -> None:
        self._asked = False  # once per run, also where the C library is not glibc
        self._kept = False

    def _keep(self) -> None:
        if not self._asked:
            self._asked = True
            self._kept = keep_freed_memory()

    def _give_back(self) -> None:
        if self._kept:
            give_back_freed_memory()
        self._asked = self._kept = False

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if trainer.global_step > 0:  # the optimizer has stepped (not yet while accumulating)
            self._keep()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._give_back()  # before Lightning moves the weights off a GPU into host memory

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not a fit's validation
            self._keep()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:
            self._give_back()

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._give_back()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._keep()

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._give_back()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._give_back()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._give_back()  # a run that ended early, as the tuner's trial fits do


def freeze_imported_objects() -> None:
    """Collect once, then put every object alive now out of the garbage collector's reach.

    For entry scripts that call ``gc.disable()`` before importing the package (see
    ``scripts/train.py``). Importing Lightning, torchvision and what they import leaves ~780,000
    objects that live until the process exits. With collection on, the collector scans them over
    and over while the imports run (~0.9 s on the 2-core benchmark machine), and all of them once
    more at exit (~1.1 s). Instead, one collection here (~0.4 s) frees what the imports left as
    garbage, ``gc.freeze`` moves the survivors to the permanent generation, which no collection
    scans, and collection is turned back on: objects made from now on are collected as usual.
    """
    gc.collect()
    gc.freeze()
    gc.enable()
