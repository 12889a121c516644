"""The machine: which device to train on, and its measured matmul peak (FLOP/s) that MFU is relative to."""

from __future__ import annotations

import time

import torch

from ..configio import ConfigError


def pick_device(preference: str = "auto") -> torch.device:
    """ "auto" takes the fastest available accelerator: CUDA, then Apple MPS, then the CPU."""
    if preference == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda, but PyTorch sees no CUDA GPU; use train.device=auto or cpu")
    if preference == "mps" and not _mps_available():
        raise ConfigError("train.device=mps, but this PyTorch has no Apple MPS support; use train.device=auto or cpu")
    if preference not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"train.device={preference!r}: use auto, cpu, cuda or mps")
    return torch.device(preference)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def peak_flops(device: torch.device, dtype: torch.dtype, remeasure: bool = False) -> float:
    """The best dense matmul throughput of `device` in `dtype` measured in this process, in FLOP/s.

    MFU is reported against what this machine actually reaches on a large square matmul rather than a
    datasheet number, which does not exist for most CPUs and laptop GPUs. One measurement taken while other
    programs load the machine reads low (and MFU high, even above 100%), so a long run calls this again with
    `remeasure` at its evaluations and keeps the best figure.
    """
    key = (str(device), str(dtype).removeprefix("torch."))
    size, best = _best_peaks.get(key, (256, 0.0))
    if remeasure or not best:
        size, flops = _measure_peak(device, dtype, size)
        _best_peaks[key] = (size, max(flops, best))
    return _best_peaks[key][1]


_best_peaks: dict[tuple[str, str], tuple[int, float]] = {}  # (device, dtype) -> (matrix size, FLOP/s)


def _measure_peak(device: torch.device, dtype: torch.dtype, n: int) -> tuple[int, float]:
    """(the matrix size used, FLOP/s), starting from size `n`."""
    # Fixed generator: the measurement must not move the global RNG a training run depends on.
    generator = torch.Generator().manual_seed(0)
    # Grow the matrices until one product takes ~20 ms: large enough to reach the throughput plateau,
    # small enough to stay quick where the format is slow (bf16 emulated on CPUs without bf16 units).
    largest = 2048 if device.type == "cpu" else 8192
    while True:
        a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
        _time_matmul(a, b, device, repeats=1)  # the first product pays for allocation and kernel choice
        seconds = _time_matmul(a, b, device, repeats=1)
        if seconds > 0.02 or n >= largest:
            break
        n *= 2
    return n, 2.0 * n**3 / min(seconds, _time_matmul(a, b, device, repeats=5))


def _time_matmul(a: torch.Tensor, b: torch.Tensor, device: torch.device, repeats: int) -> float:
    """Best time of `repeats` products."""
    best = float("inf")
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
