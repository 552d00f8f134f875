"""The last stage before the sink: a working record becomes a row of the record schema.

Encodes the user's and the reply's waveforms as FLAC inside the Hugging Face audio struct, stamps
the schema and pipeline versions, and drops working keys (all but the row's share of its input,
schemas/shares.py, which the shard writer drops). A record that does not fit the schema
(a required field missing) is rejected here with the field named.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from echat import __version__
from echat.schemas import record as rec
from echat.schemas.shares import SHARE_KEY
from echat.schemas.stage import Reject, Stage
from echat.schemas.tasks import record_task  # the task tag a row serves, from what it holds


class EncodeRow(Stage):
    name = "encode"
    reads = ("_waveform", "_reply_waveform")
    # A row holds the schema's columns only: every working key (`_*`) is dropped here.
    writes = ("audio", "sampling_rate", "duration", "reply_audio", "reply_duration", "task", "schema_version",
              "pipeline_version", "_*")

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        from echat.schemas.audio import encode_flac

        row = dict(record)
        waveform = row.get("_waveform")
        if waveform is None or len(waveform) == 0:
            yield self.reject(record, "no_audio", "segment has no waveform to encode")
            return
        row["audio"] = {"bytes": encode_flac(waveform, rec.SAMPLE_RATE), "path": f"{row['id']}.flac"}
        row["sampling_rate"] = rec.SAMPLE_RATE
        row["duration"] = float(len(waveform) / rec.SAMPLE_RATE)
        reply = row.get("_reply_waveform")
        if reply is not None and len(reply):
            row["reply_audio"] = {"bytes": encode_flac(reply, rec.SAMPLE_RATE), "path": f"{row['id']}-reply.flac"}
            row["reply_duration"] = float(len(reply) / rec.SAMPLE_RATE)
        row["task"] = record_task(row)
        row["schema_version"] = rec.SCHEMA_VERSION
        row["pipeline_version"] = __version__
        try:
            encoded = rec.to_row(row)
        except ValueError as exc:
            yield self.reject(record, "schema_error", str(exc))
            return
        if record.get(SHARE_KEY):  # kept until the shards: a resumed build tells finished inputs by it
            encoded[SHARE_KEY] = record[SHARE_KEY]
        yield encoded


def row_bytes(row: dict[str, Any]) -> int:
    """Approximate size of a row in a shard: its audio bytes dominate everything else."""
    size = 2048
    for name in rec.AUDIO_FIELDS:
        audio = row.get(name)
        if audio and audio.get("bytes"):
            size += len(audio["bytes"])
    return size
