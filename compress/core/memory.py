"""What the machine can hold, and a guard that stops a step before the kernel kills it.

A stage whose memory would grow past what the machine has (a dependency graph of a big
transformer, a calibration, a compilation) ends with one line that names the step, on
stderr and in the run's log, instead of an out-of-memory kill that leaves no word.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading

log = logging.getLogger("compress")

# The share of the memory available when a step starts that it may use. The rest is the
# margin for the other processes of a shared machine and for the guard's reaction time.
GUARDED_SHARE = 0.9
# How often the guard reads the process's resident memory (s): fast enough that a graph
# growing by ~1 GB/s cannot pass the margin between two reads.
POLL_SECONDS = 0.05


def available_bytes() -> int:
    """Memory the machine can still give (MemAvailable), or 8 GiB where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 8 << 30


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc is not available)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def memory_guard(step: str, limit_bytes: int | None = None):
    """Run the block while a thread watches the process's memory; past ``limit_bytes``
    (default: what is resident now plus GUARDED_SHARE of what is available) the process
    logs one line naming ``step`` and exits 1 — Python cannot interrupt a C++ call that is
    allocating, and the kernel's out-of-memory kill would say nothing.

    Example:
        >>> with memory_guard("prune: dependency graph of swin_t"):
        ...     graph = build_graph(model)
    """
    if limit_bytes is None:
        limit_bytes = resident_bytes() + int(GUARDED_SHARE * available_bytes())
    done = threading.Event()

    def watch():
        while not done.wait(POLL_SECONDS):
            used = resident_bytes()
            if used > limit_bytes:
                message = (
                    f"{step}: stopped at {used / 2**30:.1f} GiB, past the"
                    f" {limit_bytes / 2**30:.1f} GiB this machine can give it; use a smaller"
                    " model or input size, or a machine with more memory"
                )
                # One line on stderr, and the same in the run's log file.
                record = log.makeRecord(
                    log.name, logging.ERROR, __file__, 0, "out of memory: %s", (message,), None
                )
                for handler in log.handlers:
                    if isinstance(handler, logging.FileHandler):
                        handler.handle(record)
                        handler.flush()
                print(f"failed: out of memory: {message}", file=sys.stderr, flush=True)
                os._exit(1)

    thread = threading.Thread(target=watch, name="memory-guard", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
