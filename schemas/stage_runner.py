"""The stage contract, enforced: what runs around every stage, in Beam and without it.

`StageRunner.run(records)` gives one final Result per input (records and piece Rejects, or the
input's Reject) and never raises for a bad record. Around the stage's own `process_batch` it:
  1. applies the precedence rule: a record whose every label group the stage writes is already
     held by a better source (profile `precedence`, e.g. manifest > model > heuristic) passes
     through untouched (counted as skipped); otherwise a group held by a better source is restored
     after the stage, whatever the stage wrote there;
  2. retries a record whose processing raised `TransientError` (alone, not its batch), with
     exponential backoff and jitter, at most `max_attempts` tries in all, then rejects it with reason
     `transient_error` saying how many tries failed; any other exception is a `stage_error`;
  3. checks each output against the stage's declared `writes`: a field added, changed or removed
     that is not declared rejects the input with `stage_error` naming the field;
  4. stamps provenance: a produced value's `*_model` / `*_origin` field (schemas.record.PROVENANCE)
     gets the stage's `describe()` unless the stage set it itself (a per-record detail);
  5. normalises every closed-vocabulary field the stage wrote through schemas.labels; a value
     outside its vocabulary rejects the input with `invalid_label` naming field and value.
`run_stages` chains runners over a list of records (tests, notebooks, benchmarks).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from . import shares
from .record import FIELDS_BY_NAME, LABEL_GROUPS, PROVENANCE, STRINGS
from .stage import MANIFEST, ORIGINS, Reject, Result, Stage, TransientError

DEFAULT_PRECEDENCE = ORIGINS  # manifest, then model, then heuristic
# An I/O-bound stage gets batches of this many times its requests in flight: within a batch the
# pool starts the next record as soon as one finishes, so only a batch's last records wait idle.
IN_FLIGHT_BATCHES = 4


def records_per_call(batch_size: int, max_in_flight: int) -> int:
    """How many records a runner call takes for a stage of this batch size and concurrency."""
    if max_in_flight > 1:
        return max(batch_size, IN_FLIGHT_BATCHES * max_in_flight)
    return max(1, batch_size)
ORIGINS_KEY = "_origins"  # working key: label group -> origin of its current value
PROVENANCE_FIELDS = frozenset(PROVENANCE.values())
WORKING_KEYS = "_*"  # in a stage's `writes`: every working key (leading `_`) may change
_MISSING = object()


class ContractError(Exception):
    """A stage broke the contract on one record (the record is rejected as `stage_error`)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How a transient failure is retried: `max_attempts` tries in all, sleeping between them
    `backoff_s * 2**k` seconds (at most `max_backoff_s`), scaled by a random factor in [0.5, 1.5)."""

    max_attempts: int = 4
    backoff_s: float = 0.5
    max_backoff_s: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return min(float(retry_after), self.max_backoff_s)
        base = min(self.max_backoff_s, self.backoff_s * (2 ** (attempt - 1)))
        return base * (0.5 + rng.random())


@dataclass
class RunStats:
    """What a runner saw; the Beam wrapper turns these into counters."""

    attempts_retried: int = 0
    skipped: int = 0


def origin_of(record: dict[str, Any], group: str) -> str | None:
    """Origin of a label group's current value: None when the record has no value there."""
    if record.get(group) is None:
        return None
    recorded = (record.get(ORIGINS_KEY) or {}).get(group)
    if recorded:
        return recorded
    # A value no stage wrote came with the source (a manifest, an earlier build): the best kind.
    return MANIFEST


def stage_groups(stage: Stage) -> tuple[str, ...]:
    """The label groups (schemas.record.LABEL_GROUPS) whose value field the stage declares."""
    return tuple(group for group in LABEL_GROUPS if group in stage.writes)


