"""Decode stage: one input file -> its waveform as 16 kHz mono float32.

Reads `source_uri` (a local path, or a URI such as gs://... opened through fsspec), or `_audio_bytes` when a source hands over the file's bytes
instead (a Hugging Face audio column, an object-store blob). Writes:
  `_waveform`            np.float32, mono, 16 kHz (channels averaged, resampled with soxr VHQ)
  `sampling_rate`        16000
  `_source_duration`, `_source_channels`, `_source_sample_rate`  what the file itself held
Segment bounds and `id` are left to the VAD: a record without `segment_start` is a whole file, and
the run summary counts a reject without one as a file-level reject.

Reject reason codes:
  missing_file       the path does not exist (or is not a regular file)
  empty_file         0 bytes, or a valid header with 0 frames
  decode_error       neither libsndfile nor FFmpeg can read it (corrupt, a text file named .wav...)
  truncated          fewer frames than the header declares: libsndfile silently shortens a cut-off
                     WAV, so its data-chunk size is checked against the bytes present; for other
                     formats a decode that fails part-way or ends early counts (so a file corrupted
                     mid-stream is also reported here, with the frame counts in the detail)
  too_long           longer than `max_file_seconds`, decided from the header before reading samples
  too_many_channels  more than `max_channels`: taken for a mislabelled raw or multitrack file
  non_finite_samples the waveform holds NaN or infinite samples (a float WAV can store them); they
                     would pass for silence in the peak test and make librosa refuse the segment later
  silent             the mono waveform's peak is below `silence_peak_dbfs` (digital silence)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.audio import RESAMPLE_QUALITY, AudioError, load_audio, peak_dbfs
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject, Stage

AUDIO_BYTES_KEY = "_audio_bytes"
# Where a source says the file is: text, or bytes for a name that is not UTF-8; `source_uri` is
# relative to the input root.
SOURCE_PATH_KEY = "_source_path"


class DecodeAudio(Stage):
    name: ClassVar[str] = "decode"
    reads: ClassVar[tuple[str, ...]] = ("source_uri", SOURCE_PATH_KEY, AUDIO_BYTES_KEY)
    writes: ClassVar[tuple[str, ...]] = (
        "_waveform",
        "sampling_rate",
        "_source_duration",
        "_source_channels",
        "_source_sample_rate",
        AUDIO_BYTES_KEY,  # dropped once decoded: the waveform replaces it
    )

    def __init__(
        self,
        max_file_seconds: float = 3600.0,
        max_channels: int = 8,
        silence_peak_dbfs: float = -70.0,
        resample_quality: str = RESAMPLE_QUALITY,
    ):
        if max_file_seconds <= 0:
            raise ValueError(f"max_file_seconds must be positive, got {max_file_seconds}")
        if max_channels < 1:
            raise ValueError(f"max_channels must be at least 1, got {max_channels}")
        if resample_quality not in ("QQ", "LQ", "MQ", "HQ", "VHQ"):
            raise ValueError(f"resample_quality must be one of soxr's QQ/LQ/MQ/HQ/VHQ, got {resample_quality!r}")
        self.max_file_seconds = float(max_file_seconds)
        self.max_channels = int(max_channels)
        self.silence_peak_dbfs = float(silence_peak_dbfs)
        self.resample_quality = resample_quality

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        source = record.get(AUDIO_BYTES_KEY)
        if source is None:
            source = record.get(SOURCE_PATH_KEY) or record.get("source_uri")
            if isinstance(source, bytes):  # a file name that is not UTF-8, as the file system spells it
                source = os.fsdecode(source)
            if not source:
                yield self.reject(record, "missing_file", "record has neither source_uri nor audio bytes")
                return
        try:
            decoded = load_audio(
                source,
                target_sample_rate=SAMPLE_RATE,
                max_seconds=self.max_file_seconds,
                max_channels=self.max_channels,
                quality=self.resample_quality,
            )
        except AudioError as exc:
            # Rejects are published: name the file as the record does, not by this machine's path.
            detail = exc.detail.replace(str(source), str(record.get("source_uri"))) if isinstance(source, str) else exc.detail
            yield self.reject(record, exc.reason, detail)
            return

        # `load_audio` has already resampled, but no sample can get lost that way: a NaN or an
        # infinity entering soxr's linear filter comes out as NaN in every output it touches, so
        # checking the 16 kHz samples catches every non-finite sample of the file.
        finite = np.isfinite(decoded.waveform)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            first = int(np.argmin(finite)) / SAMPLE_RATE
            yield self.reject(
                record, "non_finite_samples",
                f"{bad} of {finite.size} samples at {SAMPLE_RATE} Hz are NaN or infinite, the first at {first:.3f} s "
                f"(source {decoded.source_sample_rate} Hz)",
            )
            return

        peak = peak_dbfs(decoded.waveform)
        if peak < self.silence_peak_dbfs:
            yield self.reject(record, "silent", f"peak {peak:.1f} dBFS < {self.silence_peak_dbfs:.1f} dBFS")
            return

        out = dict(record)
        out.pop(AUDIO_BYTES_KEY, None)  # the file's bytes are not needed once decoded
        out.update(
            _waveform=decoded.waveform,
            sampling_rate=SAMPLE_RATE,
            _source_duration=decoded.source_duration,
            _source_channels=decoded.source_channels,
            _source_sample_rate=decoded.source_sample_rate,
        )
        yield out
