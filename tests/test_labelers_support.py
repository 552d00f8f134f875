"""Speech and file fixtures for the labeler tests, made at run time (no audio is committed).

The other `test_labelers_*` modules import this one as a module (`import test_labelers_support as
speech`), so its helpers are not collected twice. espeak-ng is a system requirement of the project
(scripts/setup.sh installs it); without it these tests fail rather than skip.
"""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SR = 16_000

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "Please call me back when you get home tonight.",
    "We need to buy some milk and bread at the store.",
    "My brother lives in a small house near the river.",
)
MALE_VOICES = ("en+m1", "en+m3", "en+m7", "en+david", "cmn-latn-pinyin+m3", "cmn-latn-pinyin+john")
FEMALE_VOICES = ("en+f1", "en+f3", "en+f5", "en+linda", "cmn-latn-pinyin+f4", "cmn-latn-pinyin+Alicia")
PINYIN = "wo3 jin1 tian1 qu4 le5 shi4 chang3 mai3 le5 yi4 xie1 ping2 guo3 ran2 hou4 man4 man4 zou3 hui2 jia1"


def espeak_native(text: str, voice: str = "en+f3", speed: int | None = None) -> tuple[np.ndarray, int]:
    """espeak-ng speech at its own rate (22,050 Hz), float32 mono."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (scripts/setup.sh installs it)")
    cmd = ["espeak-ng", "-v", voice, "--stdout"]
    if speed is not None:
        cmd += ["-s", str(speed)]
    wav = subprocess.run([*cmd, text], capture_output=True, check=True).stdout
    data, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return data, rate


def say(text: str, voice: str = "en+f3", speed: int | None = None) -> np.ndarray:
    """espeak-ng speech resampled to 16 kHz, float32 mono."""
    data, rate = espeak_native(text, voice, speed)
    return soxr.resample(data, rate, SR).astype(np.float32)


def speech_for_voice(voice: str) -> np.ndarray:
    """A sentence in the voice's language: English text, or pinyin for the cmn-latn-pinyin voices."""
    text = PINYIN if voice.startswith("cmn") else "I went to the market this morning and bought some apples."
    return say(text, voice)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * SR), dtype=np.float32)


def first_last_sound(waveform: np.ndarray, offset_s: float = 0.0, level: float = 1e-3) -> tuple[float, float]:
    """Seconds of the first and last sample above `level` (true speech bounds of clean speech)."""
    idx = np.nonzero(np.abs(waveform) > level)[0]
    return offset_s + idx[0] / SR, offset_s + idx[-1] / SR


def white_noise(n: int, rms: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * rms).astype(np.float32)


def wav_header(frames: int, channels: int = 1, rate: int = SR, bits: int = 16) -> bytes:
    """A canonical 44-byte PCM WAV header declaring `frames` frames."""
    block = channels * bits // 8
    data_bytes = frames * block
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, channels, rate, rate * block, block, bits,
        b"data", data_bytes,
    )


def write_sparse_wav(path: Path, seconds: float, rate: int = SR) -> Path:
    """A valid WAV of `seconds` of zeros that takes almost no disk: header + a sparse data hole."""
    frames = int(seconds * rate)
    with open(path, "wb") as f:
        f.write(wav_header(frames, rate=rate))
        f.truncate(44 + frames * 2)
    return path


def run_stage(stage, *records) -> list:
    """The outputs of `records` through `stage` under StageRunner, in order (records and Rejects).

    The runner does to the stage what a build does: precedence (a label held by a better source is
    kept, the record skipped when all its groups are), provenance stamping from `describe()`, and a
    write the stage did not declare rejects the record as `stage_error`.
    """
    from echat.schemas.stage import Reject
    from echat.schemas.stage_runner import StageRunner

    outputs = []
    for result in StageRunner(stage).run(list(records)):
        outputs.extend([result] if isinstance(result, Reject) else result)
    return outputs


# -- the helpers themselves ---------------------------------------------------------------------


def test_say_gives_16k_speech():
    x = say("Hello world.")
    assert x.dtype == np.float32 and 0.5 < len(x) / SR < 3.0
    assert np.max(np.abs(x)) > 0.05


def test_sparse_wav_declares_its_length_without_taking_the_disk(tmp_path):
    path = write_sparse_wav(tmp_path / "long.wav", 2 * 3600)
    assert sf.info(str(path)).duration == 2 * 3600
    assert path.stat().st_blocks * 512 < 1_000_000  # a few blocks actually allocated
