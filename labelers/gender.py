"""Gender stage: male or female from the speaker's median F0 (offline fallback, not a model).

Decision: median voiced F0 below `threshold_hz` -> male, else female. The median rather than the
mean, because pitch trackers make octave errors (a male voice read an octave up on some frames)
that drag a mean but not a median.

Where the threshold came from. Median F0 measured with `pitch.voiced_f0` on one English sentence
and one Mandarin sentence (cmn-latn-pinyin) read by 28 espeak-ng 1.51 voices (variants m1-m7,
klatt, david, john, grandpa, max, Michael, robert, paul; f1-f5, Alicia, Andrea, Annie, linda,
steph, anika, aunty, belinda):
  male voices    69-107 Hz (English 75-107, Mandarin 69-96)
  female voices  161-273 Hz (English 173-273, Mandarin 161-240; cmn+f4 and cmn+f1 lowest at 161)
Studies of adult speech put male speaking F0 around 85-155 Hz and female around 165-255 Hz, with
the usual cut-off near 160-165 Hz; that cut-off would call two of the espeak female voices male.
150 Hz separates every voice measured and sits close to the geometric midpoint of typical adult
male and female F0 (about 120 and 210 Hz -> 159 Hz). Children and high-pitched male voices are
called female by any pitch rule; the score says how far from the threshold the voice was.

`gender_score` is 0.5 at the threshold and rises with the distance in octaves d:
0.5 + 0.45 * tanh(d / 0.35), so half an octave away (106 or 212 Hz around 150) gives about 0.90,
and it never exceeds 0.95: pitch alone classifies adult voices right roughly 90-95% of the time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.stage import HEURISTIC, Reject, Stage

from .flags import add_flag
from .pitch import HOP_LENGTH, SAMPLE_RATE, f0_of, warm_up

MODEL_NAME = "pitch-threshold-v1"
UNKNOWN_FLAG = "gender_unknown"


class PitchGender(Stage):
    name: ClassVar[str] = "gender"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "_f0")
    # gender_model is stamped by the runner from describe(); a gender already held by a better
    # source (the manifest, a model) is the runner's to keep: it skips the record.
    writes: ClassVar[tuple[str, ...]] = ("gender", "gender_score", "gender_model", "_f0", "quality_flags")
    origin: ClassVar[str] = HEURISTIC

    def __init__(self, threshold_hz: float = 150.0, min_voiced_s: float = 0.3, max_score: float = 0.95):
        if threshold_hz <= 0:
            raise ValueError(f"threshold_hz must be positive, got {threshold_hz}")
        if not 0.5 <= max_score <= 1.0:
            raise ValueError(f"max_score must be in [0.5, 1], got {max_score}")
        self.threshold_hz = float(threshold_hz)
        self.min_voiced_s = float(min_voiced_s)
        self.max_score = float(max_score)

    def setup(self) -> None:
        warm_up()

    def describe(self) -> str:
        return MODEL_NAME

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        out = dict(record)
        f0 = f0_of(out)
        voiced_s = len(f0) * HOP_LENGTH / SAMPLE_RATE
        if voiced_s < self.min_voiced_s:
            add_flag(out, UNKNOWN_FLAG)
            yield out
            return
        gender, score = self.classify(float(np.median(f0)))
        out.update(gender=gender, gender_score=score)
        yield out

    def classify(self, median_f0_hz: float) -> tuple[str, float]:
        """(gender, score) for a median F0."""
        octaves = math.log2(median_f0_hz / self.threshold_hz)
        score = min(self.max_score, 0.5 + 0.45 * math.tanh(abs(octaves) / 0.35))
        return ("male" if octaves < 0 else "female"), float(score)
