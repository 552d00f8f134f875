"""Beam wrapping of a plain-Python `Stage`.

`ApplyStage` builds the stage once per worker (`DoFn.setup`), runs it on single records or on
batches (`BatchElements`) for stages that declare `batched`, sends Rejects to the `rejects`
output, and keeps Beam counters per stage: elements in/out/rejected, microseconds spent and
audio seconds seen, which the run summary reads back. A record on which the stage raises is
rejected with reason `stage_error` (whatever it yielded before raising is discarded, so the record
is counted once), never lost and never fatal to the run.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from echat.schemas.stage import Reject, process_or_reject

REJECTS = "rejects"
METRICS_NAMESPACE = "echat"
_log = logging.getLogger("echat.build")


class StageSpec:
    """What a worker needs to rebuild a stage: picklable, unlike a loaded model."""

    def __init__(self, stage: str, backend: str | None, params: dict[str, Any], factory=None):
        self.stage, self.backend, self.params, self.factory = stage, backend, dict(params), factory

    def build(self):
        if self.factory is not None:
            return self.factory(**self.params)
        from .backends import build_stage

        return build_stage(self.stage, self.backend, self.params)


def counter_name(stage: str, what: str) -> str:
    return f"{stage}.{what}"


class _StageDoFn(beam.DoFn):
    PROGRESS_EVERY_S = 15.0

    def __init__(self, spec: StageSpec):
        self.spec = spec
        name = spec.stage
        self.c_in = Metrics.counter(METRICS_NAMESPACE, counter_name(name, "in"))
        self.c_out = Metrics.counter(METRICS_NAMESPACE, counter_name(name, "out"))
        self.c_rej = Metrics.counter(METRICS_NAMESPACE, counter_name(name, "rejected"))
        self.c_us = Metrics.counter(METRICS_NAMESPACE, counter_name(name, "micros"))
        self.c_audio_ms = Metrics.counter(METRICS_NAMESPACE, counter_name(name, "audio_ms_in"))

    def setup(self):
        self.stage = self.spec.build()
        self.stage.setup()
        self._seen = 0
        self._audio_s = 0.0
        self._busy = 0.0
        self._last_log = time.monotonic()

    def teardown(self):
        stage = getattr(self, "stage", None)
        if stage is not None:
            stage.teardown()

    def _emit(self, outputs):
        for out in outputs:
            if isinstance(out, Reject):
                self.c_rej.inc()
                yield beam.pvalue.TaggedOutput(REJECTS, out.to_dict())
            else:
                self.c_out.inc()
                yield out

    def _run(self, records: list[dict[str, Any]]):
        self.c_in.inc(len(records))
        start = time.perf_counter()
        if len(records) == 1:
            outputs = process_or_reject(self.stage, records[0])
        else:
            try:
                outputs = list(self.stage.process_batch(records))
            except Exception:  # noqa: BLE001 - one bad record must not sink the batch: retry one by one
                outputs = [out for record in records for out in process_or_reject(self.stage, record)]
        spent = time.perf_counter() - start
        self.c_us.inc(int(spent * 1e6))
        audio_s = _audio_seconds(records, outputs)
        self.c_audio_ms.inc(int(audio_s * 1000))
        self._progress(len(records), audio_s, spent)
        return outputs

    def _progress(self, n: int, audio_s: float, spent: float) -> None:
        self._seen += n
        self._audio_s += audio_s
        self._busy += spent
        now = time.monotonic()
        if now - self._last_log >= self.PROGRESS_EVERY_S:
            self._last_log = now
            rate = self._seen / self._busy if self._busy else 0.0
            xrt = self._audio_s / self._busy if self._busy else 0.0
            _log.info("[%s] worker %d: %d elements (%.2f audio hours), %.1f elements/s and %.0fx real time while busy",
                      self.spec.stage, os.getpid(), self._seen, self._audio_s / 3600, rate, xrt)


class _SingleDoFn(_StageDoFn):
    def process(self, record):
        yield from self._emit(self._run([record]))


class _BatchDoFn(_StageDoFn):
    def process(self, batch):
        yield from self._emit(self._run(list(batch)))


class ApplyStage(beam.PTransform):
    """records -> (records, rejects) through one stage."""

    def __init__(self, spec: StageSpec, batched: bool = False, max_batch_size: int = 16):
        super().__init__(label=f"Stage[{spec.stage}]")
        self.spec, self.batched, self.max_batch_size = spec, batched, max_batch_size

    def expand(self, records):
        if self.batched:
            batches = records | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self.max_batch_size)
            result = batches | "Run" >> beam.ParDo(_BatchDoFn(self.spec)).with_outputs(REJECTS, main="records")
        else:
            result = records | "Run" >> beam.ParDo(_SingleDoFn(self.spec)).with_outputs(REJECTS, main="records")
        return result.records, result[REJECTS]


def _audio_seconds(records: list[dict[str, Any]], outputs: list) -> float:
    """Audio a stage handled: its inputs' duration, or for decode (inputs not yet decoded) its outputs'."""
    seconds = sum(float(r.get("duration") or r.get("_source_duration") or 0.0) for r in records)
    if not seconds:
        seconds = sum(float(o.get("_source_duration") or 0.0) for o in outputs if isinstance(o, dict))
    return seconds