class StageRunner:
    def __init__(
        self,
        stage: Stage,
        *,
        precedence: Iterable[str] = DEFAULT_PRECEDENCE,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
        lock: threading.Lock | None = None,
    ):
        self.stage = stage
        self.slot = stage.slot_name
        self.rank = {origin: i for i, origin in enumerate(precedence)}
        self.retry = retry
        self.sleep = sleep
        self.stats = RunStats()
        self._rng = random.Random(seed)
        self._groups = stage_groups(stage)
        self._cleared = tuple(group for group in LABEL_GROUPS if group in stage.clears)
        cleared_fields = {name for group in self._cleared for name in LABEL_GROUPS[group]}
        self._allowed = frozenset(stage.writes) | cleared_fields | PROVENANCE_FIELDS | {ORIGINS_KEY}
        # "_*" in `writes`: the stage may drop or replace any working key (the row encoder does).
        self._any_working_key = WORKING_KEYS in stage.writes
        # Serialises calls into a stage that is not thread-safe; threads sharing one stage share it.
        self._lock = lock or threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # for stages with requests in flight, made once

    # ------------------------------------------------------------------ precedence

    def _wins(self, record: dict[str, Any], group: str) -> bool:
        """Whether this stage may write `group` on `record`: empty, or held by a worse source."""
        held = origin_of(record, group)
        if held is None:
            return True
        mine = self.rank.get(self.stage.origin, len(self.rank))
        return mine < self.rank.get(held, -1)

    def _skips(self, record: dict[str, Any]) -> bool:
        return bool(self._groups) and not any(self._wins(record, g) for g in self._groups)

    def close(self) -> None:
        """Stop the request threads, if any (the stage itself is torn down by its owner)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ------------------------------------------------------------------ running

    def run(self, records: list[dict[str, Any]]) -> list[Result]:
        results: list[Result | None] = [None] * len(records)
        todo = []
        for i, record in enumerate(records):
            if self._skips(record):
                self.stats.skipped += 1
                results[i] = [record]
            else:
                todo.append(i)
        attempt = 1
        while todo:
            raw = self._call([records[i] for i in todo])
            retry, last_error = [], {}
            for i, outcome in zip(todo, raw):
                if isinstance(outcome, TransientError):
                    retry.append(i)
                    last_error[i] = outcome
                else:
                    results[i] = self._finish(records[i], outcome)
            if not retry:
                break
            if attempt >= self.retry.max_attempts:
                for i in retry:
                    exc = last_error[i]
                    results[i] = self.stage.reject(
                        records[i], "transient_error",
                        f"gave up after {attempt} tries; last: {type(exc).__name__}: {exc}")
                break
            self.stats.attempts_retried += len(retry)
            hint = max((e.retry_after for e in last_error.values() if e.retry_after is not None), default=None)
            self.sleep(self.retry.delay(attempt, hint, self._rng))
            attempt += 1
            todo = retry
        return results  # type: ignore[return-value]

    def _call(self, batch: list[dict[str, Any]]) -> list[Result | BaseException]:
        """One outcome per record: its Result or the exception it raised."""
        stage = self.stage
        try:
            if stage.max_in_flight > 1 and len(batch) > 1:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=stage.max_in_flight, thread_name_prefix=f"echat-{self.slot}")
                outcomes = list(self._pool.map(stage.process_one, batch))
            elif stage.thread_safe:
                outcomes = stage.process_batch(batch)
            else:
                with self._lock:
                    outcomes = stage.process_batch(batch)
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: each record says so
            return [exc] * len(batch)
        if len(outcomes) != len(batch):
            problem = RuntimeError(f"process_batch returned {len(outcomes)} results for {len(batch)} records")
            return [problem] * len(batch)
        return list(outcomes)

    # ------------------------------------------------------------------ checking one result

    def _finish(self, record: dict[str, Any], outcome: Result | BaseException) -> Result:
        if isinstance(outcome, BaseException):
            return self.stage.reject(record, "stage_error", f"{type(outcome).__name__}: {outcome}")
        if isinstance(outcome, Reject):
            return outcome
        if not isinstance(outcome, list) or not outcome:
            what = "no output" if isinstance(outcome, list) else f"a {type(outcome).__name__}"
            return self.stage.reject(record, "stage_error", f"the stage returned {what} and no Reject for this record")
        finished: list[dict[str, Any] | Reject] = []
        for out in outcome:
            if isinstance(out, Reject):
                finished.append(out)
                continue
            problem = self._undeclared(record, out)
            if problem:
                return self.stage.reject(record, "stage_error", problem)
            try:
                out = self._settle(record, out)
            except ContractError as exc:
                return self.stage.reject(record, "stage_error", str(exc))
            label_problem = _normalise_labels(out, self.stage.writes)
            if label_problem:
                return self.stage.reject(record, "invalid_label", label_problem)
            finished.append(out)
        return _shared_out(record, finished)

    def _declared(self, key: str) -> bool:
        return key in self._allowed or (self._any_working_key and key.startswith("_"))

    def _undeclared(self, before: dict[str, Any], after: dict[str, Any]) -> str | None:
        # A field that is absent and one that is None say the same: filling in None is no write.
        changed = [k for k in after if not self._declared(k) and not _same(before.get(k), after[k])]
        removed = [k for k in before if k not in after and before[k] is not None and not self._declared(k)]
        if changed or removed:
            parts = []
            if changed:
                parts.append(f"wrote undeclared field(s) {', '.join(sorted(changed))}")
            if removed:
                parts.append(f"removed undeclared field(s) {', '.join(sorted(removed))}")
            return f"stage {self.slot!r} ({type(self.stage).__name__}) " + " and ".join(parts)
        return None

    def _settle(self, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
        """Apply precedence to the label groups and stamp the provenance of what the stage wrote."""
        out = dict(after)
        origins = dict(before.get(ORIGINS_KEY) or {})
        description = None
        for group in self._groups:
            if _same(before.get(group, _MISSING), out.get(group, _MISSING)):
                continue
            if not self._wins(before, group):  # a better source holds it: keep that value whole
                for name in LABEL_GROUPS[group]:
                    if name in before:
                        out[name] = before[name]
                    else:
                        out.pop(name, None)
                continue
            if out.get(group) is not None:
                origins[group] = self.stage.origin
        for value_field, provenance_field in PROVENANCE.items():
            if value_field not in self.stage.writes or out.get(value_field) is None:
                continue
            if _same(before.get(value_field, _MISSING), out[value_field]):
                continue
            if _same(before.get(provenance_field, _MISSING), out.get(provenance_field, _MISSING)):
                if description is None:
                    description = self.stage.describe()
                out[provenance_field] = description
        for group in self._cleared:
            if out.get(group) is None:
                for name in LABEL_GROUPS[group]:  # emptied: the whole group goes, not a stale score
                    if out.get(name) is not None:
                        out[name] = None
                origins.pop(group, None)
            elif not _same(before.get(group), out.get(group)):
                raise ContractError(f"stage {self.slot!r} may only clear {group!r}, but wrote {out.get(group)!r}")
        if origins or ORIGINS_KEY in out:
            out[ORIGINS_KEY] = origins
        return out


def _shared_out(record: dict[str, Any], outputs: list[dict[str, Any] | Reject]) -> list[dict[str, Any] | Reject]:
    """Give each of several outputs its equal part of the input's share (schemas/shares.py)."""
    if len(outputs) < 2:
        return outputs
    piece = shares.split(shares.share_of(record), len(outputs))
    return [replace(out, share=piece) if isinstance(out, Reject) else {**out, shares.SHARE_KEY: piece} for out in outputs]


