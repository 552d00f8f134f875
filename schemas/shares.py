"""What part of its input a record or a reject stands for, so completeness can be checked anywhere.

An input (one audio file, one manifest row) starts as the whole: share 1. A stage that cuts one
record into n pieces (VAD, diarization) gives each piece, record or reject, 1/n of its parent's
share. Every row and every reject carries its share, so the rows and rejects found for an input
add up to exactly 1 when, and only when, all of its pieces are accounted for. A resumed build
uses this to tell finished inputs from half-done ones without the tallies of the run that was
killed (pipelines/resume.py). Shares are exact fractions, written as text ("1/3").
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Iterable

SHARE_KEY = "_share"  # the working key a record carries; rows keep it until the final shards
WHOLE = Fraction(1)


def share_of(item: dict[str, Any] | Any) -> Fraction:
    """The share of a record (dict) or a Reject; absent means the whole input."""
    value = item.get(SHARE_KEY) if isinstance(item, dict) else getattr(item, "share", None)
    return Fraction(value) if value else WHOLE


def text(share: Fraction) -> str:
    return str(share)


def split(share: Fraction, pieces: int) -> str:
    """The share of each of `pieces` equal parts of `share`, as text."""
    return text(share / pieces)


def total(shares: Iterable[str | None]) -> Fraction:
    return sum((Fraction(s) if s else WHOLE for s in shares), Fraction(0))
