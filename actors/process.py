"""Settings for a long-lived simulation process (a worker or aggregator actor), applied once its
state is built. Plain functions, no Ray: the actor wrappers call `settle()` at the end of `__init__`.

Two costs that are not the model's math showed up when a round was profiled (`fedmeta bench`):

* Python's cyclic garbage collector. An actor holds a few hundred thousand long-lived objects
  (torch, numpy, the config, the dataset generator); every full collection walks all of them
  (~0.2 s on the 2-core dev machine), and a round's allocations trigger one every few rounds, so
  rounds had spikes of 2x. `gc.freeze()` moves everything alive after start-up to a permanent
  generation the collector skips; objects made by rounds are still collected.
* Page faults. glibc returns freed blocks above its mmap threshold (and a heap top above its trim
  threshold) to the kernel, so the per-step tensors of a training loop (e.g. the 0.6 MB activation
  gradients of a CNN on a 16-sample batch) are faulted in page by page at every step. Raising both
  thresholds keeps freed memory in the process for reuse (PyTorch's CPU tuning guide suggests a
  caching allocator such as jemalloc for the same reason; this needs no extra library).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

# mallopt parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# freed blocks up to this size stay in the heap (glibc's own dynamic maximum is 32 MiB)
MMAP_THRESHOLD = 64 << 20
# the heap keeps up to this much free memory at its top before returning it
TRIM_THRESHOLD = 256 << 20


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where the C library is not
    glibc (macOS, musl): nothing changes there."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def settle() -> dict:
    """Freeze the objects alive now out of the garbage collector's reach and keep freed memory
    for reuse. Returns what was done."""
    gc.collect()
    gc.freeze()
    return {"gc_frozen": gc.get_freeze_count(), "malloc_tuned": keep_freed_memory()}
