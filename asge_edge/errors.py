"""User-facing errors.

Contract: ``UserError`` is raised for anything the user can fix (bad argument, missing
data, unreadable checkpoint). Its message is one line that says what to do. The CLI
prints it as ``asge-edge: error: <message>`` and exits 2, with no traceback. So does an
allocation that failed (``out_of_memory``): the run asked for more memory than the machine
has, which the user fixes with smaller settings or a budget. Every other exception is a bug
and keeps its traceback.
"""

from __future__ import annotations

import re

from .budget import format_size

# torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4608000000000 bytes";
# CUDA's (torch.OutOfMemoryError): "CUDA out of memory. Tried to allocate 20.00 GiB. ..."
_CPU_BYTES = re.compile(r"can't allocate memory: you tried to allocate (\d+) bytes")
_CUDA_SIZE = re.compile(r"out of memory\. Tried to allocate ([0-9.]+ [KMGT]?i?B)")


class UserError(Exception):
    """A problem the user can fix; the message says how."""


class Interrupted(Exception):
    """A signal stopped a run (SIGINT or SIGTERM) and its state was saved; the message says how
    to go on. The CLI exits 128 + ``signum``, as a shell reports a process that the signal ended."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


def out_of_memory(e: BaseException, command: str) -> UserError | None:
    """The one-line error for ``e`` where it is a failed allocation, else None.

    torch raises torch.OutOfMemoryError on CUDA and a RuntimeError from its CPU allocator;
    numpy and Python raise MemoryError. The message names the size asked for where the
    exception gives it, and what to change: for ``train``, a budget or smaller settings.
    """
    text = str(e)
    if not (isinstance(e, MemoryError)
            or isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)):
        return None
    cpu, cuda = _CPU_BYTES.search(text), _CUDA_SIZE.search(text)
    size = format_size(int(cpu.group(1))) if cpu else cuda.group(1) if cuda else None
    what = f"out of memory: an allocation of {size} failed" if size else "out of memory"
    fix = ("give a --memory-budget (see 'asge-edge plan'), or make the run smaller: --batch-size, --width, "
           "the input or the classes"
           if command == "train" else "free memory, or run it on a machine with more")
    return UserError(f"{what}; {fix}")
