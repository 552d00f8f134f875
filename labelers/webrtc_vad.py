"""VAD stage: WebRTC's voice activity detector (webrtcvad), cutting files the way the silero stage does.

A second offline VAD, with no model file and no torch: the GMM detector of the WebRTC project
(`webrtcvad-wheels`), which decides speech or not for each `frame_ms` frame of 16-bit PCM. Its
frame decisions become speech spans the way silero's probabilities do: speech starts at a speech
frame, a pause shorter than `min_silence_s` does not end it, and a span shorter than `min_speech_s`
is dropped. Everything after that is SileroVAD's (labelers/vad.py), inherited rather than repeated:
neighbouring spans closer than `merge_gap_s` merged while they fit `max_segment_s` with their
padding, a turn longer than `max_turn_s` cut at its longest pause, spans still too long cut at
their quietest frame, `pad_s` of context on both sides, segments shorter than `min_segment_s`
rejected as `segment_too_short`, a file with no speech rejected as `no_speech`; the same output
fields (`id`, `segment_start`/`segment_end`, `duration`, the `_waveform` slice, `_speech_spans`),
and a file with a manifest transcript kept whole when its speech fits one segment
(`keep_transcribed_whole`), its transcript cleared on the pieces when it is split.

`mode` is WebRTC's aggressiveness, 0 (calls most things speech) to 3 (the most willing to call a
frame non-speech). It is an energy-and-spectrum detector: coughs, breaths and loud noise count as
speech, which silero mostly rejects; on clean speech the two agree closely (measured on the demo
corpus in tests/test_labelers_webrtc_vad.py and benchmarks/bench_label_accuracy.py).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE

from .vad import MAX_TURN_S, SileroVAD, Span

FRAME_MS = (10, 20, 30)  # what WebRTC's detector accepts at 16 kHz


class WebrtcVAD(SileroVAD):
    # reads, writes, clears, splits: SileroVAD's. WebRTC decides frame by frame in C: no batching gain.
    batch_size: ClassVar[int] = 1

    def __init__(
        self,
        mode: int = 3,
        frame_ms: int = 30,
        min_silence_s: float = 0.3,
        min_speech_s: float = 0.25,
        merge_gap_s: float = 0.8,
        min_segment_s: float = 1.0,
        max_segment_s: float = 30.0,
        pad_s: float = 0.15,
        keep_transcribed_whole: bool = True,
        max_turn_s: float | None = MAX_TURN_S,
    ):
        # SileroVAD's checks of the segment settings (and its attributes that plan the segments).
        super().__init__(min_silence_s=min_silence_s, merge_gap_s=merge_gap_s, min_segment_s=min_segment_s,
                         max_segment_s=max_segment_s, pad_s=pad_s, min_speech_s=min_speech_s,
                         keep_transcribed_whole=keep_transcribed_whole, max_turn_s=max_turn_s)
        if mode not in (0, 1, 2, 3):
            raise ValueError(f"mode must be 0, 1, 2 or 3, got {mode!r}")
        if frame_ms not in FRAME_MS:
            raise ValueError(f"frame_ms must be one of {FRAME_MS}, got {frame_ms!r}")
        self.mode = int(mode)
        self.frame_ms = int(frame_ms)
        self._vad = None

    def setup(self) -> None:
        try:
            import webrtcvad
        except ImportError as exc:
            raise ImportError("the webrtc VAD backend needs webrtcvad (pip install webrtcvad-wheels)") from exc
        self._vad = webrtcvad.Vad(self.mode)

    def teardown(self) -> None:
        self._vad = None

    def describe(self) -> str:
        return f"webrtcvad-mode{self.mode}"

    def speech_probs_batch(self, waveforms: list[np.ndarray]) -> list[np.ndarray]:
        """WebRTC's decision (1.0 speech, 0.0 not) for every `frame_ms` frame of each waveform."""
        if self._vad is None:
            self.setup()
        return [self.frame_decisions(w) for w in waveforms]

    def frame_decisions(self, waveform: np.ndarray) -> np.ndarray:
        if self._vad is None:
            self.setup()
        step = SAMPLE_RATE * self.frame_ms // 1000
        n = len(waveform) // step  # a last partial frame is left out (WebRTC takes whole frames only)
        pcm = (np.clip(np.asarray(waveform[: n * step], dtype=np.float32), -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
        width = 2 * step
        is_speech = self._vad.is_speech
        return np.fromiter((is_speech(pcm[i * width : (i + 1) * width], SAMPLE_RATE) for i in range(n)),
                           dtype=np.float32, count=n)

    def speech_spans(self, waveform: np.ndarray) -> list[Span]:
        return self.spans_from_decisions(self.frame_decisions(waveform))

    def speech_spans_batch(self, waveforms: list[np.ndarray]) -> list[list[Span]]:
        return [self.speech_spans(w) for w in waveforms]

    def spans_from_decisions(self, decisions: np.ndarray) -> list[Span]:
        """Speech spans (seconds) from frame decisions: pauses shorter than `min_silence_s` bridged,
        spans shorter than `min_speech_s` dropped."""
        frame_s = self.frame_ms / 1000
        spans: list[Span] = []
        speech = np.flatnonzero(decisions > 0.5)
        if not len(speech):
            return spans
        # Runs of speech frames: a new run where the gap to the previous speech frame is a pause.
        max_gap = max(1, int(round(self.min_silence_s / frame_s)))
        breaks = np.flatnonzero(np.diff(speech) > max_gap)
        starts = np.concatenate([[speech[0]], speech[breaks + 1]])
        ends = np.concatenate([speech[breaks], [speech[-1]]]) + 1
        for a, b in zip(starts, ends):
            if (b - a) * frame_s >= self.min_speech_s:
                spans.append((round(a * frame_s, 3), round(b * frame_s, 3)))
        return spans
