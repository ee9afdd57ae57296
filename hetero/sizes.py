"""Human byte sizes: "8GB", "512MiB", "300KB" or a plain integer number of bytes."""

import re

from .errors import HeteroError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value, what: str = "size") -> int | None:
    """Parse a size into bytes. None stays None (no budget given).

    Args:
        value: int bytes, or a string like "8GB" (decimal), "512MiB" (binary), "300KB".
        what: the name of the option, used in the error message.
    Returns:
        The number of bytes, or None.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise HeteroError(f"{what}: expected a size like 8GB or 512MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise HeteroError(f"{what}: a size cannot be negative ({value})")
        return value
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise HeteroError(
            f"{what}: cannot read {value!r} as a size; write it like 8GB, 512MiB, 300KB or a number of bytes"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: int | float | None) -> str:
    """Bytes as a short human string (binary units), e.g. 1.5 GiB."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
