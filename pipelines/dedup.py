"""Deduplication steps (profile `dedup:`): identical audio, and a transcript repeated within a source.

Each is a whole-corpus decision, so it is not a per-record Stage: every record's key (the hash of
its decoded 16 kHz audio; or its source and normalised transcript) is grouped, the first record of
each group by (source_uri, segment start, id) is kept, and the others leave on the rejects output
(`duplicate_audio`, `duplicate_transcript`) naming the one that was kept. Only the small keys are
grouped, not the audio; the list of losers reaches the filter as a side input. The step counts and
tallies like a stage under its slot name, so the lineage reconciliation holds through it.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any, Callable

import apache_beam as beam
from apache_beam.metrics import Metrics

from echat.schemas.stage import Reject

from .stage_transform import METRICS_NAMESPACE, REJECTS, TALLIES, counter_name

AUDIO_SLOT, TRANSCRIPT_SLOT = "dedup_audio", "dedup_transcripts"


def audio_key(record: dict[str, Any]) -> str | None:
    waveform = record.get("_waveform")
    if waveform is None:
        return None
    import numpy as np

    return hashlib.sha1(np.ascontiguousarray(waveform, dtype=np.float32).tobytes()).hexdigest()


def transcript_key(record: dict[str, Any]) -> str | None:
    text = " ".join(re.sub(r"[^\w\s]", " ", (record.get("transcript") or "").lower()).split())
    return f"{record.get('source_uri')}|{text}" if text else None


def _identity(record: dict[str, Any]) -> str:
    return str(record.get("id") or record.get("source_uri"))


def _order(record: dict[str, Any]) -> tuple:
    return (str(record.get("source_uri")), float(record.get("segment_start") or 0.0), _identity(record))


def _losers(item) -> list[tuple[str, str]]:
    _, members = item
    ranked = sorted(members)
    kept = ranked[0]
    return [(member[2], f"{kept[0]} at {kept[1]:.2f} s" if kept[1] else kept[0]) for member in ranked[1:]]


class _DropListed(beam.DoFn):
    def __init__(self, slot: str, reason: str, what: str):
        self.slot, self.reason, self.what = slot, reason, what
        self.c_in = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "in"))
        self.c_out = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "out"))
        self.c_rej = Metrics.counter(METRICS_NAMESPACE, counter_name(slot, "rejected"))

    def process(self, record, losers: dict[str, str]):
        tally = Counter({f"in:{self.slot}": 1})
        self.c_in.inc()
        kept = losers.get(_identity(record))
        if kept is not None:
            tally[f"rejected:{self.slot}"] += 1
            self.c_rej.inc()
            yield beam.pvalue.TaggedOutput(REJECTS, Reject.of(record, self.slot, self.reason, f"{self.what} {kept}").to_dict())
        else:
            tally.update({f"parents:{self.slot}": 1, f"out:{self.slot}": 1})
            self.c_out.inc()
            yield record
        yield beam.pvalue.TaggedOutput(TALLIES, (str(record.get("source_uri", "")), tally))


class Dedup(beam.PTransform):
    """records -> (records, rejects, tallies): the first of each group of equal keys is kept."""

    def __init__(self, slot: str, key_of: Callable[[dict], str | None], reason: str, what: str):
        super().__init__(label=f"Dedup[{slot}]")
        self.slot, self.key_of, self.reason, self.what = slot, key_of, reason, what

    def expand(self, records):
        key_of = self.key_of
        losers = (
            records
            | "Keys" >> beam.FlatMap(lambda r: [(key, _order(r))] if (key := key_of(r)) is not None else [])
            | "Group" >> beam.GroupByKey()
            | "Losers" >> beam.FlatMap(_losers)
        )
        result = records | "Drop" >> beam.ParDo(
            _DropListed(self.slot, self.reason, self.what), beam.pvalue.AsDict(losers)
        ).with_outputs(REJECTS, TALLIES, main="records")
        return result.records, result[REJECTS], result[TALLIES]


STEPS = {
    "audio": (AUDIO_SLOT, audio_key, "duplicate_audio", "the same audio as"),
    "transcripts": (TRANSCRIPT_SLOT, transcript_key, "duplicate_transcript", "the same transcript as"),
}
