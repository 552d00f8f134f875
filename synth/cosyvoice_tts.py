"""Reply speech from CosyVoice in instruct mode, the emotion given as a style instruction.

CosyVoice (FunAudioLLM/CosyVoice) is not on PyPI: it is a source checkout with its own
requirements. When the `cosyvoice` package cannot be imported, constructing the stage (which the
profile check does at load) raises a ValueError that names what to install, so `echat build`
stops before any work; `setup()` says the same if the package disappears in between.

Two instruct APIs, as CosyVoice has them:
- CosyVoice-300M-Instruct (`CosyVoice(model)`): `inference_instruct(text, spk_id, instruction)`
  with one of the model's built-in speakers (`speakers`, per language and gender, default its
  Chinese / English female voices);
- CosyVoice2 / 3 (`prompt_wav` given: a short recording of the voice to imitate, 16 kHz):
  `inference_instruct2(text, instruction, prompt_speech_16k)` through `AutoModel` when the
  checkout has it, else `CosyVoice2`.
The instruction is the reply emotion's line of synth/templates/speech_styles.yaml. The answer
(`tts_speech` chunks at the model's `sample_rate`, 22,050 or 24,000 Hz) is joined and resampled to
16 kHz. Speech is cached (namespace `tts-cosyvoice`) by model folder, speaker or prompt file,
instruction and text, so a rerun synthesises nothing twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from echat.schemas import vocab
from echat.schemas.audio import RESAMPLE_QUALITY, resample
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject, Stage

from .cache import ContentCache, cache_key
from .reasoning import guess_language
from .speech_styles import load_speech_styles

CACHE_NAMESPACE = "tts-cosyvoice"
INSTALL_HINT = (
    "the cosyvoice tts backend needs the CosyVoice package, which is not installed (it is not on PyPI): "
    "git clone --recursive the FunAudioLLM/CosyVoice repository, `pip install -r requirements.txt` in it, "
    "put the checkout and its third_party/Matcha-TTS on PYTHONPATH, and download an instruct model "
    "(e.g. `modelscope download iic/CosyVoice-300M-Instruct --local-dir /models/CosyVoice-300M-Instruct`) "
    "for tts.params.model; or choose another tts backend (espeak, openai)"
)
# CosyVoice-300M-Instruct's built-in speakers (`list_available_spks()`), per language and gender.
DEFAULT_SPEAKERS = {
    "zh": {"female": "中文女", "male": "中文男"},
    "en": {"female": "英文女", "male": "英文男"},
}


def cosyvoice_installed() -> bool:
    try:
        return importlib.util.find_spec("cosyvoice") is not None
    except (ImportError, ValueError):
        return False


class CosyVoiceTTS(Stage):
    """Speak `reply_text` with CosyVoice's instruct mode in the style of `reply_emotion`.

    Args:
        model: the model folder (CosyVoice-300M-Instruct, or a CosyVoice2/3 folder with `prompt_wav`).
        gender: the assistant's gender, which picks the built-in speaker.
        speakers: {language: {gender: speaker id}} for CosyVoice-300M-Instruct.
        prompt_wav: a recording of the voice to speak in (CosyVoice2/3's instruct2 mode).
        styles: a YAML file like synth/templates/speech_styles.yaml instead of the packaged one.
        speed: speaking-rate factor (CosyVoice2/3 only).
        cache_dir: the call cache root (the profile's `cache_dir`); None: no cache.
    """

    name = "tts"
    reads = ("reply_text", "reply_emotion", "language")
    writes = ("_reply_waveform", "reply_duration", "tts_model")

    def __init__(
        self,
        model: str | None = None,
        gender: str = "female",
        speakers: dict[str, dict[str, str]] | None = None,
        prompt_wav: str | None = None,
        styles: str | None = None,
        speed: float = 1.0,
        cache_dir: str | None = None,
    ):
        if not cosyvoice_installed():
            raise ValueError(INSTALL_HINT)
        if not model:
            raise ValueError("params.model is required: a CosyVoice model folder (--set tts.params.model=/models/CosyVoice-300M-Instruct)")
        if gender not in vocab.GENDERS:
            raise ValueError(f"gender must be one of {', '.join(vocab.GENDERS)}, got {gender!r}")
        if prompt_wav is not None and not os.path.exists(prompt_wav):
            raise ValueError(f"prompt_wav not found: {prompt_wav}")
        self.model_dir, self.gender, self.prompt_wav = str(model), gender, prompt_wav
        self.speakers = {language: {**DEFAULT_SPEAKERS.get(language, {}), **(speakers or {}).get(language, {})}
                         for language in vocab.LANGUAGES}
        self.styles = load_speech_styles(styles)
        self.speed = float(speed)
        self.cache_dir = cache_dir
        self._model = None
        self._prompt = None
        self._cache: ContentCache | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_model=None, _prompt=None, _cache=None, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def setup(self) -> None:
        if not cosyvoice_installed():
            raise RuntimeError(INSTALL_HINT)
        from cosyvoice.cli import cosyvoice as cv

        if self.prompt_wav:
            from echat.schemas.audio import load_audio

            import torch

            loader = getattr(cv, "AutoModel", None) or cv.CosyVoice2
            self._model = loader(model_dir=self.model_dir)
            self._prompt = torch.from_numpy(load_audio(self.prompt_wav).waveform).unsqueeze(0)  # (1, T) at 16 kHz
        else:
            self._model = cv.CosyVoice(self.model_dir)
        self._cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None

    def teardown(self) -> None:
        self._model = None

    def describe(self, language: str = "en") -> str:
        voice = os.path.basename(self.prompt_wav) if self.prompt_wav else self.speakers[language][self.gender]
        return f"cosyvoice:{os.path.basename(os.path.normpath(self.model_dir))} {voice}"

    def speak(self, text: str, language: str, instruction: str, gender: str | None = None) -> np.ndarray:
        """The 16 kHz waveform of `text` spoken as `instruction` says; from the cache when known."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self.setup()
        speaker = None if self.prompt_wav else self.speakers[language][gender or self.gender]
        key = cache_key(backend="cosyvoice", model=os.path.normpath(self.model_dir), speaker=speaker,
                        prompt=_file_digest(self.prompt_wav) if self.prompt_wav else None, instruction=instruction,
                        speed=self.speed, text=text, sample_rate=SAMPLE_RATE, resampler=f"soxr {RESAMPLE_QUALITY}")
        if self._cache is not None:
            cached = self._cache.get_array(key)
            if cached is not None and cached.ndim == 1 and cached.size:
                return cached.astype(np.float32, copy=False)
        with self._lock:  # one model, one synthesis at a time
            if self.prompt_wav:
                chunks = self._model.inference_instruct2(text, instruction, self._prompt, stream=False, speed=self.speed)
            else:
                chunks = self._model.inference_instruct(text, speaker, instruction, stream=False)
            pieces = [np.asarray(_numpy(chunk["tts_speech"]), dtype=np.float32).reshape(-1) for chunk in chunks]
        if not pieces or not sum(p.size for p in pieces):
            raise RuntimeError("CosyVoice returned no speech")
        rate = int(getattr(self._model, "sample_rate", 22_050))
        waveform = resample(np.concatenate(pieces), rate, SAMPLE_RATE)
        if self._cache is not None:
            self._cache.put_array(key, waveform)
        return waveform

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        text = (record.get("reply_text") or "").strip()
        if not text:
            yield self.reject(record, "no_reply_text", "the record has no reply_text to speak")
            return
        language = record.get("language") or guess_language(text)
        if language not in self.speakers:
            yield self.reject(record, "unsupported_language", f"no CosyVoice speaker configured for {language!r}")
            return
        waveform = self.speak(text, language, self.styles.for_reply(record.get("reply_emotion")))
        yield {
            **record,
            "_reply_waveform": waveform,
            "reply_duration": round(waveform.size / SAMPLE_RATE, 3),
            "tts_model": self.describe(language),
        }


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _file_digest(path: str) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()
