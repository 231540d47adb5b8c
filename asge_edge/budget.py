"""Byte sizes: parsing ``--memory-budget`` values and printing them.

Contract: ``parse_size`` is pure and accepts a plain byte count or a number with a unit.
Decimal units are powers of 1000 (KB, MB, GB, TB) and binary units powers of 1024 (KiB,
MiB, GiB, TiB), as in IEC 80000-13; so 64MB = 64,000,000 bytes and 64MiB = 67,108,864.
Units are case-insensitive, a trailing "B" may be dropped (64M = 64MB) and spaces are
allowed. The arithmetic is exact (decimal, not binary floating point), so 64.1MB is
64,100,000 bytes. Anything else, any size that is not a positive whole number of bytes
(2.3MiB is 2,411,724.8) and any above 2^63 - 1 raise ValueError with a message that says
what to give instead.
"""

from __future__ import annotations

import re
from decimal import Decimal

UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
         "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?)?b?\s*$", re.IGNORECASE)
MAX_BYTES = 2**63 - 1  # torch's sizes are int64
ACCEPTED = "a byte count or a size such as 64MB, 64MiB, 0.5GB or 65536KB"


def parse_size(text: str) -> int:
    """Bytes in ``text`` (e.g. "64MB" -> 64_000_000, "64MiB" -> 67_108_864)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: give {ACCEPTED}")
    value = Decimal(m.group(1)) * UNITS[(m.group(2) or "").lower()]  # exact: 64.1MB is whole
    if value < 1:
        raise ValueError(f"size {text!r} must be a positive whole number of bytes: give {ACCEPTED}")
    if value != value.to_integral_value():
        raise ValueError(f"size {text!r} is {value.normalize():f} bytes, not a whole number: "
                         f"give a whole number of bytes, such as {int(value)}")
    if value > MAX_BYTES:
        raise ValueError(f"size {text!r} is above {MAX_BYTES} bytes, the most a 64-bit size "
                         f"can hold: give {ACCEPTED}")
    return int(value)


def format_size(n: float) -> str:
    """Human-readable decimal size, e.g. 64000000 -> '64.00 MB'."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
