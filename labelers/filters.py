"""Quality filters: drop segments that would make bad training samples, with the reason.

Runs after the labelers and metrics, before the (slow, possibly paid) reply and TTS stages, so
nothing is spent on a segment that is dropped. Each bound is optional (None turns it off); a
dropped segment leaves as a Reject with reason `filtered_<bound>` and the measured value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from echat.schemas.stage import Reject, Stage


class QualityFilter(Stage):
    name = "filter"
    origin = "heuristic"
    reads = ("duration", "snr_db", "speech_ratio", "clipping_ratio", "transcript", "quality_flags")
    writes = ()

    def __init__(
        self,
        min_duration_s: float | None = 0.5,
        max_duration_s: float | None = 30.0,
        min_snr_db: float | None = None,
        min_speech_ratio: float | None = None,
        max_clipping_ratio: float | None = 0.05,
        require_transcript: bool = True,
    ) -> None:
        for name, value in (("min_duration_s", min_duration_s), ("max_duration_s", max_duration_s),
                            ("min_speech_ratio", min_speech_ratio), ("max_clipping_ratio", max_clipping_ratio)):
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if min_duration_s is not None and max_duration_s is not None and min_duration_s > max_duration_s:
            raise ValueError(f"min_duration_s ({min_duration_s}) exceeds max_duration_s ({max_duration_s}): "
                             "every segment would be rejected")
        self.min_duration_s = min_duration_s
        self.max_duration_s = max_duration_s
        self.min_snr_db = min_snr_db
        self.min_speech_ratio = min_speech_ratio
        self.max_clipping_ratio = max_clipping_ratio
        self.require_transcript = require_transcript

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        problem = self._problem(record)
        if problem:
            reason, detail = problem
            yield self.reject(record, reason, detail)
        else:
            yield record

    def _problem(self, record: dict[str, Any]) -> tuple[str, str] | None:
        duration = record.get("duration")
        if self.min_duration_s is not None and duration is not None and duration < self.min_duration_s:
            return "filtered_min_duration", f"duration {duration:.2f}s < {self.min_duration_s}s"
        if self.max_duration_s is not None and duration is not None and duration > self.max_duration_s:
            return "filtered_max_duration", f"duration {duration:.2f}s > {self.max_duration_s}s"
        snr = record.get("snr_db")
        if self.min_snr_db is not None and snr is not None and snr < self.min_snr_db:
            return "filtered_min_snr", f"snr {snr:.1f} dB < {self.min_snr_db} dB"
        ratio = record.get("speech_ratio")
        if self.min_speech_ratio is not None and ratio is not None and ratio < self.min_speech_ratio:
            return "filtered_min_speech_ratio", f"speech ratio {ratio:.2f} < {self.min_speech_ratio}"
        clipping = record.get("clipping_ratio")
        if self.max_clipping_ratio is not None and clipping is not None and clipping > self.max_clipping_ratio:
            return "filtered_clipping", f"clipping ratio {clipping:.4f} > {self.max_clipping_ratio}"
        if self.require_transcript and not (record.get("transcript") or "").strip():
            flags = ", ".join(record.get("quality_flags") or []) or "no transcript"
            return "filtered_no_transcript", flags
        return None
