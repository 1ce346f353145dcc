"""Give freed memory back to the operating system between the phases of a run.

A phase that allocates and frees gigabytes (dequantizing a GGUF, tracing an ONNX export, a batch of
a large vocabulary's logits) leaves glibc's heap holding the freed pages, so the process's resident
size stays at the phase's peak and the next phase adds to it. ``malloc_trim(0)`` returns them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import resource


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def trim_heap() -> None:
    """Return free heap pages to the OS (glibc; elsewhere a no-op)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


def release() -> None:
    """Collect garbage and return free heap pages to the OS."""
    gc.collect()
    trim_heap()


def peak_rss_mb() -> float:
    """This process's peak resident memory, MiB. VmHWM is reset by exec, unlike ru_maxrss, which a
    child inherits from the (larger) krimp process that started it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
