"""Which mixed precision a device runs natively, for ``configs/fast.yaml``.

bf16 autocast is only fast where the hardware has bf16 arithmetic. Elsewhere PyTorch emulates
it, and a CPU without bf16 instructions trained AlexNet ~10x slower in bf16 than in fp32.
"""

import sys
from functools import cache

import torch

# /proc/cpuinfo flags of x86 CPUs with bf16 matrix instructions (oneDNN uses them for bf16).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The bf16 instruction sets this CPU reports (Linux on x86); empty where none or unknown."""
    if not sys.platform.startswith("linux"):
        return ()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return ()
    return tuple(flag for flag in CPU_BF16_FLAGS if flag in flags)


def native_mixed_precision(accelerator: str | None = "auto") -> tuple[str, str]:
    """The Lightning ``precision`` to train in on ``accelerator``, and why, in a few words.

    ``bf16-mixed`` on a CUDA GPU of compute capability 8.0 or later or a CPU with AVX512_BF16 or
    AMX; ``16-mixed`` (with a gradient scaler) on older CUDA GPUs; ``32-true`` elsewhere (other
    CPUs, Apple MPS and other accelerators), where mixed precision would be emulated or untested.
    """
    accelerator = str(accelerator or "auto").lower()
    wants_gpu = accelerator in ("auto", "gpu", "cuda")
    if wants_gpu and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        name = torch.cuda.get_device_name()
        if major >= 8:
            return "bf16-mixed", f"{name} (compute capability {major}.{minor}) has bf16"
        return "16-mixed", f"{name} (compute capability {major}.{minor}) has fp16 but no bf16"
    if accelerator not in ("auto", "cpu"):
        return "32-true", f"trainer.accelerator={accelerator} is not a CPU or CUDA GPU"
    flags = cpu_bf16_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    if flags:
        return "bf16-mixed", f"this CPU has bf16 instructions ({', '.join(flags)})"
    return "32-true", (
        f"this CPU ({capability}) has no bf16 instructions (AVX512_BF16 or AMX), so bf16 would "
        "be emulated and several times slower"
    )
