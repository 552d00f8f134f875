"""Quality filters: drop segments that would make bad training samples, with the reason.

Runs after the labelers and metrics, before the (slow, possibly paid) reply and TTS stages, so
nothing is spent on a segment that is dropped. Each bound is optional (None turns it off); a
dropped segment leaves as a Reject whose reason names the filter and whose detail names the
parameter and the measured value:
  min_duration_s      filtered_min_duration            duration shorter than the bound
  max_duration_s      filtered_max_duration            longer
  min_snr_db          filtered_min_snr                 SNR below the bound
  min_speech_ratio    filtered_min_speech_ratio        speech share of the segment below it
  max_clipping_ratio  filtered_clipping                share of clipped samples above it
  min_label_score     filtered_min_<field>_score       a label whose score is below its bound
  require_transcript  filtered_no_transcript           no transcript (the detail lists the flags)
The first failing filter, in this order, names the reject.

`min_label_score` is one number for every label (gender, age, emotion, events, style) or a map
from field to bound, e.g. {gender: 0.8, emotion: 0.4}; `transcript` in the map bounds
`transcript_confidence`. Only a value that is there is judged: an empty label (unknown, as the
pitch gender stage leaves an unclear voice) and a label with no score pass, since dropping what a
labeler declined to guess is `require_*`'s job, not a score bound's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from echat.schemas.stage import Reject, Stage

LABEL_FIELDS = ("gender", "age", "emotion", "events", "style")
SCORE_FIELD = {**{name: f"{name}_score" for name in LABEL_FIELDS}, "transcript": "transcript_confidence"}


class QualityFilter(Stage):
    name = "filter"
    origin = "heuristic"
    reads = ("duration", "snr_db", "speech_ratio", "clipping_ratio", "transcript", "quality_flags",
             *LABEL_FIELDS, *SCORE_FIELD.values())
    writes = ()

    def __init__(
        self,
        min_duration_s: float | None = 0.5,
        max_duration_s: float | None = 30.0,
        min_snr_db: float | None = None,
        min_speech_ratio: float | None = None,
        max_clipping_ratio: float | None = 0.05,
        require_transcript: bool = True,
        min_label_score: float | dict[str, float] | None = None,
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
        self.min_label_score = min_label_score
        self.score_bounds = _score_bounds(min_label_score)

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
            return "filtered_min_duration", f"duration {duration:.2f} s < min_duration_s {self.min_duration_s} s"
        if self.max_duration_s is not None and duration is not None and duration > self.max_duration_s:
            return "filtered_max_duration", f"duration {duration:.2f} s > max_duration_s {self.max_duration_s} s"
        snr = record.get("snr_db")
        if self.min_snr_db is not None and snr is not None and snr < self.min_snr_db:
            return "filtered_min_snr", f"snr {snr:.1f} dB < min_snr_db {self.min_snr_db} dB"
        ratio = record.get("speech_ratio")
        if self.min_speech_ratio is not None and ratio is not None and ratio < self.min_speech_ratio:
            return "filtered_min_speech_ratio", f"speech ratio {ratio:.2f} < min_speech_ratio {self.min_speech_ratio}"
        clipping = record.get("clipping_ratio")
        if self.max_clipping_ratio is not None and clipping is not None and clipping > self.max_clipping_ratio:
            return "filtered_clipping", f"clipping ratio {clipping:.4f} > max_clipping_ratio {self.max_clipping_ratio}"
        for field, bound in self.score_bounds.items():
            value, score = record.get(field), record.get(SCORE_FIELD[field])
            if value is None or (field == "transcript" and not str(value).strip()) or score is None:
                continue
            if score < bound:
                return (f"filtered_min_{field}_score",
                        f"{SCORE_FIELD[field]} {score:.3f} < min_label_score.{field} {bound} ({field}: {value})")
        if self.require_transcript and not (record.get("transcript") or "").strip():
            flags = ", ".join(record.get("quality_flags") or []) or "no transcript"
            return "filtered_no_transcript", f"require_transcript: {flags}"
        return None


def _score_bounds(min_label_score: float | dict[str, float] | None) -> dict[str, float]:
    """{field: bound} from the parameter: None -> {}, a number -> every label, a map -> as given."""
    if min_label_score is None:
        return {}
    if isinstance(min_label_score, bool):
        raise ValueError("min_label_score must be a number, a map of field -> number, or null")
    if isinstance(min_label_score, (int, float)):
        bounds = {field: float(min_label_score) for field in LABEL_FIELDS}
    elif isinstance(min_label_score, dict):
        unknown = sorted(set(min_label_score) - set(SCORE_FIELD))
        if unknown:
            raise ValueError(f"min_label_score names unknown field(s) {unknown}; known: {', '.join(SCORE_FIELD)}")
        bounds = {}
        for field, bound in min_label_score.items():
            if isinstance(bound, bool) or not isinstance(bound, (int, float)):
                raise ValueError(f"min_label_score.{field} must be a number, got {bound!r}")
            bounds[field] = float(bound)
    else:
        raise ValueError(f"min_label_score must be a number, a map of field -> number, or null; got {min_label_score!r}")
    for field, bound in bounds.items():
        if not 0.0 <= bound <= 1.0:
            raise ValueError(f"min_label_score.{field} must be within 0-1, got {bound}")
    return bounds
