"""Resuming a build: what an output folder already holds, and whether this run may continue it.

A build writes `OUT/_work/run.json` (the profile, resolved, and the input) before any work, and
saves its rows and rejects in parts as they finish (pipelines/parts.py). Started again with the
same output:
  - a folder holding a run of the same profile and input resumes it: every input whose rows and
    rejects already add up to its whole (schemas/shares.py) is skipped, the rest is done (again),
    and the final shards are made from all parts; paid calls were cached, so none is paid twice;
  - a folder holding a run of another profile or input is refused, naming what differs;
  - a folder holding a finished build is left as it is (`--overwrite` rebuilds).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from echat.schemas import shares

from .parts import REJECTS, ROWS, list_parts, read_rejects, read_row_index

RUN_FILE = "run.json"


def chunk_of(source_uri: str, chunks: int) -> int:
    """The chunk (0..chunks-1) an input belongs to: a stable hash of its source_uri."""
    digest = hashlib.sha1(source_uri.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % chunks


@dataclass(frozen=True)
class InputSelection:
    """The inputs one pipeline run skips: those earlier runs finished, and, when the build runs in
    `chunks` passes (profile `output.chunks`), those of the other chunks. `uri in selection` is
    true for an input to skip."""

    done: frozenset[str] = frozenset()
    chunk: int = 0
    chunks: int = 1

    def __contains__(self, source_uri: object) -> bool:
        return source_uri in self.done or (self.chunks > 1 and chunk_of(str(source_uri), self.chunks) != self.chunk)

    def __bool__(self) -> bool:
        return bool(self.done) or self.chunks > 1


class IncompatibleRun(ValueError):
    pass


def run_description(profile, input_path: str) -> dict[str, Any]:
    """What decides a build's rows: the resolved profile and the input. Beam's own options (the
    runner, workers) and how the work is cut into passes and parts do not change rows, so a run
    may be resumed with others."""
    described = profile.model_dump(mode="json")
    described.pop("beam", None)
    for how in ("chunks", "part_rows"):  # how the work is cut, not what it makes
        described["output"].pop(how, None)
    return {"input": input_path, "profile": described}


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths where two descriptions differ, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new), key=str):
            found += differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return found
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        found = []
        for i, (a, b) in enumerate(zip(old, new)):
            found += differences(a, b, f"{where}[{i}]")
        return found
    return [] if old == new else [f"{where}: {json.dumps(old, ensure_ascii=False)} -> {json.dumps(new, ensure_ascii=False)}"]


def check_compatible(saved: dict[str, Any], current: dict[str, Any], out: str, *, finished: bool = False) -> None:
    found = differences(saved, current)
    if found:
        shown = "; ".join(found[:5]) + (f"; and {len(found) - 5} more" if len(found) > 5 else "")
        what = "a finished" if finished else "an unfinished"
        then = "pass --overwrite to replace it" if finished else \
            "rerun with the same ones to resume it, or pass --overwrite to start over"
        raise IncompatibleRun(f"{out} holds {what} build of another profile or input ({shown}); {then}")


@dataclass
class Resume:
    """What the parts of earlier runs hold."""

    parts_dir: str
    row_parts: list[str] = field(default_factory=list)
    reject_parts: list[str] = field(default_factory=list)
    share_by_source: dict[str, Fraction] = field(default_factory=dict)
    rows_by_source: Counter = field(default_factory=Counter)
    rejects_by_source: Counter = field(default_factory=Counter)

    def earlier(self) -> dict[str, dict[str, Any]]:
        """The inputs finished by earlier runs: rows, rejects and share of each (for the summary)."""
        return {uri: {"rows": self.rows_by_source[uri], "rejects": self.rejects_by_source[uri],
                      "share": shares.text(self.share_by_source[uri])} for uri in sorted(self.done_inputs)}

    @property
    def done_inputs(self) -> frozenset[str]:
        """Inputs all of whose pieces are rows or rejects already."""
        return frozenset(uri for uri, total in self.share_by_source.items() if total >= shares.WHOLE)

    @property
    def spill_dir(self) -> str:
        """Where the final shard pass sorts rows by shard (pipelines/shards.py), beside the parts."""
        return self.parts_dir.rstrip("/") + "-spill"


def read_resume(parts_dir: str) -> Resume:
    """Index the parts in `parts_dir`: each row id and each reject counted once."""
    state = Resume(parts_dir, list_parts(parts_dir, ROWS), list_parts(parts_dir, REJECTS))
    totals: dict[str, Fraction] = defaultdict(Fraction)
    seen_ids: set[str] = set()
    for path in state.row_parts:
        for row_id, uri, share, _ in read_row_index(path):
            if row_id not in seen_ids:
                seen_ids.add(row_id)
                totals[uri] += shares.total([share])
                state.rows_by_source[uri] += 1
    seen_rejects: set[str] = set()
    for path in state.reject_parts:
        for line in read_rejects(path):
            if line not in seen_rejects:
                seen_rejects.add(line)
                reject = json.loads(line)
                totals[reject["source_uri"]] += shares.total([reject.get("share")])
                state.rejects_by_source[reject["source_uri"]] += 1
    state.share_by_source = dict(totals)
    return state
