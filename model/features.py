"""Audio in, Whisper log-mel features out: (80, T) float32 at 100 frames per second.

The features are those of `transformers.WhisperFeatureExtractor` (Hann window of 400, hop 160,
Slaney mel filterbank, log10, floor at max - 8, then (x + 4) / 4), computed over the utterance
alone rather than padded to 30 s: the same as OSUM's `compute_log_mel_spectrogram`, which takes the
maximum over the utterance too. T = number of samples // 160 (the extractor drops the last STFT
frame), so one second of audio gives 100 frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from echat.schemas.audio import load_audio, probe_audio
from echat.schemas.record import SAMPLE_RATE  # 16 kHz: the rate every shard stores audio at

HOP_LENGTH = 160
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
N_FFT = 400
MIN_SAMPLES = N_FFT  # shorter audio has no full analysis window (OSUM skips it too)


def num_frames(num_samples: int) -> int:
    """Mel frames the extractor returns for `num_samples` samples at 16 kHz."""
    return int(num_samples) // HOP_LENGTH


@dataclass(frozen=True)
class AudioRef:
    """Where a user turn's audio is: encoded bytes (FLAC, WAV...) or a file, optionally a span of it.

    Kept undecoded until a batch is assembled, so shuffling and batching hold only bytes.
    """

    data: bytes | None = None
    path: str | None = None
    start: float | None = None  # seconds, for a span of a longer file (OSUM raw lists' start/end)
    end: float | None = None

    def describe(self) -> str:
        return self.path or f"<{len(self.data or b'')} bytes>"


def _source(ref: AudioRef) -> bytes | str:
    if ref.data is not None:
        return ref.data
    if ref.path is not None:
        return ref.path
    raise ValueError("audio reference has neither bytes nor a path")


def audio_num_samples(ref: AudioRef) -> int:
    """Samples at 16 kHz of the (span of the) audio, read from the header only.

    Raises `schemas.audio.AudioError` (with its reason code) for audio that cannot be read.
    """
    info = probe_audio(_source(ref))
    start = int(round((ref.start or 0.0) * info.sample_rate))
    stop = int(round(ref.end * info.sample_rate)) if ref.end is not None else info.frames
    stop = min(stop, info.frames)
    if stop <= start:
        return 0
    return int(round((stop - start) * SAMPLE_RATE / info.sample_rate))


def decode_audio(ref: AudioRef) -> np.ndarray:
    """Mono float32 waveform at 16 kHz (channels averaged, other rates resampled with soxr).

    The build's decoder (`schemas.audio.load_audio`: libsndfile, then FFmpeg for m4a/AAC/WebM...),
    so audio that builds also loads here. Raises `schemas.audio.AudioError` for audio that cannot
    be decoded.
    """
    decoded = load_audio(_source(ref), target_sample_rate=SAMPLE_RATE, start=ref.start, end=ref.end)
    return np.ascontiguousarray(decoded.waveform, dtype=np.float32)


class LogMelExtractor:
    """Whisper log-mel of one utterance, unpadded: a torch tensor of shape (n_mels, T).

    `feature_extractor` may be a `WhisperFeatureExtractor` loaded from a checkpoint
    (`WhisperFeatureExtractor.from_pretrained(path)`); by default one is built with 80 mel bins,
    which is what Whisper-medium and OSUM use.
    """

    def __init__(self, feature_extractor: Any = None, n_mels: int = 80):
        if feature_extractor is None:
            from transformers import WhisperFeatureExtractor

            feature_extractor = WhisperFeatureExtractor(feature_size=n_mels)
        if feature_extractor.sampling_rate != SAMPLE_RATE or feature_extractor.hop_length != HOP_LENGTH:
            raise ValueError("the feature extractor must work at 16 kHz with a hop of 160 samples (100 frames/s)")
        self.feature_extractor = feature_extractor
        self.n_mels = int(feature_extractor.feature_size)

    def __call__(self, waveform: np.ndarray):
        import torch

        if waveform.ndim != 1:
            raise ValueError(f"expected a mono waveform, got shape {waveform.shape}")
        if len(waveform) < MIN_SAMPLES:
            raise ValueError(f"audio of {len(waveform)} samples is shorter than one {N_FFT}-sample window")
        out = self.feature_extractor(
            waveform,
            sampling_rate=SAMPLE_RATE,
            padding="longest",  # one utterance: no padding to 30 s
            truncation=False,
            return_tensors="np",
        )["input_features"]
        return torch.from_numpy(np.ascontiguousarray(out[0], dtype=np.float32))
