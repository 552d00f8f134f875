"""Beam wrapping of a plain-Python `Stage` under its `StageRunner` (schemas/stage_runner.py).

`ApplyStage` turns records into three outputs: the stage's records, its rejects, and per-source
tallies (inputs, inputs that produced something, outputs, rejects, by slot) from which the summary
reconciles every source whatever the stages split or drop. The loaded stage is shared by every
thread of a worker process (Beam's `Shared`), batches are cut to the stage's `batch_size`, and a
stage with resource hints runs after a Reshuffle so a runner cannot fuse it with the CPU stages
before it. Beam counters per slot: in, out, rejected, skipped, retried, busy microseconds, audio.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import Counter
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils import shared

from echat.schemas.stage import Reject
from echat.schemas.stage_runner import DEFAULT_PRECEDENCE, RetryPolicy, StageRunner, records_per_call

from . import progress

REJECTS = "rejects"
TALLIES = "tallies"
METRICS_NAMESPACE = "echat"


class StageSpec:
    """What a worker needs to rebuild a stage: picklable, unlike a loaded model."""

    def __init__(
        self,
        slot: str,
        class_path: str | None,
        params: dict[str, Any],
        *,
        factory=None,
        batch_size: int | None = None,
        max_in_flight: int | None = None,
        retry: RetryPolicy = RetryPolicy(),
        precedence: tuple[str, ...] = DEFAULT_PRECEDENCE,
        resources: dict[str, Any] | None = None,
    ):
        self.slot, self.class_path, self.params, self.factory = slot, class_path, dict(params), factory
        self.batch_size, self.max_in_flight = batch_size, max_in_flight
        self.retry, self.precedence, self.resources = retry, tuple(precedence), dict(resources or {})

    def stage_class(self) -> type:
        if self.factory is not None:
            return self.factory
        from .backends import load_class

        return load_class(self.class_path)

    def build(self):
        """A configured, not yet set-up, stage with this slot's name and overrides."""
        stage = self.stage_class()(**self.params)
        stage.slot = self.slot
        if self.batch_size is not None:
            stage.batch_size = self.batch_size
        if self.max_in_flight is not None:
            stage.max_in_flight = self.max_in_flight
        return stage

    @property
    def splits(self) -> bool:
        return bool(getattr(self.stage_class(), "splits", False))

    def records_per_call(self) -> int:
        cls = self.stage_class()
        size = self.batch_size or cls.batch_size
        in_flight = self.max_in_flight or cls.max_in_flight
        return records_per_call(size, in_flight)


def counter_name(slot: str, what: str) -> str:
    return f"{slot}.{what}"


class _LoadedStage:
    """A set-up stage as Beam's Shared holds it (weak-referenceable), torn down when released."""

    def __init__(self, spec: StageSpec):
        started = time.perf_counter()
        self.stage = spec.build()
        self.stage.setup()
        self.setup_seconds = time.perf_counter() - started
        self.setup_counted = False  # the first DoFn to see it adds its setup time to the counter
        self.lock = threading.Lock()  # the threads sharing this stage share its lock too
        self.usage_seen: Counter = Counter()  # what of the stage's usage totals is already counted
        weakref.finalize(self, self.stage.teardown)


