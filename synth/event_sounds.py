"""Vocal events for synthetic queries: synthesised offline, or clips from a folder of real ones.

Offline, at the corpus rate (16 kHz), mono float32 peaking at 1.0:
  cough            two or three short bursts of band-passed noise, sharp attack, fast decay
                   (the demo corpus's `cough_burst`)
  laugh            voiced "ha" bursts spoken by espeak-ng in the speaker's own voice variant, quick
                   and high, each with a falling envelope
  sigh             breathy noise: a slow rise and a long decay, low-passed as the breath falls
  sneeze           a rising "ah" (espeak-ng) and a sharp hiss of high-passed noise
  throat_clearing  low rumbling noise pulsed at ~25 Hz, twice
The other events of the vocabulary (cry, screaming, other) have no offline sound: they need a bank.

A bank (`--event-bank DIR`) holds clips as DIR/<event>/*.wav (any format the build decodes); an
event with clips there takes a random one (decoded and resampled to 16 kHz, trimmed of silence at its
ends) instead of the synthesised sound, and the folder may hold events offline synthesis lacks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from echat.schemas import vocab
from echat.schemas.audio import resample
from echat.schemas.record import SAMPLE_RATE

SYNTHESISED = ("cough", "laugh", "sigh", "sneeze", "throat_clearing")
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a")


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    peak = float(np.abs(x).max()) if x.size else 0.0
    return x / peak if peak > 0 else x


def cough(rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    from .demo_corpus import cough_burst

    return _normalise(cough_burst(rate, rng))


def sigh(rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    length = int(rate * rng.uniform(0.8, 1.2))
    t = np.arange(length) / rate
    rise = rng.uniform(0.12, 0.22)
    envelope = np.where(t < rise, (t / rise) ** 1.5, np.exp(-(t - rise) / rng.uniform(0.25, 0.4)))
    noise = rng.standard_normal(length)
    # breath: a broad band around the first formants, brighter at the start than the tail
    bright = sosfilt(butter(2, [500, 3200], btype="bandpass", fs=rate, output="sos"), noise)
    dark = sosfilt(butter(2, [250, 1200], btype="bandpass", fs=rate, output="sos"), noise)
    fade = np.clip(t / t[-1], 0, 1)
    return _normalise(((1 - fade) * bright + fade * dark) * envelope)


def throat_clearing(rng: np.random.Generator, rate: int = SAMPLE_RATE) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    parts = []
    for strength in (1.0, rng.uniform(0.6, 0.85)):
        length = int(rate * rng.uniform(0.22, 0.32))
        t = np.arange(length) / rate
        rumble = sosfilt(butter(2, [120, 900], btype="bandpass", fs=rate, output="sos"), rng.standard_normal(length))
        pulses = 0.55 + 0.45 * np.sign(np.sin(2 * np.pi * rng.uniform(22, 30) * t))
        envelope = np.minimum(t / 0.02, 1.0) * np.exp(-t / 0.15)
        parts += [strength * rumble * pulses * envelope, np.zeros(int(rate * rng.uniform(0.06, 0.1)))]
    return _normalise(np.concatenate(parts))


def _espeak(text: str, voice: str, pitch: int, speed: int) -> np.ndarray:
    from .espeak_tts import Prosody, synthesize

    audio, native = synthesize(text, voice, Prosody(speed=speed, pitch=max(0, min(99, pitch)), range=160, amplitude=110))
    return resample(audio, native, SAMPLE_RATE)


def laugh(rng: np.random.Generator, voice: str = "en-us", pitch: int = 60, rate: int = SAMPLE_RATE) -> np.ndarray:
    """ "ha ha ha" from espeak-ng in `voice`, fast and high, each "ha" falling away."""
    count = int(rng.integers(3, 6))
    speech = _espeak(" ".join(["ha"] * count), _english(voice), pitch + int(rng.integers(8, 18)), int(rng.integers(230, 300)))
    speech = _trim(speech)
    t = np.arange(speech.size) / SAMPLE_RATE
    decay = np.exp(-t / max(t[-1], 1e-3) * rng.uniform(0.8, 1.6))  # the laugh trails off
    return _normalise(speech * decay)


def sneeze(rng: np.random.Generator, voice: str = "en-us", pitch: int = 60, rate: int = SAMPLE_RATE) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    ah = _trim(_espeak("ah", _english(voice), pitch + 15, 110))
    ah = ah * np.linspace(0.4, 1.0, ah.size)
    length = int(SAMPLE_RATE * rng.uniform(0.2, 0.3))
    t = np.arange(length) / SAMPLE_RATE
    hiss = sosfilt(butter(3, 2200, btype="highpass", fs=SAMPLE_RATE, output="sos"), rng.standard_normal(length))
    hiss = hiss * np.minimum(t / 0.008, 1.0) * np.exp(-t / 0.07)
    gap = np.zeros(int(SAMPLE_RATE * rng.uniform(0.03, 0.08)), np.float32)
    return _normalise(np.concatenate([_normalise(ah) * 0.6, gap, _normalise(hiss)]))


def _english(voice: str) -> str:
    """The same variant on an English base voice ("ha" read as pinyin would be toneless)."""
    base, _, variant = voice.partition("+")
    if base.startswith("en"):
        return voice
    return f"en-us+{variant}" if variant else "en-us"


def _trim(x: np.ndarray, level: float = 0.01) -> np.ndarray:
    loud = np.nonzero(np.abs(x) > level * (np.abs(x).max() or 1.0))[0]
    return x[loud[0]:loud[-1] + 1] if loud.size else x


class EventBank:
    """Where each event's sound comes from: the folder's clips, else offline synthesis."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        self.clips: dict[str, list[Path]] = {}
        if self.folder is not None:
            if not self.folder.is_dir():
                raise ValueError(f"--event-bank {self.folder} is not a folder")
            for sub in sorted(p for p in self.folder.iterdir() if p.is_dir()):
                if sub.name not in vocab.EVENTS:
                    raise ValueError(f"event bank folder {sub.name!r} is not a vocal event ({', '.join(vocab.EVENTS)})")
                files = sorted(p for p in sub.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
                if files:
                    self.clips[sub.name] = files

    def available(self) -> set[str]:
        return set(SYNTHESISED) | set(self.clips)

    def source(self, event: str) -> str:
        return "bank" if event in self.clips else "synthesised"

    def check(self, events: set[str]) -> None:
        missing = sorted(events - self.available())
        if missing:
            raise ValueError(f"no sound for event(s) {missing}: they are not synthesised offline "
                             f"({', '.join(SYNTHESISED)}); give --event-bank DIR with DIR/<event>/*.wav clips")

    def sound(self, event: str, rng: np.random.Generator, voice: str, pitch: int) -> np.ndarray:
        """One instance of `event` at 16 kHz, peaking at 1.0."""
        if event in self.clips:
            from echat.schemas.audio import load_audio

            clip = self.clips[event][int(rng.integers(len(self.clips[event])))]
            return _normalise(_trim(load_audio(str(clip), target_sample_rate=SAMPLE_RATE, max_seconds=10.0).waveform))
        if event == "cough":
            return cough(rng)
        if event == "sigh":
            return sigh(rng)
        if event == "throat_clearing":
            return throat_clearing(rng)
        if event == "laugh":
            return laugh(rng, voice, pitch)
        if event == "sneeze":
            return sneeze(rng, voice, pitch)
        raise ValueError(f"no sound for event {event!r}")
