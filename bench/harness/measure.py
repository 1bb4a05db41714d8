"""Timers, peak memory, and the card's two ceilings measured in the same run.

The ceilings are what the fractions are taken against: the device-to-device copy bandwidth
(bytes read plus bytes written per second) for decoding, the bf16 matrix-product rate for
training. Both are measured, not taken from a datasheet.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """(wall seconds, result) of one call, the device synchronised before and after."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak bytes allocated by PyTorch since the last ``reset_peak``, in GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def free(device: torch.device) -> None:
    """Drop what the last measurement left: garbage, then the caching allocator's free blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy rate, bytes/s: 2 * nbytes (read + write) per copy / mean copy time."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t, _ = timed(lambda: [dst.copy_(src) for _ in range(reps)], device)
    return 2 * nbytes * reps / t


def matmul_peak(device: torch.device, n: int, reps: int = 10) -> float:
    """Matrix-product rate, FLOP/s: 2 n^3 per (n x n) @ (n x n) / mean time, random bf16 on GPU
    (float32 on CPU, where bf16 products are emulated)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    t, _ = timed(lambda: [a @ b for _ in range(reps)], device)
    return 2 * n**3 * reps / t


def calibrate(device: torch.device, copy_bytes: int, matmul_n: int) -> dict:
    """The card's measured ceilings (first rows of the table)."""
    out = {"copy_bytes_per_s": copy_bandwidth(device, copy_bytes), "copy_bytes": copy_bytes,
           "matmul_flops_per_s": matmul_peak(device, matmul_n), "matmul_n": matmul_n,
           "matmul_dtype": "bfloat16" if device.type == "cuda" else "float32"}
    free(device)
    return out
