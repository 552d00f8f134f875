"""Acoustic metrics stage: SNR, speech ratio, pitch statistics, speaking rate, clipping, loudness.

How each is estimated (frames of 25 ms every 10 ms):
  snr_db          energy SNR. Speech frames are those inside `_speech_spans` (the VAD's speech);
                  the noise floor is the median power of the other frames. Without VAD spans, or
                  with fewer than 0.1 s outside them, speech frames are the frames above the energy
                  speech threshold below and the noise floor is the 10th percentile of all frame
                  powers (which then includes the pauses between words, so it reads a little low).
                  SNR = 10 log10((P_speech - P_noise) / P_noise); digital silence as noise is taken
                  at -100 dBFS, so clean synthetic speech reads about 80 dB. Clamped to [-20, 100].
                  (Not WADA-SNR: that needs a table fitted to a gamma speech model; this needs only
                  the VAD we already ran and orders clean/noisy recordings the same way.)
  speech_ratio    total length of `_speech_spans` over the duration; without spans, the fraction of
                  frames more than 6 dB above the 10th-percentile frame power (and above -60 dBFS).
  pitch_mean_hz,
  pitch_std_hz    mean and standard deviation of the voiced F0 (`pitch.f0_of`, cached as `_f0`);
                  None when fewer than `MIN_VOICED_FRAMES` frames are voiced.
  speaking_rate   words per second of speech (CJK characters count one each, for Chinese), speech time
                  from `_speech_spans` when present, else the duration; None without a transcript.
  clipping_ratio  fraction of samples with |x| >= `clip_level` (0.999).
  loudness_dbfs   RMS level of the whole segment, dB relative to full scale, clamped to [-120, 0].
Each value is clamped to the range FIELDS declares for it and stored as a Python float. A metric
already present on the record is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import FIELDS_BY_NAME, SAMPLE_RATE
from echat.schemas.stage import Reject, Stage
from echat.schemas.text import CJK_CHAR, count_cjk

from .pitch import f0_of, warm_up

FRAME = int(0.025 * SAMPLE_RATE)
HOP = int(0.010 * SAMPLE_RATE)
SILENCE_POWER = 1e-10  # -100 dBFS: the noise floor assumed when the noise frames are digital zero
MIN_NOISE_FRAMES = 10
SPEECH_ABOVE_FLOOR_DB = 6.0
SPEECH_MIN_DBFS = -60.0
MIN_VOICED_FRAMES = 10

METRIC_FIELDS = (
    "snr_db",
    "speech_ratio",
    "pitch_mean_hz",
    "pitch_std_hz",
    "speaking_rate",
    "clipping_ratio",
    "loudness_dbfs",
)


class AcousticMetrics(Stage):
    name: ClassVar[str] = "metrics"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "_speech_spans", "_f0", "transcript")
    writes: ClassVar[tuple[str, ...]] = (*METRIC_FIELDS, "_f0")

    def __init__(self, clip_level: float = 0.999):
        if not 0.0 < clip_level <= 1.0:
            raise ValueError(f"clip_level must be in (0, 1], got {clip_level}")
        self.clip_level = float(clip_level)

    def setup(self) -> None:
        warm_up()

    def describe(self) -> str:
        return "acoustic-metrics-v1"

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        out = dict(record)
        waveform = np.asarray(record["_waveform"], dtype=np.float32)
        spans = record.get("_speech_spans")
        duration = len(waveform) / SAMPLE_RATE
        f0 = f0_of(out)
        speech_s = sum(b - a for a, b in spans) if spans is not None else duration
        values = {
            "snr_db": snr_db(waveform, spans),
            "speech_ratio": speech_ratio(waveform, spans),
            "pitch_mean_hz": float(np.mean(f0)) if len(f0) >= MIN_VOICED_FRAMES else None,
            "pitch_std_hz": float(np.std(f0)) if len(f0) >= MIN_VOICED_FRAMES else None,
            "speaking_rate": speaking_rate(record.get("transcript"), speech_s),
            "clipping_ratio": clipping_ratio(waveform, self.clip_level),
            "loudness_dbfs": loudness_dbfs(waveform),
        }
        for name, value in values.items():
            if out.get(name) is None:
                out[name] = clamp_to_field(name, value)
        yield out


def clamp_to_field(name: str, value: float | None) -> float | None:
    """`value` as a Python float inside the [min, max] that FIELDS declares for `name`."""
    if value is None or not np.isfinite(value):
        return None
    field = FIELDS_BY_NAME[name]
    low = field.min if field.min is not None else -np.inf
    high = field.max if field.max is not None else np.inf
    return float(min(high, max(low, float(value))))


def frame_powers(waveform: np.ndarray) -> np.ndarray:
    """Mean power of each 25 ms frame, every 10 ms (one frame for a shorter waveform)."""
    x = np.asarray(waveform, dtype=np.float64)
    if len(x) < FRAME:
        return np.array([np.mean(x**2) if len(x) else 0.0])
    frames = np.lib.stride_tricks.sliding_window_view(x, FRAME)[::HOP]
    return np.mean(frames**2, axis=1)


def _frames_in_spans(n_frames: int, spans) -> np.ndarray:
    centres = (np.arange(n_frames) * HOP + FRAME / 2) / SAMPLE_RATE
    inside = np.zeros(n_frames, dtype=bool)
    for a, b in spans:
        inside |= (centres >= a) & (centres < b)
    return inside


def _energy_speech_frames(powers: np.ndarray) -> tuple[np.ndarray, float]:
    floor = float(np.percentile(powers, 10))
    threshold = max(floor * 10 ** (SPEECH_ABOVE_FLOOR_DB / 10), 10 ** (SPEECH_MIN_DBFS / 10))
    return powers > threshold, floor


def snr_db(waveform: np.ndarray, speech_spans=None) -> float | None:
    """Energy SNR of speech over the noise floor, dB (see the module docstring)."""
    powers = frame_powers(waveform)
    if speech_spans:
        speech = _frames_in_spans(len(powers), speech_spans)
        if speech.any() and (~speech).sum() >= MIN_NOISE_FRAMES:
            noise = float(np.median(powers[~speech]))
            return _snr(float(np.mean(powers[speech])), noise)
    speech, floor = _energy_speech_frames(powers)
    if not speech.any():
        return None
    return _snr(float(np.mean(powers[speech])), floor)


def _snr(speech_power: float, noise_power: float) -> float:
    noise_power = max(noise_power, SILENCE_POWER)
    signal_power = max(speech_power - noise_power, SILENCE_POWER)
    return float(10 * np.log10(signal_power / noise_power))


def speech_ratio(waveform: np.ndarray, speech_spans=None) -> float:
    """Fraction of the waveform that is speech: from the VAD spans, else from frame energy."""
    duration = len(waveform) / SAMPLE_RATE
    if duration == 0:
        return 0.0
    if speech_spans is not None:
        return float(min(1.0, sum(b - a for a, b in speech_spans) / duration))
    speech, _ = _energy_speech_frames(frame_powers(waveform))
    return float(speech.mean())


def speaking_rate(transcript: str | None, speech_seconds: float) -> float | None:
    """Words (or, for Chinese, CJK characters) per second of speech; None without a transcript."""
    if not transcript or speech_seconds <= 0:
        return None
    # Each CJK character counts as one unit, each run of other text between spaces as one word, so
    # Chinese, English and mixed transcripts are all measured without a language code.
    cjk = count_cjk(transcript)
    words = len(CJK_CHAR.sub(" ", transcript).split())
    return float((cjk + words) / speech_seconds)


def clipping_ratio(waveform: np.ndarray, clip_level: float = 0.999) -> float:
    if len(waveform) == 0:
        return 0.0
    return float(np.count_nonzero(np.abs(waveform) >= clip_level) / len(waveform))


def loudness_dbfs(waveform: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.asarray(waveform, dtype=np.float64) ** 2))) if len(waveform) else 0.0
    return float(max(-120.0, min(0.0, 20 * np.log10(rms)))) if rms > 0 else -120.0
