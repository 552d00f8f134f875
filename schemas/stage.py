"""The contract every stage implements: plain Python over record dicts, no Beam.

A stage is a small class whose constructor arguments are its configuration (a profile entry's
`params:` map onto them). It declares:
  name           its default slot name; the profile's slot replaces it (`slot`), and the slot is the
                 name used everywhere: counters, rejects, the summary
  reads, writes  the fields it reads and the fields it adds, changes or removes (working keys that
                 start with `_` included). The runner checks every output against `writes`.
  clears         label groups it may empty but never fills (VAD empties a file's transcript on the
                 pieces of a file it splits): allowed whatever source holds them, and not a
                 reason for precedence to skip the stage
  origin         what kind of source its labels are ("model" or "heuristic"): the profile's
                 precedence decides which source wins a field (manifest, model, heuristic)
  batch_size     records per `process_batch` call (a class default the profile can override)
  max_in_flight  for I/O-bound stages (HTTP, subprocesses): records processed concurrently, by
                 `process_one` in threads; a stage that sets it above 1 is thread-safe by that
  splits         whether one input may become several records (VAD, diarization)
It loads its models once in `setup()` and turns each input into one `Result`:
  - a list of outputs: zero, one or several records, and Rejects of pieces it cut off (a VAD
    segment too short to keep); each output knows its parent through the runner's lineage keys
  - or a single `Reject`: this input is dropped, with a reason code and the detail.
A permanent failure is a Reject; a transient one (HTTP 429/5xx, a timeout) raises
`TransientError`, and the runner retries that record alone, with backoff, a bounded number of
times. `pipelines/` wraps stages in Beam transforms; tests, benchmarks and notebooks use
`stage_runner.run_stages`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Union

from echat.schemas.shares import SHARE_KEY

# Origins of a field's value, as the profile's precedence names them.
MANIFEST, MODEL, HEURISTIC = "manifest", "model", "heuristic"
ORIGINS = (MANIFEST, MODEL, HEURISTIC)


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
    share: str | None = None  # the part of its input it stands for (schemas/shares.py); None: all of it

    @classmethod
    def of(cls, record: dict[str, Any], stage: str, reason: str, detail: str) -> "Reject":
        return cls(
            source_uri=_text(record.get("source_uri", "")),
            stage=stage,
            reason=reason,
            detail=_text(detail)[:2000],
            segment_start=record.get("segment_start"),
            segment_end=record.get("segment_end"),
            id=record.get("id"),
            share=record.get(SHARE_KEY),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(value: Any) -> str:
    """Valid UTF-8 text: a rejects file must be writable whatever a file name or message held."""
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


# What a stage returns for one input: its outputs (records and Rejects of pieces), or its Reject.
Result = Union[list[Union[dict[str, Any], Reject]], Reject]


class TransientError(Exception):
    """A failure that may pass if tried again (rate limit, server error, timeout).

    `retry_after` (seconds), when the peer said how long to wait, replaces the backoff delay.
    """

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class Stage(ABC):
    """One step of the build: reads some fields, writes some, may split or reject a record.

    Subclasses set the class attributes described in the module docstring, take their
    configuration as constructor keyword arguments, load heavy models in `setup()` (once per
    worker), and implement `process` (one record) or, for stages that gain from batching,
    `process_batch`.
    """

    name: ClassVar[str] = "stage"
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    clears: ClassVar[tuple[str, ...]] = ()
    origin: ClassVar[str] = MODEL
    batch_size: ClassVar[int] = 1
    max_in_flight: ClassVar[int] = 1
    splits: ClassVar[bool] = False
    # Whether one instance may serve several threads at once (a worker process shares one loaded
    # instance between its threads; the runner serialises calls to a stage that is not).
    thread_safe: ClassVar[bool] = False

    # The profile's slot name for this instance; set by whoever builds it from a profile.
    slot: str | None = None

    @property
    def slot_name(self) -> str:
        return self.slot or self.name

    def setup(self) -> None:
        """Load models and other per-worker state. Called once before the first record."""

    def teardown(self) -> None:
        """Release what `setup` took."""

    @abstractmethod
    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        """Yield the outputs for one input record, or yield exactly one Reject of the input.

        Raise `TransientError` for a failure worth retrying; any other exception rejects the
        record with reason `stage_error`.
        """

    def process_batch(self, records: list[dict[str, Any]]) -> list[Result | BaseException]:
        """One result per input, in order. The default runs `process` on each record alone.

        An override that batches model calls must keep a bad record from sinking its neighbours:
        return the exception in that record's place (the runner turns it into a Reject, or retries
        it if it is transient) and results for the others. An exception raised out of
        `process_batch` itself rejects (or, if transient, retries) the whole batch.
        """
        return [self.process_one(record) for record in records]

    def process_one(self, record: dict[str, Any]) -> Result | BaseException:
        """`process` on one record as a Result; an exception is returned in its place."""
        try:
            return as_result(list(self.process(record)))
        except Exception as exc:  # noqa: BLE001 - one bad record must not stop the run
            return exc

    def reject(self, record: dict[str, Any], reason: str, detail: str) -> Reject:
        return Reject.of(record, self.slot_name, reason, detail)

    def describe(self) -> str:
        """Name of the model or method; the runner writes it into the `*_model` fields."""
        return type(self).__name__

    def usage(self) -> dict[str, int]:
        """Running totals of what the stage spent (requests, tokens, cost in micro-dollars...).

        Whole numbers, since they become counters; the run summary shows them per slot.
        """
        return {}


class BatchedStage(Stage):
    """A stage whose natural unit is a batch (one model call over many records): it implements
    `process_batch`, and `process` on one record is that batch of one."""

    @abstractmethod
    def process_batch(self, records: list[dict[str, Any]]) -> list[Result | BaseException]:
        """One result per input, in order (see `Stage.process_batch`)."""

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        (result,) = self.process_batch([record])
        if isinstance(result, BaseException):
            raise result
        yield from ([result] if isinstance(result, Reject) else result)


def as_result(outputs: list[dict[str, Any] | Reject]) -> Result:
    """What `process` yielded, as a Result: a lone Reject of the input itself is the input's Reject."""
    if len(outputs) == 1 and isinstance(outputs[0], Reject):
        return outputs[0]
    return outputs
