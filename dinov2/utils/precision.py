"""The compute precision of a run, chosen from the hardware unless the user sets it.

``auto`` (the default of every command):

* CUDA: bf16 where the GPU supports it, else fp16 (with a loss scaler in training);
* CPU: bf16 only where this CPU runs bf16 matrix products clearly faster than fp32
  (:data:`CPU_BF16_MIN_SPEEDUP`), else fp32. CPUs differ by two orders of magnitude here: with
  AVX512-BF16 / AMX units bf16 runs ~4x faster than fp32, without them (AVX2 only: most laptops
  and many servers) PyTorch falls back to a path ~70x *slower* than fp32. The speed is measured
  once per process (:func:`cpu_bf16_speedup`, a few ms; ~0.1 s where bf16 is slow), so the choice
  also holds where the CPU flags promise more than the math library delivers.

An explicit ``fp32``, ``bf16`` or ``fp16`` always wins; ``bf16`` on a CPU where it is slow runs
with a warning that gives the measured factor; ``fp16`` needs a GPU.
"""

import contextlib
import functools
import logging
import time
from dataclasses import dataclass

import torch

from dinov2.errors import ConfigError

logger = logging.getLogger("dinov2")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SETTINGS = ("auto", *DTYPES)
CPU_BF16_MIN_SPEEDUP = 1.5  # bf16 must beat fp32 matmuls by this factor to be chosen on the CPU
_PROBE_SIZE = 256
_PROBE_REPEATS = 7


@dataclass(frozen=True)
class Precision:
    """What a run computes in: ``name`` (fp32 | bf16 | fp16), chosen for ``reason``."""

    name: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def needs_loss_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self, device: torch.device):
        """``torch.autocast`` in this precision on ``device``; a no-op for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def parse_dtype(name: str) -> torch.dtype:
    """The dtype of an explicit precision name (``fp32``, ``bf16``, ``fp16``)."""
    if name not in DTYPES:
        raise ConfigError(f"precision must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def cpu_bf16_flags() -> list:
    """The bf16 matmul units this CPU reports (``avx512_bf16``, ``amx``); empty when unknown."""
    checks = {"avx512_bf16": "_is_avx512_bf16_supported", "amx": "_is_amx_tile_supported"}
    return [flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)()]


@functools.cache
def cpu_bf16_speedup() -> float:
    """Measured rate of bf16 over fp32 for a 256^3 matmul on one core of this CPU (> 1 means bf16
    is faster; the bf16 units are per core). Measured once per process, on one thread (on a busy
    machine a multi-threaded product waits for its slowest thread), as the best of several
    interleaved timings of each (the undisturbed ones); where bf16 is hopeless (over 4x slower)
    it is not timed again."""
    fp32 = torch.full((_PROBE_SIZE, _PROBE_SIZE), 0.5)
    bf16 = fp32.bfloat16()
    best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 @ fp32, bf16 @ bf16  # first calls: one-off set-up (oneDNN builds its bf16 kernel: up to ~20 ms)
        for _ in range(_PROBE_REPEATS):
            for x in (fp32, bf16):
                start = time.perf_counter()
                x @ x
                best[x.dtype] = min(best[x.dtype], max(time.perf_counter() - start, 1e-9))
            if best[torch.bfloat16] > 4 * best[torch.float32]:
                break
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


def choose_precision(setting: str, device: torch.device) -> Precision:
    """The precision for ``setting`` (``auto`` or an explicit name) on ``device``."""
    if setting not in SETTINGS:
        raise ConfigError(f"precision must be one of {', '.join(SETTINGS)}, got {setting!r}")
    cuda = device.type == "cuda"
    if setting == "fp16" and not cuda:
        raise ConfigError("precision fp16 needs a GPU (CPUs run it far slower than fp32); use auto, fp32 or bf16")
    if setting != "auto":
        if setting == "bf16" and not cuda:
            _warn_if_slow_bf16()
        return Precision(setting, "set explicitly")
    if cuda:
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16")
        return Precision("fp16", f"auto: {torch.cuda.get_device_name(device)} lacks bf16")
    speedup = cpu_bf16_speedup()
    flags = "/".join(cpu_bf16_flags()) or "no AVX512-BF16/AMX"
    measured = f"bf16 matmul {speedup:.2f}x fp32 on this CPU ({flags})"
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        return Precision("bf16", f"auto: {measured}")
    return Precision("fp32", f"auto: {measured}")


@functools.cache
def _warn_if_slow_bf16() -> None:
    speedup = cpu_bf16_speedup()
    if speedup < 1.0:
        message = (
            f"bf16 was set explicitly, but this CPU runs bf16 matmuls {1 / speedup:.0f}x slower than fp32 "
            "(no fast bf16 units); precision auto would use fp32"
        )
        logger.warning(message)
