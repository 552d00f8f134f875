"""The contract every stage implements: plain Python over record dicts, no Beam.

A stage is a small class whose constructor arguments are its configuration (so a profile's
`params:` map onto them), that declares the fields it reads and writes, loads its models once in
`setup()`, and turns records into records. A record it cannot handle leaves as a `Reject` with the
stage name, a reason code and the detail: nothing vanishes. `pipelines/` wraps stages in Beam
transforms; tests, benchmarks and notebooks call them directly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Reject:
    """An input file or segment that a stage dropped, and why."""

    source_uri: str
    stage: str
    reason: str  # a short code such as "decode_error", "no_speech", "too_long"
    detail: str  # human-readable: the exception text, the measured value
    segment_start: float | None = None
    segment_end: float | None = None
    id: str | None = None

    @classmethod
    def of(cls, record: dict[str, Any], stage: str, reason: str, detail: str) -> "Reject":
        return cls(
            source_uri=str(record.get("source_uri", "")),
            stage=stage,
            reason=reason,
            detail=str(detail)[:2000],
            segment_start=record.get("segment_start"),
            segment_end=record.get("segment_end"),
            id=record.get("id"),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Stage(ABC):
    """One step of the build: reads some fields, adds some, may split or reject a record.

    Subclasses set `name`, `reads` and `writes`, take their configuration as constructor keyword
    arguments, load heavy models in `setup()` (once per worker), and implement `process` (one
    record) or, for model stages that gain from batching, `process_batch`.
    """

    name: ClassVar[str] = "stage"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    # Model stages set this so the pipeline batches their input (BatchElements).
    batched: ClassVar[bool] = False

    def setup(self) -> None:
        """Load models and other per-worker state. Called once before the first record."""

    def teardown(self) -> None:
        """Release what `setup` took."""

    @abstractmethod
    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        """Yield zero or more output records and/or Rejects for one input record."""

    def process_batch(self, records: list[dict[str, Any]]) -> Iterator[dict[str, Any] | Reject]:
        """Yield the outputs for a batch; the default handles records one at a time."""
        for record in records:
            yield from self.process(record)

    def reject(self, record: dict[str, Any], reason: str, detail: str) -> Reject:
        return Reject.of(record, self.name, reason, detail)

    def describe(self) -> str:
        """Model name written into the `*_model` fields; backends override with their weights."""
        return type(self).__name__


def process_or_reject(stage: Stage, record: dict[str, Any]) -> list[dict[str, Any] | Reject]:
    """The outputs of `stage` for one record, or a single `stage_error` Reject if it raises.

    Outputs yielded before the exception are discarded: a record is either processed or
    rejected, never both, so the run's counts reconcile.
    """
    try:
        return list(stage.process(record))
    except Exception as exc:  # noqa: BLE001 - a bad record must not stop the run
        return [stage.reject(record, "stage_error", f"{type(exc).__name__}: {exc}")]


def run_stages(stages: Iterable[Stage], records: Iterable[dict[str, Any]]) -> tuple[list[dict], list[Reject]]:
    """Run records through stages in order without Beam (tests, notebooks, the model's data path).

    Calls `setup()` on each stage first and `teardown()` at the end. A stage that raises on a
    record rejects that record with reason `stage_error` (see `process_or_reject`).
    """
    stages = list(stages)
    for stage in stages:
        stage.setup()
    current = list(records)
    rejects: list[Reject] = []
    try:
        for stage in stages:
            produced: list[dict] = []
            for record in current:
                for out in process_or_reject(stage, record):
                    (rejects if isinstance(out, Reject) else produced).append(out)
            current = produced
    finally:
        for stage in stages:
            stage.teardown()
    return current, rejects
