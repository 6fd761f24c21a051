"""How many bytes the weights may take: parsing budget specs, and (issue 7) the machine's own budget."""

from __future__ import annotations

import re
from typing import Any

from .errors import BudgetError

UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
SIZE = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]i?b|b)\s*$", re.IGNORECASE)
PERCENT = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*%\s*$")
BPW = re.compile(r"^\s*(?P<n>\d+(?:\.\d+)?)\s*bpw\s*$", re.IGNORECASE)
FORMS = "a size (6GB, 5.5GiB, 800MB), bits per weight (4.5bpw), a share of the bf16 size (30%), "
FORMS += "min-safe, max, or a named device (see `ramserve budget --devices`)"


def parse_budget(spec: str, *, parameters: int, bf16_bytes: int) -> int:
    """Bytes for a size, bits-per-weight or percentage spec (symbolic specs are the caller's)."""
    for pattern, to_bytes in (
        (SIZE, lambda n, m: n * UNITS[m["unit"].lower()]),
        (PERCENT, lambda n, m: n / 100 * bf16_bytes),
        (BPW, lambda n, m: n * parameters / 8),
    ):
        if match := pattern.match(spec):
            value = float(match["n"])
            if value <= 0:
                raise BudgetError(f"budget {spec!r} must be positive; accepted forms: {FORMS}")
            return int(to_bytes(value, match))
    raise BudgetError(f"cannot read budget {spec!r}; accepted forms: {FORMS}")


def named_device_bytes(spec: str, profile: dict[str, Any]) -> int | None:
    """Weight budget of a named device from configs/ (issue 7), or None if ``spec`` names none."""
    return None


def machine_weight_budget(profile: dict[str, Any]) -> int:
    raise BudgetError("budget 'max' needs the machine's weight budget (ramserve budget)")
