"""Disk quotas that push back: sizes, percentages, and the one "would this go past" rule.

Both ends of dlogd refuse work rather than drop what they already hold
(issue 14): the submit service refuses a file that would take its spool past
``limits { spool_max_size; spool_min_free; }`` (``SPOOL_FULL``), and a
collector refuses, for now, an offer that would leave a store's file system
with less than ``limits { min_free; }``. Both ask :func:`refusal`; the config
schema reads the values with :func:`parse_amount` (and every other size with
:func:`parse_size`), so a size means the same everywhere.

Standard library only and cheap to import: the submit service, a process per
connection, reads it.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Final

SIZE_RE: Final = re.compile(r"([0-9]+)([KMGT]?)\Z")
SIZE_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
PERCENT_RE: Final = re.compile(r"([0-9]{1,2}(?:\.[0-9]{1,4})?)%\Z")
SIZE_RULE: Final = "a positive size in bytes, optionally with K, M, G or T"
AMOUNT_RULE: Final = f'{SIZE_RULE}, or a percentage of the file system below 100 ("10%")'


def parse_size(text: str) -> int:
    """``512``, ``64K``, ``2G``: bytes (powers of 1024). Raises ValueError."""
    match = SIZE_RE.match(text)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r}: expected {SIZE_RULE}")
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


@dataclass(frozen=True)
class Amount:
    """A quantity of disk: a number of bytes, or a share of the file system's size."""

    bytes: int = 0
    percent: float = 0.0  # of the whole file system (f_blocks), when bytes is 0

    def __post_init__(self) -> None:
        if (self.bytes > 0) == (self.percent > 0) or self.bytes < 0 or not self.percent < 100:
            raise ValueError(f"an amount is bytes or a percentage below 100, not {self!r}")

    def of(self, total: int) -> int:
        """In bytes, on a file system of ``total`` bytes."""
        return self.bytes if self.bytes else int(total * self.percent / 100)

    def text(self) -> str:
        """As a config writes it (quoted when a percentage: ``%`` is not a word character)."""
        if self.bytes:
            return str(self.bytes)
        return f'"{repr(self.percent).removesuffix(".0")}%"'

    def plain(self) -> int | str:
        """The validated config's plain form (JSON in the cache): bytes, or ``"N%"``."""
        return self.bytes if self.bytes else f"{repr(self.percent).removesuffix('.0')}%"


def parse_amount(text: str) -> Amount:
    """A size (``512M``) or a percentage (``10%``, ``2.5%``). Raises ValueError."""
    match = PERCENT_RE.match(text)
    if match is not None and float(match.group(1)) > 0:
        return Amount(percent=float(match.group(1)))
    if match is None:
        with contextlib.suppress(ValueError):
            return Amount(bytes=parse_size(text))
    raise ValueError(f"{text!r}: expected {AMOUNT_RULE}")


def from_plain(value: int | str | None) -> Amount | None:
    """The typed amount of a validated config value (None: no limit set)."""
    if value is None:
        return None
    return parse_amount(str(value))


@dataclass(frozen=True)
class Space:
    """One file system's figures, as an unprivileged writer sees them."""

    total: int  # bytes in the file system
    free: int  # bytes an unprivileged writer may still use (f_bavail)

    @classmethod
    def of_fd(cls, fd: int) -> Space:
        fs = os.fstatvfs(fd)
        return cls(fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)


@dataclass(frozen=True)
class Refusal:
    """Why an addition of ``size`` bytes was refused, with the figures for the journal."""

    reason: str
    size: int
    free: int
    min_free: int = 0
    used: int = 0
    max_used: int = 0

    def fields(self) -> dict[str, int]:
        """``DLOGD_*`` journal fields (docs/journal.md); the file's size is the caller's
        to add (its records already carry one)."""
        out = {"free": self.free}
        if self.min_free:
            out["min_free"] = self.min_free
        if self.max_used:
            out |= {"used": self.used, "max_used": self.max_used}
        return out


def refusal(
    adding: int,
    space: Space,
    *,
    min_free: Amount | None = None,
    used: int = 0,
    max_used: Amount | None = None,
    size: int | None = None,
) -> Refusal | None:
    """Would adding ``adding`` bytes go past a limit? None if not, else why.

    The rule, for both ends: what is left free afterwards must stay at least
    ``min_free``, and what is held afterwards (``used`` plus ``size``, the
    file's whole size) at most ``max_used``; percentages are of the file
    system's size. ``adding`` is what the file system loses, which may be less
    than ``size`` (a hard link adds nothing; a resume only the rest). A limit
    met exactly is not passed. With no limit, the file still must fit.
    """
    size = adding if size is None else size
    left = space.free - adding
    floor = min_free.of(space.total) if min_free is not None else 0
    if left < floor or left < 0:
        why = (
            f"{adding} bytes would leave {max(left, 0)} of {space.free} free,"
            f" under the {floor} bytes that must stay free"
            if floor
            else f"{adding} bytes to write, {space.free} free"
        )
        return Refusal(why, size, space.free, min_free=floor)
    if max_used is not None:
        ceiling = max_used.of(space.total)
        if used + size > ceiling:
            return Refusal(
                f"{size} bytes would make {used + size}, over the limit of {ceiling}",
                size,
                space.free,
                used=used,
                max_used=ceiling,
            )
    return None
