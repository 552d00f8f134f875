"""Age stage: child or adult from pitch where the evidence is clear, else unknown (offline fallback).

Decision on the voiced F0 (`pitch.voiced_f0`, shared with the other stages through `_f0`):
  - median at most `adult_max_hz` (180 Hz): "adult", score `adult_score` (0.6);
  - median at least `child_min_hz` (330 Hz) and a quarter of the voiced frames at least
    `child_min_p25_hz` (280 Hz) above it, i.e. sustained high pitch rather than a few excited
    peaks: "child", score `child_score` (0.5);
  - anything between, or less than `min_voiced_s` of voiced speech: no label (`age` None) and the
    quality flag `age_unknown`.
"old" is never given: pitch does not tell it (espeak-ng's one "old" female variant, f1, listed as
age 70, speaks at a median of 182 Hz where its f4 voice speaks at 181 Hz; real voices' F0 moves
with age, men's up and women's down, into the adult ranges). That is for a model (the wav2vec2
age-gender backend).

Where the thresholds came from.
  - Literature: children's speaking F0 is about 250-300 Hz at school age and above 300 Hz for young
    children, falling towards the adult ranges at puberty; adult men speak around 85-155 Hz and
    women around 165-255 Hz. Before puberty a speaking F0 below 200 Hz is rare, so a median at or
    below 180 Hz (20 Hz of margin) is taken as "not a child". Adult women's and school-age
    children's ranges overlap, which is why most female voices stay unknown.
  - Measured on espeak-ng 1.51, which has no child voice (`espeak-ng --voices=variant` lists ages
    only for f1 and croak, 70, and m8, 50): the 480-file demo corpus (all adult voices, the
    per-emotion prosody raising pitch up to espeak's -p 70) has median F0 of 68-141 Hz for its
    male voices and 129-279 Hz for its female voices, with the 25th percentile at most 246 Hz;
    eight female variants read at -p 70 reach medians of 224-304 Hz (en+Andrea), at -p 85
    263-362 Hz and at -p 99 308-428 Hz. So an adult woman speaking high and excited can pass any
    pitch bound a child can; 330 Hz with a 25th percentile of 280 Hz sits above every demo voice and
    every variant at -p 70, and calls "child" only what espeak reaches near the top of its range.
No child recordings were available here, so the precision of "child" is not measured: its score
is 0.5 (even odds) and a consumer should treat it as a hint. "adult" is wrong for old speakers and
for children with unusually low voices; 0.6 leaves room for a corpus with a third of its
low-pitched speakers old. On the demo corpus (all adults) nothing is called a child
(benchmarks/bench_label_accuracy.py prints the figures).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.stage import HEURISTIC, Reject, Stage

from .flags import add_flag
from .pitch import HOP_LENGTH, SAMPLE_RATE, f0_of, warm_up

MODEL_NAME = "pitch-age-v1"
UNKNOWN_FLAG = "age_unknown"


class PitchAge(Stage):
    name: ClassVar[str] = "age"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "_f0")
    writes: ClassVar[tuple[str, ...]] = ("age", "age_score", "age_model", "_f0", "quality_flags")
    origin: ClassVar[str] = HEURISTIC

    def __init__(
        self,
        adult_max_hz: float = 180.0,
        child_min_hz: float = 330.0,
        child_min_p25_hz: float = 280.0,
        adult_score: float = 0.6,
        child_score: float = 0.5,
        min_voiced_s: float = 0.5,
    ):
        if not 0 < adult_max_hz < child_min_hz:
            raise ValueError(f"need 0 < adult_max_hz ({adult_max_hz}) < child_min_hz ({child_min_hz})")
        if child_min_p25_hz > child_min_hz:
            raise ValueError(f"child_min_p25_hz ({child_min_p25_hz}) exceeds child_min_hz ({child_min_hz})")
        for name, value in (("adult_score", adult_score), ("child_score", child_score)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.adult_max_hz = float(adult_max_hz)
        self.child_min_hz = float(child_min_hz)
        self.child_min_p25_hz = float(child_min_p25_hz)
        self.adult_score = float(adult_score)
        self.child_score = float(child_score)
        self.min_voiced_s = float(min_voiced_s)

    def setup(self) -> None:
        warm_up()

    def describe(self) -> str:
        return MODEL_NAME

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        out = dict(record)
        f0 = f0_of(out)
        decided = None
        if len(f0) * HOP_LENGTH / SAMPLE_RATE >= self.min_voiced_s:
            decided = self.classify(f0)
        if decided is None:
            add_flag(out, UNKNOWN_FLAG)
        else:
            out["age"], out["age_score"] = decided
        yield out

    def classify(self, f0: np.ndarray) -> tuple[str, float] | None:
        """(age, score) from voiced F0 values, or None where pitch does not tell."""
        median = float(np.median(f0))
        if median <= self.adult_max_hz:
            return "adult", self.adult_score
        if median >= self.child_min_hz and float(np.percentile(f0, 25)) >= self.child_min_p25_hz:
            return "child", self.child_score
        return None
