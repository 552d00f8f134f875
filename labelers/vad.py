"""VAD stage: cut a decoded file into speech segments with silero-vad.

One input record (a whole file) becomes one record per speech segment:
  1. silero-vad finds speech spans (`threshold`; pauses shorter than `min_silence_s` do not end
     speech; blips shorter than `min_speech_s` are ignored; spans longer than the segment budget are
     cut by silero itself at its longest pause near the limit).
  2. Neighbouring spans closer than `merge_gap_s` are merged, as long as the result still fits in
     `max_segment_s` with its padding.
  3. A span still too long (continuous speech) is split at its quietest 10 ms frame.
  4. Each segment is padded by `pad_s` on both sides, never past the file or half-way into the gap
     to its neighbour, so segments never overlap.
  5. Segments shorter than `min_segment_s` leave as rejects `segment_too_short` (nothing vanishes).
A file with no speech at all is rejected as `no_speech`.

Each segment record carries `segment_start`/`segment_end` (seconds in the source), `duration`,
`id` (from source_uri and the bounds), its slice of the waveform as `_waveform` (a view: no copy),
and `_speech_spans`: the speech intervals inside the segment, in seconds from its start.

A transcript on the input (from a manifest) belongs to the whole file. With
`keep_transcribed_whole` (the default) such a file is not cut at its pauses when all its speech
fits in one segment, so the transcript stays aligned with the audio. It is kept when the file
yields exactly one segment (counting the too-short ones); when the file is split it is cleared on
every piece, with `words`, `transcript_origin` and `transcript_confidence`, and the piece gets the
quality flag `manifest_transcript_dropped_split` so that ASR fills it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE, record_id
from echat.schemas.stage import Reject, Stage

from .flags import add_flag

TRANSCRIPT_FIELDS = ("transcript", "transcript_origin", "transcript_confidence", "words")
SPLIT_FLAG = "manifest_transcript_dropped_split"
ENERGY_FRAME_S = 0.01  # frame of the energy curve used to find the quietest split point
Span = tuple[float, float]


class SileroVAD(Stage):
    name: ClassVar[str] = "vad"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate", "source_uri", "segment_start", "transcript")
    writes: ClassVar[tuple[str, ...]] = (
        "id",
        "segment_start",
        "segment_end",
        "duration",
        "_waveform",
        "_speech_spans",
        "quality_flags",
    )

    def __init__(
        self,
        threshold: float = 0.5,
        min_silence_s: float = 0.3,
        merge_gap_s: float = 0.8,
        min_segment_s: float = 1.0,
        max_segment_s: float = 30.0,
        pad_s: float = 0.15,
        min_speech_s: float = 0.25,
        keep_transcribed_whole: bool = True,
    ):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        if min(min_silence_s, merge_gap_s, min_segment_s, pad_s, min_speech_s) < 0:
            raise ValueError("durations must not be negative")
        if max_segment_s <= 2 * pad_s + 0.5:
            raise ValueError(f"max_segment_s ({max_segment_s}) leaves too little room after padding (pad_s={pad_s})")
        if min_segment_s > max_segment_s:
            raise ValueError(f"min_segment_s ({min_segment_s}) exceeds max_segment_s ({max_segment_s})")
        self.threshold = float(threshold)
        self.min_silence_s = float(min_silence_s)
        self.merge_gap_s = float(merge_gap_s)
        self.min_segment_s = float(min_segment_s)
        self.max_segment_s = float(max_segment_s)
        self.pad_s = float(pad_s)
        self.min_speech_s = float(min_speech_s)
        self.keep_transcribed_whole = bool(keep_transcribed_whole)
        self._model = None

    def setup(self) -> None:
        import warnings

        import torch
        from silero_vad import load_silero_vad

        # Workers run in parallel processes; one thread each keeps them from fighting over cores.
        torch.set_num_threads(1)
        with warnings.catch_warnings():  # silero's loader uses deprecated importlib/jit calls
            warnings.simplefilter("ignore", DeprecationWarning)
            self._model = load_silero_vad()

    def describe(self) -> str:
        return "silero-vad"

    def speech_spans(self, waveform: np.ndarray) -> list[Span]:
        """Silero's speech spans in seconds, before merging and padding."""
        import torch
        from silero_vad import get_speech_timestamps

        if self._model is None:
            self.setup()
        stamps = get_speech_timestamps(
            torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)),
            self._model,
            threshold=self.threshold,
            sampling_rate=SAMPLE_RATE,
            min_speech_duration_ms=int(self.min_speech_s * 1000),
            max_speech_duration_s=self.max_segment_s - 2 * self.pad_s,
            min_silence_duration_ms=int(self.min_silence_s * 1000),
            speech_pad_ms=0,  # padding is ours (step 4), so that it respects neighbours and bounds
        )
        return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        waveform = record["_waveform"]
        if int(record.get("sampling_rate") or SAMPLE_RATE) != SAMPLE_RATE:
            raise ValueError(f"SileroVAD expects {SAMPLE_RATE} Hz audio, got {record.get('sampling_rate')}")
        total = len(waveform) / SAMPLE_RATE
        spans = self.speech_spans(waveform)
        if not spans:
            yield self.reject(record, "no_speech", f"no speech above threshold {self.threshold} in {total:.2f} s")
            return

        merge_gap_s = self.merge_gap_s
        if self.keep_transcribed_whole and (record.get("transcript") or "").strip():
            merge_gap_s = float("inf")  # merge every pause, as long as the result fits a segment
        segments = plan_segments(
            spans,
            total,
            waveform=waveform,
            merge_gap_s=merge_gap_s,
            max_segment_s=self.max_segment_s,
            pad_s=self.pad_s,
        )
        split = len(segments) > 1
        uri = str(record.get("source_uri", ""))
        offset = float(record.get("segment_start") or 0.0)  # the input may itself be a segment
        base = {k: v for k, v in record.items() if k not in ("_waveform", "_f0", "_speech_spans")}

        for start, end in segments:
            i0, i1 = round(start * SAMPLE_RATE), round(end * SAMPLE_RATE)
            seg_start, seg_end = offset + i0 / SAMPLE_RATE, offset + i1 / SAMPLE_RATE
            bounds = {
                "segment_start": seg_start,
                "segment_end": seg_end,
                "duration": (i1 - i0) / SAMPLE_RATE,
                "id": record_id(uri, seg_start, seg_end),
            }
            if bounds["duration"] < self.min_segment_s:
                detail = f"{bounds['duration']:.2f} s < min_segment_s {self.min_segment_s:.2f} s"
                yield self.reject({**base, **bounds}, "segment_too_short", detail)
                continue
            out = dict(base)
            out.update(bounds)
            out["_waveform"] = waveform[i0:i1]
            out["_speech_spans"] = spans_within(spans, i0 / SAMPLE_RATE, i1 / SAMPLE_RATE)
            if split and out.get("transcript") is not None:
                for name in TRANSCRIPT_FIELDS:
                    if name in out:
                        out[name] = None
                add_flag(out, SPLIT_FLAG)
            yield out


