"""The offline TTS backend: espeak-ng, with prosody that follows the reply emotion.

English is spoken with an `en` voice; Mandarin is first turned into pinyin with tone numbers
(pypinyin, Style.TONE3, neutral tone as 5) and spoken with `cmn-latn-pinyin`, because the plain
`cmn` voice reads tone digits as English numbers. Speed, pitch and amplitude go on espeak-ng's
command line; the pitch range goes in an SSML `<prosody range>` around the text. espeak-ng writes
22,050 Hz WAV; the stage resamples it to the corpus rate (16 kHz) with the resampler the decode
stage uses (`schemas.audio.resample`, soxr VHQ), so user and reply audio go through the same one.

`synthesize` is also what `echat demo-data` speaks its user turns with.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from echat.schemas.audio import RESAMPLE_QUALITY, resample
from echat.schemas import vocab
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject, Stage

from .cache import ContentCache, cache_key
from .reasoning import guess_language

ESPEAK_BINARY = "espeak-ng"
CACHE_NAMESPACE = "tts-espeak"


class EspeakError(RuntimeError):
    """espeak-ng is missing, failed, or wrote no audio; `stderr` holds what it said."""

    def __init__(self, message: str, stderr: str = ""):
        super().__init__(f"{message}: {stderr.strip()}" if stderr.strip() else message)
        self.stderr = stderr


class Prosody(BaseModel):
    """espeak-ng settings for one emotion (see synth/templates/prosody.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    speed: int = Field(175, ge=80, le=450)  # words per minute (-s)
    pitch: int = Field(50, ge=0, le=99)  # base pitch (-p)
    range: int = Field(100, ge=0, le=400)  # pitch range, percent of the voice's own (SSML)
    amplitude: int = Field(100, ge=0, le=200)  # loudness (-a)


def load_prosody_table(path: str | Path | None = None) -> tuple[Prosody, dict[str, Prosody]]:
    """(default, per reply emotion) from a YAML file; the packaged table when `path` is None."""
    if path:
        text, where = Path(path).read_text("utf-8"), str(path)
    else:
        text = resources.files("echat.synth").joinpath("templates/prosody.yaml").read_text("utf-8")
        where = "synth/templates/prosody.yaml"
    data = yaml.safe_load(text) or {}
    try:
        default = Prosody(**(data.get("default") or {}))
        table = {emotion: Prosody(**values) for emotion, values in (data.get("reply_emotions") or {}).items()}
    except (TypeError, ValidationError) as exc:
        raise ValueError(f"{where}: bad prosody entry: {exc}") from exc
    unknown = sorted(set(table) - set(vocab.REPLY_EMOTIONS))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not reply emotions ({', '.join(vocab.REPLY_EMOTIONS)})")
    missing = [e for e in vocab.REPLY_EMOTIONS if e not in table]
    if missing:
        raise ValueError(f"{where}: no prosody for reply emotion(s) {missing}")
    return default, table


# ---------------------------------------------------------------------------------------------
# text and espeak-ng


# Full-width punctuation -> ASCII, so espeak-ng pauses at it instead of skipping it.
_ZH_PUNCT = str.maketrans({
    "，": ",", "、": ",", "。": ".", "！": "!", "？": "?", "；": ";", "：": ":", "…": ".",
    "—": ",", "～": ".", "~": ".", "（": " ", "）": " ", "“": " ", "”": " ", "‘": " ", "’": " ",
    "《": " ", "》": " ", "「": " ", "」": " ", "【": " ", "】": " ",
})


def to_pinyin(text: str) -> str:
    """Chinese text as tone-numbered pinyin syllables, punctuation kept as ASCII pauses:
    "你好，世界。" -> "ni3 hao3 , shi4 jie4 ." (the neutral tone is 5: "ma5")."""
    from pypinyin import Style, lazy_pinyin  # imported here: its dictionaries take time to load

    pieces = lazy_pinyin(text, style=Style.TONE3, neutral_tone_with_five=True)
    joined = " ".join(piece.translate(_ZH_PUNCT) for piece in pieces)
    joined = re.sub(r"([,.!?;:])", r" \1 ", joined)
    joined = re.sub(r"([,.!?;:])(?:\s*[,.!?;:])+", r"\1", joined)  # "……" is one pause, not two
    return re.sub(r"\s+", " ", joined).strip()


def speakable_text(text: str, language: str) -> str:
    """What espeak-ng is given for `text` in `language` ('zh' becomes pinyin)."""
    return to_pinyin(text) if language == "zh" else re.sub(r"\s+", " ", text).strip()


@lru_cache(maxsize=4)
def espeak_version(binary: str = ESPEAK_BINARY) -> str:
    """'1.51' from `espeak-ng --version` ("eSpeak NG text-to-speech: 1.51  Data at: ...")."""
    path = shutil.which(binary)
    if path is None:
        raise EspeakError(
            f"{binary} not found on PATH; install it (Debian/Ubuntu: apt-get install espeak-ng) "
            "or choose another tts backend"
        )
    result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    match = re.search(r"text-to-speech:\s*([\w.\-]+)", result.stdout)
    if result.returncode != 0 or not match:
        raise EspeakError(f"{binary} --version did not report a version", result.stderr or result.stdout)
    return match.group(1)


@lru_cache(maxsize=4)
def espeak_voices(binary: str = ESPEAK_BINARY) -> frozenset[str]:
    """Every name `-v` accepts (language codes, voice names, voice files), lower case.

    Checked in `setup()` because espeak-ng falls back to its default voice, silently, when a
    `voice+variant` names a voice it does not have.
    """
    result = subprocess.run([binary, "--voices"], capture_output=True, text=True, timeout=30)
    names = set()
    for line in result.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 5:
            continue
        names.update({fields[1], fields[3], fields[4], fields[4].rsplit("/", 1)[-1]})
        names.update(re.findall(r"\(([^\s()]+)\s+\d+\)", line))  # "(en 2)(zh-cmn 5)": other codes
    return frozenset(n.lower() for n in names)


@lru_cache(maxsize=4)
def espeak_variants(binary: str = ESPEAK_BINARY) -> frozenset[str]:
    """Names of the voice variants espeak-ng knows (`m1`, `f3`, `klatt`...)."""
    result = subprocess.run([binary, "--voices=variant"], capture_output=True, text=True, timeout=30)
    names = set()
    for line in result.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[4].startswith("!v/"):
            names.add(fields[4][3:])
    return frozenset(names)


def synthesize(
    text: str,
    voice: str,
    prosody: Prosody,
    *,
    binary: str = ESPEAK_BINARY,
    timeout_s: float = 60.0,
) -> tuple[np.ndarray, int]:
    """Speak `text` (already speakable: pinyin for Mandarin) with espeak-ng.

    Returns (mono float32 waveform, sampling rate as written by espeak-ng). Raises EspeakError with
    espeak-ng's stderr when it fails or writes no audio.
    """
    import soundfile as sf

    if not text.strip():
        raise EspeakError("nothing to speak: the text is empty")
    ssml = f'<speak><prosody range="{prosody.range}%">{escape(text)}</prosody></speak>'
    with tempfile.TemporaryDirectory(prefix="echat-espeak-") as tmp:
        wav_path = Path(tmp) / "out.wav"
        command = [
            binary, "-v", voice, "-s", str(prosody.speed), "-p", str(prosody.pitch),
            "-a", str(prosody.amplitude), "-m", "-w", str(wav_path), "--stdin",
        ]
        try:
            result = subprocess.run(command, input=ssml, capture_output=True, text=True, timeout=timeout_s)
        except FileNotFoundError as exc:
            raise EspeakError(f"{binary} not found on PATH") from exc
        except subprocess.TimeoutExpired as exc:
            raise EspeakError(f"{binary} timed out after {timeout_s:g} s", str(exc.stderr or "")) from exc
        if result.returncode != 0:
            raise EspeakError(f"{binary} exited with status {result.returncode}", result.stderr)
        if not wav_path.exists() or wav_path.stat().st_size == 0:
            raise EspeakError(f"{binary} wrote no audio", result.stderr)
        audio, rate = sf.read(str(wav_path), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if audio.size == 0 or not np.any(audio):
        raise EspeakError(f"{binary} wrote empty or silent audio", result.stderr)
    return audio, int(rate)


# ---------------------------------------------------------------------------------------------
# the stage


class EspeakTTS(Stage):
    """Speak `reply_text` with espeak-ng in a prosody fitting `reply_emotion`.

    Args:
        voice_en, voice_zh: espeak-ng voices for English and Mandarin replies.
        variant: the assistant's voice variant (`f3`, `m3`...; `espeak-ng --voices=variant`);
            None speaks the plain voice.
        variant_zh: the Mandarin variant, when it should differ from `variant`.
        prosody_table: a YAML file like synth/templates/prosody.yaml to use instead.
        cache_dir: cache root (`~/.cache/echat-forge` in the profiles); None: no cache.
        timeout_s: longest espeak-ng may take for one reply.
        binary: the espeak-ng executable.
    """

    name = "tts"
    reads = ("reply_text", "reply_emotion", "language")
    # tts_model is written per record (the voice depends on the language); the runner keeps it.
    writes = ("_reply_waveform", "reply_duration", "tts_model")
    # espeak-ng is a subprocess per reply (about two thirds of a reply's time is espeak-ng's, the
    # rest resampling and bookkeeping here), so replies in flight together let a one-worker build
    # use the other core. Measured, 240 demo lines (1,047 s spoken), no cache, x real time of the
    # stage: on a quiet machine 1 -> 390x, 2 -> 620x, 4 -> 640x (48 lines: 2, 3 and 4 all about
    # 680x); with other work on the machine (load about 2) 1 -> 290x, 2 -> 320x, 3 -> 340x,
    # 4 -> 360x in the one-worker build, and 4 was the best of 1-4 in every run. The runner waits
    # for the whole batch of `max_in_flight` replies before the next, so more in flight also
    # shortens the tail where one core idles. The extra espeak-ng processes are small (~10 MB).
    max_in_flight = 4
    # Calls share no mutable state: each has its own temporary folder and subprocess, the prosody
    # table is read-only after setup(), and the cache writes a temporary file renamed into place.
    thread_safe = True

    def __init__(
        self,
        voice_en: str = "en-us",
        voice_zh: str = "cmn-latn-pinyin",
        variant: str | None = "f3",
        variant_zh: str | None = None,
        prosody_table: str | None = None,
        cache_dir: str | None = None,
        timeout_s: float = 60.0,
        binary: str = ESPEAK_BINARY,
    ):
        self.voices = {"en": voice_en, "zh": voice_zh}
        self.variants = {"en": variant, "zh": variant_zh or variant}
        self.prosody_table = prosody_table
        self.cache_dir = cache_dir
        self.timeout_s = timeout_s
        self.binary = binary
        self.version: str | None = None
        self.cache: ContentCache | None = None

    def setup(self) -> None:
        self.version = espeak_version(self.binary)  # fails here, clearly, when espeak-ng is missing
        voices = espeak_voices(self.binary)
        for language, voice in self.voices.items():
            if voice.lower() not in voices:
                raise ValueError(
                    f"espeak-ng has no voice {voice!r} (for {language}); see `espeak-ng --voices`"
                )
        known = espeak_variants(self.binary)
        for language, variant in self.variants.items():
            if variant and variant not in known:
                raise ValueError(
                    f"espeak-ng has no voice variant {variant!r} (for {language}); "
                    f"known: {', '.join(sorted(known))}"
                )
        self.default_prosody, self.prosody = load_prosody_table(self.prosody_table)
        self.cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None

    def voice(self, language: str) -> str:
        variant = self.variants[language]
        return f"{self.voices[language]}+{variant}" if variant else self.voices[language]

    def describe(self, language: str = "en") -> str:
        return f"espeak-ng {self.version or '?'} {self.voice(language)}"

    def speak(self, text: str, language: str, reply_emotion: str | None) -> np.ndarray:
        """The 16 kHz mono float32 waveform of `text`; from the cache when it was spoken before."""
        prosody = self.prosody.get(reply_emotion or "", self.default_prosody)
        speakable = speakable_text(text, language)
        key = cache_key(
            backend=f"espeak-ng {self.version}", voice=self.voice(language), text=speakable,
            prosody=prosody.model_dump(), sample_rate=SAMPLE_RATE, resampler=f"soxr {RESAMPLE_QUALITY}",
        )
        if self.cache is not None:
            cached = self.cache.get_array(key)
            if cached is not None and cached.ndim == 1 and cached.size:
                return cached.astype(np.float32, copy=False)
        audio, rate = synthesize(speakable, self.voice(language), prosody, binary=self.binary, timeout_s=self.timeout_s)
        waveform = resample(audio, rate, SAMPLE_RATE)
        if self.cache is not None:
            self.cache.put_array(key, waveform)
        return waveform

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        if self.version is None:
            self.setup()
        text = (record.get("reply_text") or "").strip()
        if not text:
            yield self.reject(record, "no_reply_text", "the record has no reply_text to speak")
            return
        language = record.get("language") or guess_language(text)
        if language not in self.voices:
            yield self.reject(record, "unsupported_language", f"no espeak-ng voice configured for {language!r}")
            return
        try:
            waveform = self.speak(text, language, record.get("reply_emotion"))
        except EspeakError as exc:
            yield self.reject(record, "tts_failed", str(exc))
            return
        yield {
            **record,
            "_reply_waveform": waveform,
            "reply_duration": round(waveform.size / SAMPLE_RATE, 3),
            "tts_model": self.describe(language),
        }
