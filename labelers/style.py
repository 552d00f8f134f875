"""Style stages: the speaking style of a transcript, in OSUM's set (schemas/vocab.py STYLES).

Two backends of the `style` slot:

`KeywordStyle` (backend `keywords`, offline, origin heuristic). Rules over the transcript: each
style has English words/phrases (whole words, any case) and Chinese strings (substrings) in
labelers/style_keywords.yaml; a phrase of several words counts twice. The style with the most
evidence wins (ties go to the earlier style in the vocabulary); a transcript with no evidence is
"other". Scores stay low, because one sentence rarely says its genre: 0.2 for "other", else
0.3 + 0.1 per point of evidence above the runner-up, at most `max_score` (0.6). A record without a
transcript is left alone (nothing to judge) and flagged `style_unknown`.

`OpenAIStyle` (backend `openai`, production, origin model). One chat-completions request per record
to any OpenAI-compatible endpoint (OpenAI, DeepSeek, vLLM, llama.cpp server), through the `openai`
client with `max_retries=0`: the transcript and the list of styles go in, one JSON object
{"style", "confidence"} comes back (a strict JSON schema by default; `json_object` / `none` for
servers without structured outputs, and an HTTP 400 about the response format switches to the next
weaker mode once). The style is normalised through the one alias table (schemas/labels.py, which
also knows OSUM's Chinese style names); `style_score` is the model's confidence. HTTP 429, 5xx,
408/409, timeouts and connection errors raise `TransientError` (with the peer's Retry-After) for the
stage runner's retries; 401/403 reject the record as `llm_auth_error`, a 429 `insufficient_quota` as
`llm_quota`, any other 4xx as `llm_request_error`. An answer that is not valid after
`answer_attempts` tries leaves the style empty with the flag `style_unknown` (the record is kept: a
missing style is no reason to lose a transcribed turn). After `breaker_failures` consecutive
transient failures the circuit opens for `breaker_cooldown_s` (records rejected as `circuit_open`).
The key comes from the environment variable `api_key_env` in `setup()` and never appears in
params, logs or rejects; an unset variable sends the placeholder to a local server (`base_url` set)
and is an error for OpenAI's own endpoint. Valid answers are cached (synth/cache.py, namespace
`llm-style`, under `cache_dir`), keyed by model, prompt version, messages and sampling, so a rerun
pays nothing twice. The endpoint helpers (Retry-After, URL and key redaction, error parsing, JSON
extraction, the circuit breaker) are the reply stage's (synth/llm_reply.py), imported.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar

from echat.schemas.stage import HEURISTIC, MODEL, Reject, Stage
from echat.schemas.vocab import STYLES
from echat.endpoints import (
    STRUCTURED_MODES, AnswerError, ChatEndpoint, CircuitBreaker, CircuitOpen, openai_client, parse_json_object, safe_url,
    set_up_once,
)

from .flags import add_flag

log = logging.getLogger(__name__)

UNKNOWN_FLAG = "style_unknown"
KEYWORDS_MODEL = "style-keywords-v1"
PROMPT_VERSION = "style-v1"
CACHE_NAMESPACE = "llm-style"
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


# ---------------------------------------------------------------------------------------------
# offline: keyword rules


@lru_cache(maxsize=1)
def keyword_rules() -> dict[str, tuple[list[re.Pattern], list[str]]]:
    """style -> (English patterns with their weights folded in as repeats, Chinese strings)."""
    import yaml

    text = resources.files("echat.labelers").joinpath("style_keywords.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    unknown = sorted(set(data) - set(STYLES))
    if unknown:
        raise RuntimeError(f"style_keywords.yaml names styles outside the vocabulary: {unknown}")
    rules = {}
    for style in STYLES:
        entry = data.get(style) or {}
        english = []
        for phrase in entry.get("en") or []:
            words = str(phrase).lower().split()
            pattern = re.compile(r"(?<![\w'])" + r"\s+".join(re.escape(w) for w in words) + r"(?![\w'])")
            english.extend([pattern] * (2 if len(words) > 1 else 1))
        rules[style] = (english, [str(s) for s in entry.get("zh") or []])
    return rules


def keyword_evidence(transcript: str) -> dict[str, int]:
    """Points of evidence per style in `transcript` (every style, zeros included)."""
    text = " ".join(transcript.lower().split())
    points = {}
    for style, (english, chinese) in keyword_rules().items():
        count = sum(len(p.findall(text)) for p in english)
        if _CJK.search(text):
            count += sum(text.count(s) for s in chinese)
        points[style] = count
    return points


class KeywordStyle(Stage):
    name: ClassVar[str] = "style"
    reads: ClassVar[tuple[str, ...]] = ("transcript",)
    writes: ClassVar[tuple[str, ...]] = ("style", "style_score", "style_model", "quality_flags")
    origin: ClassVar[str] = HEURISTIC

    def __init__(self, max_score: float = 0.6):
        if not 0.3 <= max_score <= 1.0:
            raise ValueError(f"max_score must be within 0.3-1, got {max_score}")
        self.max_score = float(max_score)

    def setup(self) -> None:
        keyword_rules()

    def describe(self) -> str:
        return KEYWORDS_MODEL

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        out = dict(record)
        transcript = (record.get("transcript") or "").strip()
        if not transcript:
            add_flag(out, UNKNOWN_FLAG)
            yield out
            return
        style, score = self.classify(transcript)
        out["style"], out["style_score"] = style, score
        yield out

    def classify(self, transcript: str) -> tuple[str, float]:
        points = keyword_evidence(transcript)
        ranked = sorted(STYLES, key=lambda s: (-points[s], STYLES.index(s)))
        best, runner_up = ranked[0], ranked[1]
        if points[best] == 0:
            return "other", 0.2
        margin = points[best] - points[runner_up]
        return best, float(min(self.max_score, 0.3 + 0.1 * margin))


# ---------------------------------------------------------------------------------------------
# production: an OpenAI-compatible endpoint


SYSTEM_PROMPT = (
    "You label the speaking style of one transcribed utterance for a speech corpus. "
    "Choose exactly one style from this list: {styles}. "
    "news/science: news reading or popular-science explanation; horror story: a scary tale; "
    "fairy tale: a children's story of magic, kings or talking animals; customer service: an agent or a "
    "customer dealing with orders, accounts or complaints; poetry/prose: a poem or lyrical prose; "
    "audiobook: narration of a book, with narrative voice or dialogue tags; daily conversation: everyday "
    "talk between people; other: none of these. The utterance may be English or Chinese. "
    'Answer with one JSON object: {{"style": "<one style from the list>", "confidence": <0 to 1>}}.'
)


def style_messages(transcript: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM_PROMPT.format(styles=", ".join(STYLES))},
        {"role": "user", "content": f"Utterance: \"{transcript}\""},
    ]


def answer_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"style": {"type": "string", "enum": list(STYLES)}, "confidence": {"type": "number"}},
        "required": ["style", "confidence"],
        "additionalProperties": False,
    }


def validate_style_answer(data: Any) -> tuple[str, float]:
    """(style, confidence) of a parsed answer; AnswerError naming what is wrong."""
    from echat.schemas.labels import LabelError, normalise

    if not isinstance(data, dict) or "style" not in data:
        raise AnswerError("llm_malformed", "the answer lacks the key 'style'")
    try:
        style = normalise("style", data["style"])
    except LabelError as exc:
        raise AnswerError("llm_off_vocabulary", str(exc)) from None
    confidence = data.get("confidence", 0.5)
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)):
        raise AnswerError("llm_malformed", f"confidence must be a number, got {confidence!r}")
    return style, float(min(1.0, max(0.0, confidence)))


class OpenAIStyle(ChatEndpoint, Stage):
    name: ClassVar[str] = "style"
    reads: ClassVar[tuple[str, ...]] = ("transcript",)
    writes: ClassVar[tuple[str, ...]] = ("style", "style_score", "style_model", "quality_flags")
    origin: ClassVar[str] = MODEL
    batch_size: ClassVar[int] = 1
    max_in_flight: ClassVar[int] = 16
    thread_safe: ClassVar[bool] = True

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float | None = 0.0,
        max_tokens: int | None = 64,
        structured_output: str = "json_schema",
        timeout_s: float = 30.0,
        answer_attempts: int = 2,
        cache_dir: str | None = None,
        breaker_failures: int | None = None,
        breaker_cooldown_s: float = 30.0,
    ):
        if not model or not str(model).strip():
            raise ValueError("params.model is required: the model name the endpoint serves (--set style.params.model=NAME)")
        if structured_output not in STRUCTURED_MODES:
            raise ValueError(f"structured_output must be one of {', '.join(STRUCTURED_MODES)}, got {structured_output!r}")
        if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
        if not isinstance(answer_attempts, int) or answer_attempts < 1:
            raise ValueError(f"answer_attempts must be a whole number of at least 1, got {answer_attempts!r}")
        if timeout_s <= 0 or breaker_cooldown_s < 0:
            raise ValueError("timeout_s must be positive and breaker_cooldown_s not negative")
        if breaker_failures is not None and breaker_failures < 1:
            raise ValueError(f"breaker_failures must be at least 1, got {breaker_failures}")
        self.model = str(model)
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature, self.max_tokens = temperature, max_tokens
        self.structured_output = structured_output
        self.timeout_s = float(timeout_s)
        self.answer_attempts = answer_attempts
        self.cache_dir = cache_dir
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = float(breaker_cooldown_s)
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._client = None
        self._cache = None
        self._breaker = None
        self._mode = self.structured_output
        self._lock = threading.Lock()
        self._usage: Counter = Counter()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_client", "_cache", "_breaker", "_lock", "_usage", "_mode"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={safe_url(self.base_url)!r}, api_key_env={self.api_key_env!r})"

    def setup(self) -> None:
        from echat.synth.cache import ContentCache

        self._client = openai_client(api_key_env=self.api_key_env, base_url=self.base_url, timeout_s=self.timeout_s,
                                     what="style", slot="style")
        self._cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None
        self._breaker = CircuitBreaker(self.breaker_failures or max(8, 2 * self.max_in_flight), self.breaker_cooldown_s)

    def sampling(self) -> dict[str, Any]:
        return {k: v for k, v in (("temperature", self.temperature), ("max_tokens", self.max_tokens)) if v is not None}

    def request_key(self, messages: list[dict[str, str]]) -> str:
        from echat.synth.cache import cache_key

        return cache_key(kind="style", model=self.model, prompt_version=PROMPT_VERSION, messages=messages,
                         sampling=self.sampling(), structured_output=self.structured_output)

    # ------------------------------------------------------------------ one record

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        set_up_once(self)
        out = dict(record)
        transcript = (record.get("transcript") or "").strip()
        if not transcript:
            add_flag(out, UNKNOWN_FLAG)
            yield out
            return
        messages = style_messages(transcript)
        key = self.request_key(messages)
        answer = self._cached(key)
        if answer is None:
            try:
                answer = self._ask(messages)
            except CircuitOpen as exc:
                self._count(circuit_open=1)
                yield self.reject(record, "circuit_open", str(exc))
                return
            except AnswerError as exc:
                if exc.reason in ("llm_auth_error", "llm_quota", "llm_request_error"):
                    yield self.reject(record, exc.reason, str(exc))
                    return
                log.info("%s: no usable style answer (%s): %s", self.slot_name, exc.reason, exc)
                add_flag(out, UNKNOWN_FLAG)
                yield out
                return
            self._store(key, {"style": answer[0], "confidence": answer[1], "model": self.model,
                              "prompt_version": PROMPT_VERSION}, "style answer")
        out["style"], out["style_score"] = answer
        yield out

    def _cached(self, key: str) -> tuple[str, float] | None:
        if self._cache is None:
            return None
        entry = self._cache.get_json(key)
        if not isinstance(entry, dict):
            return None
        try:
            answer = validate_style_answer(entry)
        except AnswerError:
            return None
        self._count(cache_hits=1)
        return answer

    def _ask(self, messages: list[dict[str, str]]) -> tuple[str, float]:
        conversation = list(messages)
        error = None
        for _ in range(self.answer_attempts):
            response = self._complete(conversation)
            choices = getattr(response, "choices", None) or []
            content = (choices[0].message.content or "") if choices else ""
            try:
                if not content.strip():
                    raise AnswerError("llm_empty", "the answer is empty")
                return validate_style_answer(parse_json_object(content))
            except AnswerError as exc:
                error = exc
                self._count(invalid_answers=1)
                conversation = conversation + [
                    {"role": "assistant", "content": content or "(no answer)"},
                    {"role": "user", "content": f"That answer cannot be used: {exc}. Answer again with one JSON object "
                                                f"whose style is one of: {', '.join(STYLES)}."},
                ]
        raise AnswerError(error.reason, f"{self.answer_attempts} answer(s) not usable; last: {error}")

    def _response_format(self, mode: str) -> dict[str, Any] | None:
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "speaking_style", "strict": True, "schema": answer_schema()}}
        if mode == "json_object":
            return {"type": "json_object"}
        return None

