"""Loader workers keep a flat memory footprint over a 90-epoch run.

NOTE: glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so
after a few decoded images (~0.5 MB each) every image buffer comes from the heap, whose
freed holes are neither returned nor reused well: measured, a worker's private memory
grew by 220-270 MB over 6,000-20,000 ImageNet-size JPEGs. Fixing the threshold at
glibc's default (128 KiB) turns the dynamic raise off: image buffers are mmapped and
returned on free, and the growth was ~1 MB. A worker also inherits the main process's
`backend.host_memory` settings (no mmap at all, no trimming), made for the model's
activations, not for a decoder; they are reset here, in the worker only.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
THRESHOLD_BYTES = 128 * 1024  # glibc's default mmap and trim thresholds
MMAP_MAX = 65536  # glibc's default number of mmapped blocks


def bound_worker_heap(worker_id: int = 0) -> bool:
    """`worker_init_fn` of the loaders; False where the C library has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_MAX, MMAP_MAX),
            (M_MMAP_THRESHOLD, THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, THRESHOLD_BYTES),
        )
    )
