"""Quality flags: warnings a labeler leaves on a record (`quality_flags`, a list of strings)."""

from __future__ import annotations

from typing import Any


def add_flag(record: dict[str, Any], flag: str) -> None:
    """Append `flag` to `record["quality_flags"]` once.

    Builds a new list rather than appending in place: a shallow copy of a record shares its
    parent's list, and the parent (or a sibling segment) must not gain the flag.
    """
    flags = list(record.get("quality_flags") or [])
    if flag not in flags:
        flags.append(flag)
    record["quality_flags"] = flags
