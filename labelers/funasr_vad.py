"""VAD stage: FunASR's FSMN VAD (fsmn-vad), cutting files the way the silero stage does.

FSMN finds the speech spans; everything after that is SileroVAD's (labelers/vad.py), inherited
rather than repeated: neighbouring spans closer than `merge_gap_s` merged while they fit
`max_segment_s` with their padding, spans still too long cut at their quietest frame, `pad_s` of
context on both sides (`plan_segments`), segments shorter than `min_segment_s` rejected as
`segment_too_short`, a file with no speech rejected as `no_speech`. The outputs are the same
fields: `id` (schemas.record.record_id of the source and the bounds), `segment_start`/`segment_end`,
`duration`, the `_waveform` slice and `_speech_spans`; and a file with a manifest transcript is kept
whole when its speech fits one segment (`keep_transcribed_whole`), its transcript cleared on the
pieces when it is split (`clears = ("transcript",)`), as SileroVAD does.

FSMN's own settings: `min_silence_s` is the pause that ends speech (funasr's
`max_end_silence_time`); null (the default) keeps funasr's dynamic schedule, which waits up to 2 s
at the start of speech and less the longer the speech has run. FSMN itself cuts speech longer than
`max_segment_s` less the padding (its `max_single_segment_time`), as silero's
`max_speech_duration_s` does.

The model comes from `model` (a local directory, a hub id, or funasr's name "fsmn-vad", the
default), with `hub`, `cache_dir`, `revision`, `local_files_only`, `device` and `ncpu` as
labelers/funasr_models.py describes. funasr's FSMN VAD decodes one waveform at a time: a batch of
records is one `generate()` call over their waveforms, which funasr runs one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject

from .funasr_models import LoadedModel, ModelSource, generate_each, load
from .vad import SileroVAD, Span

BACKEND = "fsmn-vad"
DEFAULT_MODEL = "fsmn-vad"


class FsmnVAD(SileroVAD):
    # reads, writes, clears, splits, batch_size: SileroVAD's.
    batch_size: ClassVar[int] = 16

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        hub: str = "ms",
        cache_dir: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
        ncpu: int = 1,
        min_silence_s: float | None = None,
        merge_gap_s: float = 0.8,
        min_segment_s: float = 1.0,
        max_segment_s: float = 30.0,
        pad_s: float = 0.15,
        keep_transcribed_whole: bool = True,
    ):
        # SileroVAD's checks of the segment settings (and its attributes that plan the segments).
        super().__init__(merge_gap_s=merge_gap_s, min_segment_s=min_segment_s, max_segment_s=max_segment_s,
                         pad_s=pad_s, keep_transcribed_whole=keep_transcribed_whole)
        if min_silence_s is not None and min_silence_s < 0:
            raise ValueError(f"min_silence_s must not be negative, got {min_silence_s}")
        self.min_silence_s = None if min_silence_s is None else float(min_silence_s)
        self.source = ModelSource(model, hub, cache_dir, revision, bool(local_files_only), device, int(ncpu))
        self._loaded: LoadedModel | None = None

    def setup(self) -> None:
        budget_ms = int((self.max_segment_s - 2 * self.pad_s) * 1000)
        self._loaded = load(self.source, max_single_segment_time=budget_ms)

    def teardown(self) -> None:
        self._loaded = None

    def describe(self) -> str:
        return f"{BACKEND}:{self.source.label}"

    def speech_probs_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        raise NotImplementedError("FSMN VAD gives speech segments, not frame probabilities")

    def speech_spans(self, waveform: np.ndarray) -> list[Span]:
        (spans,) = self.speech_spans_batch([waveform])
        if isinstance(spans, BaseException):
            raise spans
        return spans

    def speech_spans_batch(self, waveforms: list[np.ndarray]) -> list[list[Span] | BaseException]:
        """FSMN's speech spans (seconds) of each waveform; a waveform it fails on gets its exception."""
        if self._loaded is None:
            self.setup()
        options: dict[str, Any] = {"batch_size": 1}  # funasr's FSMN VAD takes one waveform per forward
        if self.min_silence_s is not None:
            options["max_end_silence_time"] = int(round(self.min_silence_s * 1000))
        loaded = self._loaded
        results = generate_each(lambda batch: loaded.generate(batch, **options), waveforms)
        spans: list[list[Span] | BaseException] = []
        for waveform, result in zip(waveforms, results):
            if isinstance(result, BaseException):
                spans.append(result)
                continue
            try:
                spans.append(_spans(result.get("value") or [], len(waveform) / SAMPLE_RATE))
            except (TypeError, ValueError, IndexError) as exc:
                spans.append(ValueError(f"unreadable FSMN VAD result {result.get('value')!r}: {exc}"))
        return spans

    def _segments(self, record: dict[str, Any], spans: list[Span]) -> Iterator[dict[str, Any] | Reject]:
        if not spans:
            total = len(record["_waveform"]) / SAMPLE_RATE
            yield self.reject(record, "no_speech", f"FSMN VAD found no speech in {total:.2f} s")
            return
        yield from super()._segments(record, spans)


def _spans(value: list, total_s: float) -> list[Span]:
    """FSMN's [[start_ms, end_ms], ...] as sorted (start, end) seconds inside [0, total_s]; an
    open end (-1, from a streaming call) runs to the end of the waveform."""
    spans = []
    for start_ms, end_ms in value:
        start = max(0.0, float(start_ms) / 1000.0)
        end = total_s if float(end_ms) < 0 else min(total_s, float(end_ms) / 1000.0)
        if end > start:
            spans.append((start, end))
    return sorted(spans)
