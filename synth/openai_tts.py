"""Reply speech from an OpenAI-compatible speech endpoint (`POST /v1/audio/speech`).

One request per reply through the `openai` client's `audio.speech.create(model, voice, input,
instructions, response_format="wav")`: OpenAI's own endpoint, or any server that speaks the same
protocol (a local Kokoro / Orpheus / openedai-speech server, vLLM's audio models...). The voice is
`voice` when given, else the `voices` entry for the assistant's `gender`; the style instruction is
the reply emotion's line of synth/templates/speech_styles.yaml (`instructions: false` for a model
that takes none, such as tts-1). The answer is decoded with the build's own decoder
(schemas/audio.py: soundfile, then FFmpeg) to mono float32 and resampled to 16 kHz.

Failures:
- HTTP 429 / 5xx / 408 / 409 / 425, timeouts and connection errors (a body cut off mid-transfer
  is one) raise `TransientError` with the peer's Retry-After: the stage runner retries them with
  backoff (the client is built with `max_retries=0`, so nobody else does).
- 401 / 403 reject the record as `tts_auth_error`, any other 4xx as `tts_request_error`.
- An answer that is not decodable audio (a WAV whose data chunk is shorter than its header says,
  an HTML error page, no samples) is asked for again, at most `audio_attempts` answers in all, then
  rejected as `tts_bad_audio` with what was wrong.

Cache (synth/cache.py, namespace `tts-openai`, under the profile's `cache_dir`): the key is the
model, voice, instructions (with the style table's version), speed, text and the output rate, never
the key or the URL; the value is the decoded 16 kHz waveform. Only good audio is stored, so a rerun
pays for no speech it already has, and records of one text in flight at once send one request.
`usage()` (the summary's `stages.tts.usage`): requests, cache hits, characters sent, transient
errors, bad answers and the estimated cost (`price_per_m_chars`, USD per million characters).

`speak()` is what `echat synth-queries --tts profile` speaks user turns with (voice by the intended
gender, instructions by the intended emotion and age).
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from echat.schemas import vocab
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject, Stage, TransientError

from .cache import ContentCache, cache_key
from echat.endpoints import TRANSIENT_STATUS, KeyedGate, error_text, openai_client, redact, retry_after, safe_url, set_up_once
from .speech_styles import SpeechStyles, load_speech_styles

log = logging.getLogger(__name__)

CACHE_NAMESPACE = "tts-openai"
DEFAULT_VOICES = {"female": "nova", "male": "onyx"}


class BadAudio(ValueError):
    """An answer that is not usable audio; the record is rejected as `tts_bad_audio` after the re-asks."""


class RequestRefused(Exception):
    """A permanent refusal of the request (4xx other than the transient ones)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def decode_speech(data: bytes) -> np.ndarray:
    """The 16 kHz mono float32 waveform of an audio answer; BadAudio saying what is wrong."""
    from echat.schemas.audio import AudioError, decode_bytes

    if not data:
        raise BadAudio("the answer has no body")
    try:
        decoded = decode_bytes(data, target_sample_rate=SAMPLE_RATE)
    except AudioError as exc:
        raise BadAudio(f"{exc.reason}: {exc.detail}") from None
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad answer
        raise BadAudio(f"undecodable ({type(exc).__name__}: {exc})") from None
    wave = decoded.waveform
    if wave.size == 0 or not np.any(wave):
        raise BadAudio("the audio is empty or silent")
    return wave.astype(np.float32, copy=False)