def plan_segments(
    spans: list[Span],
    total_s: float,
    *,
    waveform: np.ndarray | None = None,
    merge_gap_s: float,
    max_segment_s: float,
    pad_s: float,
) -> list[Span]:
    """Segments (seconds, padded) from raw speech spans: merge, split what is too long, pad."""
    budget = max_segment_s - 2 * pad_s  # room for speech once the padding is added
    merged: list[Span] = []
    for start, end in spans:
        if merged and start - merged[-1][1] < merge_gap_s and end - merged[-1][0] <= budget:
            merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))

    fitted: list[Span] = []
    for span in merged:
        fitted.extend(_split_long(span, budget, waveform))

    padded: list[Span] = []
    for i, (start, end) in enumerate(fitted):
        lo = 0.0 if i == 0 else (fitted[i - 1][1] + start) / 2
        hi = total_s if i == len(fitted) - 1 else (end + fitted[i + 1][0]) / 2
        padded.append((max(lo, start - pad_s), min(hi, end + pad_s)))
    return padded


def _split_long(span: Span, budget: float, waveform: np.ndarray | None) -> list[Span]:
    """Cut a span longer than `budget` at its quietest frame in the second half of each budget."""
    pieces = []
    start, end = span
    while end - start > budget:
        cut = start + budget  # without a waveform: a hard cut at the limit
        if waveform is not None:
            cut = _quietest_point(waveform, start + budget / 2, start + budget)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _quietest_point(waveform: np.ndarray, lo: float, hi: float) -> float:
    frame = int(ENERGY_FRAME_S * SAMPLE_RATE)
    i0, i1 = int(lo * SAMPLE_RATE), int(hi * SAMPLE_RATE)
    n = (i1 - i0) // frame
    if n < 1:
        return hi
    chunk = np.asarray(waveform[i0 : i0 + n * frame], dtype=np.float64).reshape(n, frame)
    quietest = int(np.argmin(np.mean(chunk**2, axis=1)))
    return (i0 + quietest * frame + frame // 2) / SAMPLE_RATE


def spans_within(spans: list[Span], start: float, end: float) -> list[Span]:
    """The parts of `spans` inside [start, end], in seconds from `start`."""
    inside = []
    for a, b in spans:
        a, b = max(a, start), min(b, end)
        if b > a:
            inside.append((round(a - start, 3), round(b - start, 3)))
    return inside
