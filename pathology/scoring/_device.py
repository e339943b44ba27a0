"""The one place a torch device is chosen, and the CUDA out-of-memory retry policy."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from pathology.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICES",
    "default_batch_size",
    "gil_switch_interval",
    "is_oom",
    "resolve_device",
    "run_halving",
    "torch_threads",
    "tune_host_allocator",
]

DEVICES = ("auto", "cpu", "cuda")
log = logging.getLogger(__name__)
T = TypeVar("T")

#: glibc ``mallopt`` parameters (malloc.h) and the value used for both: 1 GiB.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_LIMIT = 1 << 30
_allocator_tuned = False


def tune_host_allocator() -> bool:
    """Keep freed memory in the process for the next batch instead of returning it to the OS.

    The CPU model allocates tens of megabytes of temporaries per batch. glibc serves such sizes
    with fresh ``mmap`` pages (or trims them off the heap when freed), so every batch pays page
    faults on all of them: measured on the 2-core dev box, the model ran 1.4-1.5x faster with
    ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` at 1 GiB (``pathology bench``, model stage). The
    cost is that the process keeps its peak memory until it exits, which a batch scorer reaches
    on its first batch anyway. Linux with glibc only; ``PATHOLOGY_MALLOC_TUNE=0`` turns it off.
    Returns whether the settings are in force.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if os.environ.get("PATHOLOGY_MALLOC_TUNE", "1").strip() == "0":
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, _ALLOCATOR_LIMIT) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, _ALLOCATOR_LIMIT) == 1 and ok
    _allocator_tuned = ok
    if ok:
        log.debug("glibc malloc: mmap and trim thresholds at %d bytes", _ALLOCATOR_LIMIT)
    return ok


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when a GPU is visible, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` forced.

    Raises
    ------
    ConfigError
        ``cuda`` was asked for on a machine without a usable CUDA device, or an unknown name.
    """
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                "(use --device cpu, or install the CUDA build of torch: see README)"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return dev
    raise ConfigError(f"unknown device {device!r}; expected one of {', '.join(DEVICES)} or cuda:N")


#: Tiles per forward pass when none is given: on the CPU a batch's temporaries stay within the
#: caches (64); on a GPU the model's hundreds of small kernels need large batches to fill the
#: device. Measured on an H100 (2026-11-24, model alone, 256 px tiles + halo, tiles on the
#: device): 3.5k tiles/s at 64, 11k at 256, 18k at 512, 31k at 1024 (6.1 GB of device memory),
#: 33k at 2048 (10.9 GB). A CUDA out-of-memory error halves it (:func:`run_halving`).
CPU_BATCH, CUDA_BATCH = 64, 1024


def default_batch_size(device: str | torch.device) -> int:
    """Tiles per forward pass for ``device`` when the user gives none (CUDA: 1024, else 64)."""
    name = device.type if hasattr(device, "type") else str(device).strip().lower()
    return CUDA_BATCH if str(name).startswith("cuda") else CPU_BATCH


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (the typed one, or the older RuntimeError text)."""
    import torch

    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def run_halving(fn: Callable[[int, int], T], start: int, stop: int, batch: int) -> list[T]:
    """Run ``fn(i, j)`` over ``[start, stop)`` in chunks of ``batch``, halving the chunk on a CUDA
    out-of-memory error and retrying (down to one item, then the error propagates).

    The smaller batch is kept for the rest of the range: an OOM at one size will recur.
    """
    import torch

    out: list[T] = []
    i = start
    while i < stop:
        j = min(stop, i + batch)
        try:
            out.append(fn(i, j))
        except Exception as exc:
            if not is_oom(exc) or batch == 1:
                raise
            batch = max(1, batch // 2)
            log.warning("CUDA out of memory: retrying with batch size %d", batch)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        i = j
    return out


#: Python's thread switch interval while a GPU model shares the process with reading threads.
GPU_SWITCH_INTERVAL_S = 0.0005


@contextlib.contextmanager
def gil_switch_interval(seconds: float | None = None) -> Iterator[None]:
    """Run the block with Python's thread switch interval at ``seconds`` (default
    ``$PATHOLOGY_GPU_SWITCH_INTERVAL`` or 0.5 ms; Python's own is 5 ms; 0 leaves it alone),
    restored afterwards.

    For a GPU model fed by reading threads: the model waits on the device a few dozen times per
    batch (cell counts, results to the host), releasing the interpreter lock each time, and a
    busy reading thread holds it until the switch interval runs out before the model's thread
    can queue its next kernels. A shorter interval keeps the GPU fed; with many reading threads
    it also makes them hand the lock round more often. On the H100 box the model's time inside
    scoring fell (2.5 -> 0.8 s for 3,040 tiles, together with batch 1024) while the wait for the
    readers grew; the two were not separated (an A/B for the next GPU session: set the variable
    to 0). Process-wide.
    """
    if seconds is None:
        env = os.environ.get("PATHOLOGY_GPU_SWITCH_INTERVAL", "").strip()
        seconds = float(env) if env else GPU_SWITCH_INTERVAL_S
    if seconds <= 0:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread pool at ``n`` threads, restored afterwards.

    For CPU scoring in several Python threads at once (each a whole batch or shard, one torch
    thread each): the model is hundreds of small tensor operations per batch, which split poorly
    across intra-op threads, while whole batches in parallel keep every core busy (and overlap a
    shard's reading with another's model). The setting is process-wide, so concurrent torch work
    elsewhere in the process runs with ``n`` threads until the block ends.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)
