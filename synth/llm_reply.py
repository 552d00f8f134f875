"""LLM replies with dual thinking through any OpenAI-compatible endpoint.

One chat-completions request per record (OpenAI, DeepSeek, vLLM, llama.cpp server, Ollama: any
server that speaks `/v1/chat/completions`), through the `openai` client. The model is given the
transcript and every paralinguistic label with its score and origin (synth/llm_prompts.py renders
the versioned prompt files of synth/prompts/) and returns one JSON object: the natural-language
reasoning, the reply emotion (schemas/vocab.py REPLY_EMOTIONS) and the reply, in the user's
language, and with `turns: N` > 1 the N - 1 earlier exchanges of the dialogue that led up to the
recorded turn (the recorded speech stays the latest user turn, as the `<HISTORY>` task trains it:
earlier turns, then the speech, then the reply). The tag-form trace is then built from the labels
and the chosen reply emotion by the one definition (schemas/reasoning.py, through
synth/reasoning.tag_form, as the template engine does).

Structured output (`structured_output`): `json_schema` sends the answer's JSON schema (strict),
`json_object` asks for JSON mode, `none` sends neither; every answer is parsed and validated
whatever the mode (an endpoint may ignore the schema). An endpoint that refuses a response_format
with HTTP 400 is asked again with the next weaker mode, once per stage, with a warning.

An answer that is malformed, empty, refused, off-vocabulary, in the wrong language, over-long, or
that calls itself an AI / language model / assistant (OSUM's loader drops such replies) is asked
again with the error fed back, at most `answer_attempts` answers in all, then rejected with the
reason code of the last failure (`llm_malformed`, `llm_empty`, `llm_refused`,
`llm_off_vocabulary`, `llm_wrong_language`, `llm_too_long`, `llm_self_reference`,
`llm_bad_history`). An error status that no retry mends is rejected at once: `llm_auth_error`
(401/403), `llm_quota` (429 insufficient_quota), `llm_request_error` (any other 4xx).
HTTP 429 / 5xx / 408 / 409, timeouts and connection errors raise
`TransientError` (with the peer's Retry-After) so the stage runner retries them with backoff; the
client is built with `max_retries=0` so that nobody else retries. After `breaker_failures`
consecutive transient failures the circuit opens: for `breaker_cooldown_s` no request is sent and
each record that would have been is rejected as `circuit_open`; after the cool-down the next
requests go through, and one more failure opens it again at once.

Cache (synth/cache.py, namespace `llm-reply`, under the profile's `cache_dir`, which may be a
gs:// path): the key is the model name, the prompt version, the full request (messages) and the
sampling parameters, never the key or the base URL. Only valid answers are stored: a rerun, or a
run resumed after a crash, sends no request it already has a valid answer for, while a record that
was rejected is asked again (an answer's failure is a draw of a sampled model; storing it would
make it permanent for that configuration, and a rerun to fill the gaps would pay for nothing new).
A cached answer is validated again when read, so tightened limits apply to it too. Within a
process, records with the same key wait for one request instead of each sending their own.

Secrets: the API key is read from the environment variable `api_key_env` in `setup()`, is held
only by the openai client, and never appears in params, repr, logs, rejects or the summary
(error texts are redacted). Usage (requests, cache hits, tokens, estimated cost in micro-dollars
from `price_input_per_m` / `price_output_per_m`, USD per million tokens) is reported through
`usage()` and shows in the run summary under `stages.reply.usage`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

from echat.schemas import vocab
from echat.schemas.reasoning import THINK_END, THINK_START, wrap_think
from echat.schemas.stage import Reject, Stage
from echat.schemas.text import CJK_OR_WORD, count_cjk

from . import llm_prompts, reasoning
from echat.endpoints import (
    STRUCTURED_MODES, AnswerError, ChatEndpoint, CircuitBreaker, CircuitOpen, KeyedGate, openai_client, parse_json_object,
    safe_url, set_up_once,
)

from .cache import ContentCache, cache_key

log = logging.getLogger(__name__)

CACHE_NAMESPACE = "llm-reply"
LANGUAGES = ("en", "zh")

# Replies that speak of themselves as a machine. OSUM-EChat's loader (wenet/dataset/process/
# processor.py, `self_list`) drops replies naming an assistant, a chatbot, ChatGPT or a language
# model; these patterns catch the self-descriptions without flagging a user's topic ("I work in AI").
_MACHINE_EN = r"(?:an? )?(?:ai|a\.i\.|artificial intelligence|(?:large )?language model|chat ?bot|bot|virtual assistant|ai assistant|digital assistant|computer program)"
SELF_REFERENCE = (
    re.compile(r"\bas an? " + _MACHINE_EN[len("(?:an? )?"):] + r"\b", re.I),
    re.compile(r"\bi(?:'m|’m| am) (?:just |only |merely |not a human,? but )?" + _MACHINE_EN + r"\b", re.I),
    re.compile(r"\b(?:large )?language model\b|\bchat ?gpt\b|\bchat ?bot\b|\bvirtual assistant\b|\bai assistant\b|\bopenai\b", re.I),
    re.compile(r"(?:我是|我只是|作为)(?:一个|一名|一款)?(?:AI|ai|人工智能|语言模型|聊天机器人|机器人|程序|助手|虚拟助手|智能助手)"),
    re.compile(r"语言模型|AI助手|AI 助手|智能助手|聊天机器人|虚拟助手|ChatGPT", re.I),
)


def length_units(text: str) -> int:
    """Words (English) or characters (Chinese): schemas.text.CJK_OR_WORD tokens, marks not counted."""
    return sum(1 for token in CJK_OR_WORD.findall(text) if any(c.isalnum() for c in token))


_LATIN_WORD = re.compile(r"[A-Za-z]{2,}")


def language_problem(text: str, language: str) -> str | None:
    """Why `text` is not in `language` ("en" or "zh"), or None."""
    cjk, latin = count_cjk(text), len(_LATIN_WORD.findall(text))
    if language == "zh":
        if cjk == 0 or latin * 2 > cjk:
            return f"Chinese was asked for, but it holds {cjk} Chinese characters and {latin} Latin words"
    elif cjk:
        return f"English was asked for, but it holds {cjk} Chinese characters"
    elif latin == 0:
        return "English was asked for, but it holds no English words"
    return None


def self_reference(text: str) -> str | None:
    for pattern in SELF_REFERENCE:
        match = pattern.search(text)
        if match:
            return match.group(0)
    return None


def validate_answer(
    data: Any, *, language: str, turns: int, max_reply_words: int, max_think_words: int,
) -> dict[str, Any]:
    """The answer, normalised ({think, reply_emotion, reply[, history]}); AnswerError if unusable."""
    if not isinstance(data, dict):
        raise AnswerError("llm_malformed", "the answer is not a JSON object")
    keys = llm_prompts.answer_keys(turns)
    missing = [k for k in keys if k not in data]
    if missing:
        raise AnswerError("llm_malformed", f"the answer lacks the key(s) {', '.join(missing)}")
    for key in llm_prompts.ANSWER_KEYS:
        if not isinstance(data[key], str):
            raise AnswerError("llm_malformed", f"{key!r} must be a string, not {type(data[key]).__name__}")
    think, reply = " ".join(data["think"].split()), " ".join(data["reply"].split())
    if not reply:
        raise AnswerError("llm_empty", "the reply is empty")
    if not think:
        raise AnswerError("llm_empty", "the reasoning ('think') is empty")
    emotion = data["reply_emotion"].strip().strip("<>").strip().upper()
    if emotion not in vocab.REPLY_EMOTIONS:
        raise AnswerError("llm_off_vocabulary",
                          f"reply_emotion {data['reply_emotion']!r} is not one of {', '.join(vocab.REPLY_EMOTIONS)}")
    history: list[dict[str, str]] = []  # [{user, assistant}], oldest first
    if turns > 1:
        raw = data[llm_prompts.HISTORY_KEY]
        if not isinstance(raw, list) or len(raw) != turns - 1:
            got = f"{len(raw)} item(s)" if isinstance(raw, list) else f"a {type(raw).__name__}"
            raise AnswerError("llm_bad_history", f"'history' must list exactly {turns - 1} earlier exchange(s), got {got}")
        for i, turn in enumerate(raw):
            if not isinstance(turn, dict) or not all(isinstance(turn.get(k), str) and turn[k].strip() for k in ("user", "assistant")):
                raise AnswerError("llm_bad_history", f"history[{i}] must be an object with non-empty 'user' and 'assistant' strings")
            history.append({"user": " ".join(turn["user"].split()), "assistant": " ".join(turn["assistant"].split())})

    texts = [("reply", reply), ("think", think)]
    for i, turn in enumerate(history):
        texts += [(f"history[{i}].user", turn["user"]), (f"history[{i}].assistant", turn["assistant"])]
    for name, text in texts:
        if THINK_START in text or THINK_END in text:
            raise AnswerError("llm_malformed", f"the {name} holds the reasoning markers {THINK_START} / {THINK_END}")
    for name, text in texts:
        if not name.endswith(".user"):  # a user may well ask whether they talk to a robot
            found = self_reference(text)
            if found:
                raise AnswerError("llm_self_reference", f"the {name} speaks of itself as a machine ({found!r}); answer as a person would")
    for name, text in texts:
        problem = language_problem(text, language)
        if problem:
            raise AnswerError("llm_wrong_language", f"the {name} is in the wrong language: {problem}")
    unit = "characters" if language == "zh" else "words"
    if length_units(reply) > max_reply_words:
        raise AnswerError("llm_too_long", f"the reply has {length_units(reply)} {unit}; at most {max_reply_words}")
    if length_units(think) > max_think_words:
        raise AnswerError("llm_too_long", f"the reasoning has {length_units(think)} {unit}; at most {max_think_words}")
    for name, text in texts[2:]:
        if length_units(text) > max_reply_words:
            raise AnswerError("llm_too_long", f"{name} has {length_units(text)} {unit}; at most {max_reply_words}")
    answer: dict[str, Any] = {"think": think, "reply_emotion": emotion, "reply": reply}
    if turns > 1:
        answer[llm_prompts.HISTORY_KEY] = history
    return answer


class OpenAIReply(ChatEndpoint, Stage):
    """Replies, both reasoning forms and the reply emotion from an OpenAI-compatible endpoint.

    Args:
        model: the model name the endpoint serves (required).
        base_url: the endpoint, e.g. http://localhost:8000/v1 (vLLM); None: OpenAI's.
        api_key_env: the environment variable holding the key (read in setup, never stored).
        temperature, top_p, max_tokens, seed: sampling parameters (None: the endpoint's default).
        extra_body: further request fields for a server's own options (vLLM's top_k...).
        structured_output: json_schema | json_object | none (see the module docstring).
        timeout_s: per request; a request past it is a transient failure.
        answer_attempts: answers asked for per record (the error fed back) before it is rejected.
        turns: dialogue turns per record; > 1 adds the earlier turns as `history`.
        min_label_score: labels scored below this are shown to the model as weak.
        max_reply_words / max_think_words: longest reply / reasoning, in words (en) or characters (zh).
        prompts_dir: a folder with reply_en.yaml and reply_zh.yaml instead of synth/prompts/.
        cache_dir: the call cache root (the profile's `cache_dir`; a gs:// path works); None: no cache.
        breaker_failures: consecutive transient failures that open the circuit
            (None: twice the requests in flight, at least 8).
        breaker_cooldown_s: how long an open circuit sends nothing.
        price_input_per_m / price_output_per_m: USD per million prompt / completion tokens.
    """

    name = "reply"
    reads = (
        "id", "transcript", "transcript_origin", "transcript_confidence", "language",
        "age", "age_score", "age_model", "gender", "gender_score", "gender_model",
        "emotion", "emotion_score", "emotion_model", "events", "events_score", "events_model",
        "style", "style_score", "style_model", "speaking_rate",
    )
    writes = ("think_tags", "think_text", "reply_emotion", "reply_text", "llm_model", "prompt_version", "history")
    batch_size = 1
    max_in_flight = 32
    thread_safe = True

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float | None = 0.7,
        top_p: float | None = None,
        max_tokens: int | None = 1024,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
        structured_output: str = "json_schema",
        timeout_s: float = 60.0,
        answer_attempts: int = 3,
        turns: int = 1,
        min_label_score: float = 0.5,
        max_reply_words: int = 120,
        max_think_words: int = 300,
        prompts_dir: str | None = None,
        cache_dir: str | None = None,
        breaker_failures: int | None = None,
        breaker_cooldown_s: float = 30.0,
        price_input_per_m: float = 0.0,
        price_output_per_m: float = 0.0,
    ):
        if not model or not str(model).strip():
            raise ValueError("params.model is required: the model name the endpoint serves (--set reply.params.model=NAME)")
        if structured_output not in STRUCTURED_MODES:
            raise ValueError(f"structured_output must be one of {', '.join(STRUCTURED_MODES)}, got {structured_output!r}")
        if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise ValueError(f"api_key_env must name an environment variable, got {api_key_env!r}")
        for name, value, low in (("answer_attempts", answer_attempts, 1), ("turns", turns, 1),
                                 ("max_reply_words", max_reply_words, 1), ("max_think_words", max_think_words, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number of at least {low}, got {value!r}")
        if breaker_failures is not None and breaker_failures < 1:
            raise ValueError(f"breaker_failures must be at least 1, got {breaker_failures}")
        if timeout_s <= 0 or breaker_cooldown_s < 0 or price_input_per_m < 0 or price_output_per_m < 0:
            raise ValueError("timeout_s must be positive; breaker_cooldown_s and the prices must not be negative")
        if not 0.0 <= min_label_score <= 1.0:
            raise ValueError(f"min_label_score must be within 0-1, got {min_label_score}")
        self.model = str(model)
        self.base_url = base_url
        self.api_key_env = api_key_env
        self.temperature, self.top_p, self.max_tokens, self.seed = temperature, top_p, max_tokens, seed
        self.extra_body = dict(extra_body or {})
        self.structured_output = structured_output
        self.timeout_s = float(timeout_s)
        self.answer_attempts = answer_attempts
        self.turns = turns
        self.min_label_score = min_label_score
        self.max_reply_words, self.max_think_words = max_reply_words, max_think_words
        self.prompts_dir = prompts_dir
        self.cache_dir = cache_dir
        self.breaker_failures = breaker_failures
        self.breaker_cooldown_s = float(breaker_cooldown_s)
        self.price_input_per_m, self.price_output_per_m = float(price_input_per_m), float(price_output_per_m)
        self._prompts = {language: llm_prompts.load_prompt_set(language, prompts_dir) for language in LANGUAGES}
        self._prefixes = {language: llm_prompts.prefix_messages(ps, turns=turns, min_score=min_label_score)
                          for language, ps in self._prompts.items()}
        self._init_runtime()

    # ------------------------------------------------------------------ state

    def _init_runtime(self) -> None:
        self._client = None
        self._cache: ContentCache | None = None
        self._breaker: CircuitBreaker | None = None
        self._mode = self.structured_output
        self._lock = threading.Lock()
        self._usage: Counter = Counter()
        self._cost_micro = 0.0
        self._gate = KeyedGate()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_client", "_cache", "_breaker", "_lock", "_usage", "_cost_micro", "_gate", "_mode"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model!r}, base_url={safe_url(self.base_url)!r}, "
                f"api_key_env={self.api_key_env!r}, structured_output={self.structured_output!r}, turns={self.turns})")

    def setup(self) -> None:
        self._client = openai_client(api_key_env=self.api_key_env, base_url=self.base_url, timeout_s=self.timeout_s,
                                     what="reply", slot="reply")
        self._cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None
        self._breaker = CircuitBreaker(self.breaker_failures or max(8, 2 * self.max_in_flight), self.breaker_cooldown_s)

    def usage(self) -> dict[str, int]:
        with self._lock:
            totals = {k: int(v) for k, v in self._usage.items()}
            totals["cost_micro_usd"] = int(round(self._cost_micro))
        return totals

    # ------------------------------------------------------------------ one record

    def sampling(self) -> dict[str, Any]:
        """The request's sampling parameters (part of the cache key)."""
        params = {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens, "seed": self.seed}
        return {**{k: v for k, v in params.items() if v is not None}, **({"extra_body": self.extra_body} if self.extra_body else {})}

    def request_key(self, messages: list[dict[str, str]], prompt_version: str) -> str:
        return cache_key(kind="reply", model=self.model, prompt_version=prompt_version, messages=messages,
                         sampling=self.sampling(), structured_output=self.structured_output, turns=self.turns)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        set_up_once(self)
        transcript = (record.get("transcript") or "").strip()
        if not transcript:
            yield self.reject(record, "no_transcript", "the record has no transcript to reply to")
            return
        language = record.get("language") or reasoning.guess_language(transcript)
        if language not in self._prompts:
            yield self.reject(record, "unsupported_language", f"language {language!r}; prompts exist for {', '.join(self._prompts)}")
            return
        prompts = self._prompts[language]
        record_in = {**record, "transcript": transcript, "language": language}
        messages = llm_prompts.messages(prompts, record_in, turns=self.turns, min_score=self.min_label_score,
                                        prefix=self._prefixes[language])
        key = self.request_key(messages, prompts.version)
        with self._gate.hold(key):  # one request per key: the second finds the first's answer
            answer = self._cached(key, language)
            if answer is None:
                try:
                    answer = self._ask(messages, prompts)
                except AnswerError as exc:
                    yield self.reject(record, exc.reason, str(exc))
                    return
                except CircuitOpen as exc:
                    self._count(circuit_open=1)
                    yield self.reject(record, "circuit_open", str(exc))
                    return
                self._store(key, {"answer": answer, "model": self.model, "prompt_version": prompts.version}, "answer")
        cues = reasoning.Cues.from_record(record_in)
        out = {
            **record,
            "think_tags": reasoning.tag_form(cues, answer["reply_emotion"]),
            "think_text": wrap_think(answer["think"]),
            "reply_emotion": answer["reply_emotion"],
            "reply_text": answer["reply"],
            "llm_model": self.describe(),
            "prompt_version": prompts.version,
        }
        if self.turns > 1:
            out["history"] = as_turns(answer[llm_prompts.HISTORY_KEY])
        yield out

    def _cached(self, key: str, language: str) -> dict[str, Any] | None:
        if self._cache is None:
            return None
        entry = self._cache.get_json(key)
        if not isinstance(entry, dict):
            return None
        try:
            valid = self._validate(entry.get("answer"), language)
        except AnswerError as exc:
            log.warning("cached answer %s no longer passes validation (%s); asking again", key[:12], exc)
            return None
        self._count(cache_hits=1)
        return valid

    def _validate(self, data: Any, language: str) -> dict[str, Any]:
        return validate_answer(data, language=language, turns=self.turns,
                               max_reply_words=self.max_reply_words, max_think_words=self.max_think_words)

    # ------------------------------------------------------------------ the endpoint

    def _ask(self, messages: list[dict[str, str]], prompts: llm_prompts.PromptSet) -> dict[str, Any]:
        """A valid answer, asking again with the error fed back; AnswerError after the last try."""
        conversation = list(messages)
        error: AnswerError | None = None
        for attempt in range(1, self.answer_attempts + 1):
            response = self._complete(conversation)
            choices = getattr(response, "choices", None) or []
            content = (choices[0].message.content or "") if choices else ""
            try:
                return self._validate(self._read(response), prompts.language)
            except AnswerError as exc:
                error = exc
                self._count(invalid_answers=1)
                log.info("answer %d/%d not usable (%s): %s", attempt, self.answer_attempts, exc.reason, exc)
                conversation = conversation + [
                    {"role": "assistant", "content": content or "(no answer)"},
                    {"role": "user", "content": llm_prompts.feedback_message(prompts, str(exc), self.turns)},
                ]
        assert error is not None
        raise AnswerError(error.reason, f"{self.answer_attempts} answer(s) not usable; last: {error}")

    def _read(self, response: Any) -> dict[str, Any]:
        """The JSON object a completion answers with; AnswerError when there is none."""
        choices = getattr(response, "choices", None) or []
        if not choices:
            raise AnswerError("llm_malformed", "the completion has no choices")
        choice = choices[0]
        message = choice.message
        refusal = getattr(message, "refusal", None)
        if refusal:
            raise AnswerError("llm_refused", f"the model refused: {str(refusal)[:200]}")
        if choice.finish_reason == "content_filter":
            raise AnswerError("llm_refused", "the endpoint's content filter stopped the answer")
        content = message.content or ""
        if choice.finish_reason == "length":
            raise AnswerError("llm_too_long", f"the answer was cut off at max_tokens={self.max_tokens}")
        if not content.strip():
            raise AnswerError("llm_empty", "the answer is empty")
        return parse_json_object(content)

    def _response_format(self, mode: str) -> dict[str, Any] | None:
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "empathetic_reply", "strict": True,
                                                           "schema": llm_prompts.answer_schema(self.turns)}}
        if mode == "json_object":
            return {"type": "json_object"}
        return None

    def _used(self, prompt_tokens: int, completion_tokens: int) -> None:
        with self._lock:
            self._usage.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
            self._cost_micro += prompt_tokens * self.price_input_per_m + completion_tokens * self.price_output_per_m

def as_turns(history: list[dict[str, str]]) -> list[dict[str, str]]:
    """[{user, assistant}, ...] as the record's `history`: [{role, text}, ...], oldest first."""
    return [{"role": role, "text": exchange[role]} for exchange in history for role in ("user", "assistant")]