class OpenAISpeechTTS(Stage):
    """Speak `reply_text` through an OpenAI-compatible `audio.speech` endpoint.

    Args:
        model: the speech model the endpoint serves (required), e.g. gpt-4o-mini-tts.
        base_url: the endpoint, e.g. http://localhost:8880/v1; None: OpenAI's.
        api_key_env: the environment variable holding the key (read in setup, never stored).
        voice: one voice for every reply; None: `voices[gender]`.
        gender: the assistant's gender, which picks the voice from `voices`.
        voices: voice per gender (default nova / onyx).
        instructions: send the reply emotion's style instruction (false for models without it).
        styles: a YAML file like synth/templates/speech_styles.yaml instead of the packaged one.
        speed: the endpoint's speed factor (None: its default).
        timeout_s: per request; a request past it is a transient failure.
        audio_attempts: answers asked for when one is not usable audio, before the record is rejected.
        cache_dir: the call cache root (the profile's `cache_dir`); None: no cache.
        price_per_m_chars: USD per million input characters, for the cost estimate.
    """

    name = "tts"
    reads = ("reply_text", "reply_emotion")  # the endpoint reads the text's language itself
    writes = ("_reply_waveform", "reply_duration", "tts_model")
    max_in_flight = 8
    thread_safe = True

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        voice: str | None = None,
        gender: str = "female",
        voices: dict[str, str] | None = None,
        instructions: bool = True,
        styles: str | None = None,
        speed: float | None = None,
        timeout_s: float = 60.0,
        audio_attempts: int = 3,
        cache_dir: str | None = None,
        price_per_m_chars: float = 0.0,
    ):
        if not model or not str(model).strip():
            raise ValueError("params.model is required: the speech model the endpoint serves (--set tts.params.model=NAME)")
        if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
        if gender not in vocab.GENDERS:
            raise ValueError(f"gender must be one of {', '.join(vocab.GENDERS)}, got {gender!r}")
        self.voices = {**DEFAULT_VOICES, **(voices or {})}
        unknown = sorted(set(self.voices) - set(vocab.GENDERS))
        if unknown:
            raise ValueError(f"voices are given per gender ({', '.join(vocab.GENDERS)}); unknown key(s) {unknown}")
        if not isinstance(audio_attempts, int) or audio_attempts < 1:
            raise ValueError(f"audio_attempts must be a whole number of at least 1, got {audio_attempts!r}")
        if timeout_s <= 0 or price_per_m_chars < 0 or (speed is not None and speed <= 0):
            raise ValueError("timeout_s and speed must be positive, price_per_m_chars not negative")
        self.model, self.base_url, self.api_key_env = str(model), base_url, api_key_env
        self.voice, self.gender = voice, gender
        self.instructions, self.styles_path, self.speed = bool(instructions), styles, speed
        self.timeout_s, self.audio_attempts = float(timeout_s), audio_attempts
        self.cache_dir, self.price_per_m_chars = cache_dir, float(price_per_m_chars)
        self.styles: SpeechStyles = load_speech_styles(styles)  # a bad table fails at load
        self._init_runtime()

    # ------------------------------------------------------------------ state

    def _init_runtime(self) -> None:
        self._client = None
        self._cache: ContentCache | None = None
        self._lock = threading.Lock()
        self._usage: Counter = Counter()
        self._gate = KeyedGate()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_client", "_cache", "_lock", "_usage", "_gate"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={safe_url(self.base_url)!r}, voice={self.voice_for()!r})"

    def setup(self) -> None:
        self._client = openai_client(api_key_env=self.api_key_env, base_url=self.base_url, timeout_s=self.timeout_s,
                                     what="speech", slot="tts")
        self._cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def voice_for(self, gender: str | None = None) -> str:
        return self.voice or self.voices[gender or self.gender]

    def describe(self, voice: str | None = None) -> str:
        return f"openai-compatible:{self.model} {voice or self.voice_for()}"

    def usage(self) -> dict[str, int]:
        with self._lock:
            totals = {k: int(v) for k, v in self._usage.items()}
        totals["cost_micro_usd"] = int(round(totals.get("characters", 0) * self.price_per_m_chars))
        return totals

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._usage.update(amounts)

    # ------------------------------------------------------------------ speaking

    def request_key(self, text: str, voice: str, instructions: str | None) -> str:
        return cache_key(kind="speech", model=self.model, voice=voice, instructions=instructions,
                         styles=self.styles.version if instructions else None, speed=self.speed, text=text,
                         response_format="wav", sample_rate=SAMPLE_RATE)

    def speak(self, text: str, *, voice: str | None = None, instructions: str | None = None) -> np.ndarray:
        """The 16 kHz waveform of `text`: from the cache, or asked for (re-asked when the answer is
        not usable audio). Raises TransientError, RequestRefused or BadAudio."""
        set_up_once(self)
        voice = voice or self.voice_for()
        key = self.request_key(text, voice, instructions)
        with self._gate.hold(key):
            if self._cache is not None:
                cached = self._cache.get_array(key)
                if cached is not None and cached.ndim == 1 and cached.size:
                    self._count(cache_hits=1)
                    return cached.astype(np.float32, copy=False)
            problem = None
            for attempt in range(1, self.audio_attempts + 1):
                data = self._request(text, voice, instructions)
                try:
                    waveform = decode_speech(data)
                except BadAudio as exc:
                    problem = exc
                    self._count(bad_audio=1)
                    log.info("speech answer %d/%d not usable: %s", attempt, self.audio_attempts, exc)
                    continue
                if self._cache is not None:
                    try:
                        self._cache.put_array(key, waveform)
                    except Exception as exc:  # noqa: BLE001 - the audio is good; only a rerun would pay again
                        self._count(cache_write_errors=1)
                        log.warning("could not cache speech %s: %s", key[:12], exc)
                return waveform
        raise BadAudio(f"{self.audio_attempts} answer(s) not usable audio; last: {problem}")

    def _request(self, text: str, voice: str, instructions: str | None) -> bytes:
        import openai

        assert self._client is not None
        params: dict[str, Any] = {"model": self.model, "voice": voice, "input": text, "response_format": "wav"}
        if instructions:
            params["instructions"] = instructions
        if self.speed is not None:
            params["speed"] = self.speed
        self._count(requests=1, characters=len(text))
        key = getattr(self._client, "api_key", None)
        try:
            response = self._client.audio.speech.create(**params)
            return response.read()
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in TRANSIENT_STATUS or status >= 500:
                self._count(transient_errors=1)
                raise TransientError(f"HTTP {status}: {redact(error_text(exc), key)}", retry_after=retry_after(exc.response)) from None
            if status in (401, 403):
                raise RequestRefused("tts_auth_error", f"HTTP {status}: the endpoint refused the credentials (${self.api_key_env})") from None
            raise RequestRefused("tts_request_error", f"HTTP {status}: {redact(error_text(exc), key)}") from None
        except openai.APITimeoutError:
            self._count(transient_errors=1)
            raise TransientError(f"no answer within {self.timeout_s:g} s") from None
        except openai.APIConnectionError as exc:
            self._count(transient_errors=1)
            cause = exc.__cause__ or exc
            raise TransientError(f"connection failed: {redact(f'{type(cause).__name__}: {cause}', key)}") from None

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        text = (record.get("reply_text") or "").strip()
        if not text:
            yield self.reject(record, "no_reply_text", "the record has no reply_text to speak")
            return
        voice = self.voice_for()
        instructions = self.styles.for_reply(record.get("reply_emotion")) if self.instructions else None
        try:
            waveform = self.speak(text, voice=voice, instructions=instructions)
        except RequestRefused as exc:
            yield self.reject(record, exc.reason, str(exc))
            return
        except BadAudio as exc:
            yield self.reject(record, "tts_bad_audio", str(exc))
            return
        yield {
            **record,
            "_reply_waveform": waveform,
            "reply_duration": round(waveform.size / SAMPLE_RATE, 3),
            "tts_model": self.describe(voice),
        }
