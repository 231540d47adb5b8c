"""One training run per run directory at a time.

Contract: ``run_lock(out)`` is a context manager that holds an exclusive lock on
``out / LOCK_FILE`` while a run trains in ``out``, with the holder's process id written in
the file. A second ``asge-edge train`` on the same directory (a job started twice, or
requeued while the first is still saving) gets a UserError naming that process, instead of
interleaving its checkpoints with the first's. The lock is flock(2)'s: the kernel drops it
when its holder ends, however it ends (SIGKILL included), so the file left behind never
blocks a later run. Where the platform has no flock (Windows), no lock is taken.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:   # Windows: no flock
    fcntl = None

from .errors import UserError

LOCK_FILE = ".asge-edge.lock"


@contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s run lock for the block (``out`` exists); UserError if another process holds it."""
    if fcntl is None:
        yield
        return
    with open(Path(out) / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(f"{out} is in use by another asge-edge train (pid {holder}); wait for it to end, "
                            "or train in another --out") from None
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