def _same(a: Any, b: Any) -> bool:
    """Whether a field kept its value: the same object, or an equal plain value."""
    if a is b:
        return True
    if a is _MISSING or b is _MISSING:
        return False
    try:
        equal = a == b
        return equal if isinstance(equal, bool) else False
    except Exception:  # noqa: BLE001 - arrays compare elementwise: a new array is a write
        return False


def _normalise_labels(record: dict[str, Any], written: Iterable[str]) -> str | None:
    """Normalise the closed-vocabulary fields in `written` in place; the first problem as text."""
    from .labels import LabelError, normalise

    for name in written:
        field = FIELDS_BY_NAME.get(name)
        if field is None or field.allowed is None or record.get(name) is None:
            continue
        try:
            value = record[name]
            if field.kind == STRINGS:
                record[name] = list(dict.fromkeys(normalise(name, v) for v in value))
            else:
                record[name] = normalise(name, value)
        except LabelError as exc:
            return str(exc)
    return None


def run_stages(
    stages: Iterable[Stage],
    records: Iterable[dict[str, Any]],
    *,
    precedence: Iterable[str] = DEFAULT_PRECEDENCE,
    retry: RetryPolicy = RetryPolicy(),
) -> tuple[list[dict], list[Reject]]:
    """Run records through stages in order without Beam (tests, notebooks, the model's data path).

    Each stage is set up first and torn down at the end, and runs under a StageRunner (the
    contract enforced as in a build), on batches of its `batch_size`.
    """
    stages = list(stages)
    for stage in stages:
        stage.setup()
    current = list(records)
    rejects: list[Reject] = []
    try:
        for stage in stages:
            runner = StageRunner(stage, precedence=precedence, retry=retry)
            produced: list[dict] = []
            size = records_per_call(stage.batch_size, stage.max_in_flight)
            for start in range(0, len(current), size):
                for result in runner.run(current[start:start + size]):
                    for out in ([result] if isinstance(result, Reject) else result):
                        (rejects if isinstance(out, Reject) else produced).append(out)
            runner.close()
            current = produced
    finally:
        for stage in stages:
            stage.teardown()
    return current, rejects
