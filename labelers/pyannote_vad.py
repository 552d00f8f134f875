"""VAD stage with pyannote.audio: speech regions from a segmentation model, cut as silero's are.

pyannote's `VoiceActivityDetection` pipeline runs a segmentation model (`pyannote/segmentation-3.0`
by default, a powerset speaker-segmentation model; any pyannote segmentation or VAD checkpoint
works) over a sliding window of each file and binarises its speech probability. Its speech regions
then go through exactly the cutting rules of the silero stage (labelers/vad.py, which this class
extends): neighbouring regions closer than `merge_gap_s` merged while they fit `max_segment_s`,
a region still too long split at its quietest 10 ms frame, `pad_s` of context that never overlaps a
neighbour, segments shorter than `min_segment_s` rejected as `segment_too_short`, a file with no
speech rejected as `no_speech`, a manifest transcript kept only on a file that stays whole. The
outputs are the same fields (`id`, bounds, `duration`, `_waveform` slice, `_speech_spans`).

Parameters keep the silero stage's names, so `--set vad.backend=pyannote` keeps a profile's VAD
settings:
  threshold      onset of the speech probability (multi-label models only; a powerset model such
                 as segmentation-3.0 decides by its most likely class and has no threshold)
  offset         offset of the hysteresis (default: `threshold`), multi-label models only
  min_speech_s   speech regions shorter than this are removed (pyannote's min_duration_on)
  min_silence_s  pauses shorter than this are filled (pyannote's min_duration_off)
  model, cache_dir, device   see labelers/model_hub.py
  inference_batch_size       windows per forward pass of the segmentation model (pyannote batches
                             the windows of one file; files run one after the other)
The waveform goes to pyannote as an in-memory dict ({"waveform": (1, n) tensor, "sample_rate"}),
never as a path, so no FFmpeg is involved.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE

from . import model_hub
from .vad import SileroVAD, Span

DEFAULT_MODEL = "pyannote/segmentation-3.0"


class PyannoteVAD(SileroVAD):
    name: ClassVar[str] = "vad"
    # pyannote batches the windows of one file (`inference_batch_size`); records are independent.
    batch_size: ClassVar[int] = 4

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        cache_dir: str | None = None,
        device: str = "cpu",
        threshold: float = 0.5,
        offset: float | None = None,
        min_silence_s: float = 0.3,
        merge_gap_s: float = 0.8,
        min_segment_s: float = 1.0,
        max_segment_s: float = 30.0,
        pad_s: float = 0.15,
        min_speech_s: float = 0.25,
        keep_transcribed_whole: bool = True,
        inference_batch_size: int = 32,
    ):
        super().__init__(
            threshold=threshold, min_silence_s=min_silence_s, merge_gap_s=merge_gap_s, min_segment_s=min_segment_s,
            max_segment_s=max_segment_s, pad_s=pad_s, min_speech_s=min_speech_s,
            keep_transcribed_whole=keep_transcribed_whole,
        )
        if offset is not None and not 0.0 < offset < 1.0:
            raise ValueError(f"offset must be in (0, 1), got {offset}")
        if int(inference_batch_size) < 1:
            raise ValueError(f"inference_batch_size must be at least 1, got {inference_batch_size}")
        self.model = model_hub.check_model_param(model, "pyannote VAD")
        self.cache_dir = cache_dir
        self.device = model_hub.check_device(device)
        self.offset = float(offset) if offset is not None else self.threshold
        self.inference_batch_size = int(inference_batch_size)
        self._pipeline = None
        self._powerset = False

    def setup(self) -> None:
        import torch
        from pyannote.audio import Model
        from pyannote.audio.pipelines import VoiceActivityDetection

        segmentation = Model.from_pretrained(
            model_hub.local_or_id(self.model), cache_dir=model_hub.hub_cache_dir(self.cache_dir), strict=False)
        if segmentation is None:  # pyannote returns None when the hub refuses the download
            raise RuntimeError(f"could not load the pyannote segmentation model {self.model!r} "
                               "(a gated model needs HF_TOKEN and its user conditions accepted)")
        pipeline = VoiceActivityDetection(segmentation=segmentation, batch_size=self.inference_batch_size)
        self._powerset = bool(segmentation.specifications.powerset)
        params: dict[str, float] = {"min_duration_on": self.min_speech_s, "min_duration_off": self.min_silence_s}
        if not self._powerset:
            params.update(onset=self.threshold, offset=self.offset)
        pipeline.instantiate(params)
        pipeline.to(torch.device(self.device))
        self._pipeline = pipeline

    def teardown(self) -> None:
        self._pipeline = None

    def describe(self) -> str:
        return f"pyannote-vad:{model_hub.model_label(self.model)}"

    def speech_spans_batch(self, waveforms: list[np.ndarray]) -> list[list[Span]]:
        """pyannote's speech regions (seconds) of each 16 kHz mono waveform, before merging and padding."""
        if self._pipeline is None:
            self.setup()
        return [self._spans(w) for w in waveforms]

    def speech_spans(self, waveform: np.ndarray) -> list[Span]:
        return self.speech_spans_batch([waveform])[0]

    def _spans(self, waveform: np.ndarray) -> list[Span]:
        import torch

        total = len(waveform) / SAMPLE_RATE
        if len(waveform) == 0:
            return []
        audio = {"waveform": torch.from_numpy(np.ascontiguousarray(waveform, dtype=np.float32)).unsqueeze(0),
                 "sample_rate": SAMPLE_RATE}
        speech = self._pipeline(audio)
        spans = []
        for segment in speech.get_timeline().support():
            start, end = max(0.0, float(segment.start)), min(total, float(segment.end))
            if end > start:
                spans.append((start, end))
        return spans

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pipeline"] = None  # a loaded pipeline is rebuilt by setup() on the worker
        return state