class _StageDoFn(beam.DoFn):
    def __init__(self, spec: StageSpec, progress_dir: str | None):
        self.spec = spec
        self.progress_dir = progress_dir
        self._shared = shared.Shared()
        slot = spec.slot
        self.c_in = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "in"))
        self.c_out = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "out"))
        self.c_rej = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "rejected"))
        self.c_skip = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "skipped"))
        self.c_retry = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "retried"))
        self.c_us = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "micros"))
        self.c_audio_ms = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "audio_ms_in"))
        self.c_setup_us = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "setup_micros"))

    def setup(self):
        spec = self.spec
        # One loaded stage per worker process, whatever the number of threads or DoFn copies.
        self._loaded = self._shared.acquire(lambda: _LoadedStage(spec), tag=(spec.slot, spec.class_path, repr(spec.params)))
        self.runner = StageRunner(self._loaded.stage, precedence=spec.precedence, retry=spec.retry, lock=self._loaded.lock)

    def process(self, batch):
        if not self._loaded.setup_counted:  # counters count inside bundles only, so here, not in setup()
            with self._loaded.lock:
                if not self._loaded.setup_counted:
                    self._loaded.setup_counted = True
                    self.c_setup_us.inc(int(self._loaded.setup_seconds * 1e6))
        records = list(batch)
        self.c_in.inc(len(records))
        before = (self.runner.stats.skipped, self.runner.stats.attempts_retried)
        start = time.perf_counter()
        results = self.runner.run(records)
        spent = time.perf_counter() - start
        self.c_us.inc(int(spent * 1e6))
        self.c_skip.inc(self.runner.stats.skipped - before[0])
        self.c_retry.inc(self.runner.stats.attempts_retried - before[1])
        audio_s = _audio_seconds(records, results)
        self.c_audio_ms.inc(int(audio_s * 1000))
        self._count_usage()

        tallies: dict[str, Counter] = {}
        n_out = 0
        for record, result in zip(records, results):
            tally = tallies.setdefault(str(record.get("source_uri", "")), Counter())
            tally[f"in:{self.spec.slot}"] += 1
            if isinstance(result, Reject):
                tally[f"rejected:{self.spec.slot}"] += 1
                self.c_rej.inc()
                yield beam.pvalue.TaggedOutput(REJECTS, result.to_dict())
                continue
            tally[f"parents:{self.spec.slot}"] += 1
            for out in result:
                if isinstance(out, Reject):
                    tally[f"pieces_rejected:{self.spec.slot}"] += 1
                    self.c_rej.inc()
                    yield beam.pvalue.TaggedOutput(REJECTS, out.to_dict())
                else:
                    tally[f"out:{self.spec.slot}"] += 1
                    n_out += 1
                    self.c_out.inc()
                    yield out
        for uri, tally in tallies.items():
            yield beam.pvalue.TaggedOutput(TALLIES, (uri, tally))
        if self.progress_dir:
            progress.report(self.progress_dir, self.spec.slot, len(records), n_out, audio_s, spent)

    def _count_usage(self) -> None:
        # The stage keeps running totals; the counters get what was added since they were last
        # read (by this thread or another sharing the stage), so the sum over batches is exact.
        loaded = self._loaded
        with loaded.lock:
            totals = Counter(loaded.stage.usage())
            seen = loaded.usage_seen
            for name, total in totals.items():
                delta = int(total) - seen[name]
                if delta:
                    Metrics.counter(METRICS_NAMESPACE, counter_name(self.spec.slot, f"usage.{name}")).inc(delta)
                    seen[name] = int(total)

    def finish_bundle(self):
        if self.progress_dir:
            progress.flush(self.progress_dir)

    def teardown(self):
        runner = getattr(self, "runner", None)
        if runner is not None:
            runner.close()


class ApplyStage(beam.PTransform):
    """records -> (records, rejects, tallies) through one stage."""

    def __init__(self, spec: StageSpec, progress_dir: str | None = None):
        super().__init__(label=f"Stage[{spec.slot}]")
        self.spec, self.progress_dir = spec, progress_dir

    def expand(self, records):
        size = self.spec.records_per_call()
        if self.spec.resources:
            records = records | "Unfuse" >> beam.Reshuffle()
        if size > 1:
            batches = records | "Batch" >> beam.BatchElements(min_batch_size=size, max_batch_size=size)
        else:
            batches = records | "One" >> beam.Map(lambda r: [r])
        run = beam.ParDo(_StageDoFn(self.spec, self.progress_dir))
        if self.spec.resources:
            run = run.with_resource_hints(**self.spec.resources)
        result = batches | "Run" >> run.with_outputs(REJECTS, TALLIES, main="records")
        return result.records, result[REJECTS], result[TALLIES]


def _audio_seconds(records: list[dict[str, Any]], results: list) -> float:
    """Audio a stage handled: its inputs' duration, or for decode (inputs not yet decoded) its outputs'."""
    seconds = sum(float(r.get("duration") or r.get("_source_duration") or 0.0) for r in records)
    if not seconds:
        for result in results:
            if isinstance(result, list):
                seconds += sum(float(o.get("_source_duration") or 0.0) for o in result if isinstance(o, dict))
    return seconds
