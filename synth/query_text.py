"""What a synthetic user turn says: a line of the offline bank, or a turn an LLM writes for its cues.

`LineBank` (synth/query_lines.yaml) deals lines per (language, age group, emotion): a query takes a
line of its age group and emotion when the bank has some, else one of its emotion, each list in a
seeded shuffled order, so a line repeats only after its whole list has been used.

`QueryTextLLM` is a Stage (run by `echat synth-queries` under the stage runner, so HTTP 429 / 5xx,
timeouts and connection errors are retried with the profile's backoff and Retry-After): one
chat-completions request per query through the `openai` client (`max_retries=0`), any
OpenAI-compatible endpoint (the reply backend's), with the prompt of synth/prompts/query.yaml
filled with the query's language, speaker age, emotion, events, a topic and its index (so the
queries of one plan differ). The answer is one JSON object {"text": ...}; one that is not, is empty,
in the wrong language (synth/llm_reply.language_problem) or too long is asked again with the error
fed back (`answer_attempts`), then rejected, and the command falls back to the line bank for it.
Valid answers are cached (namespace `llm-query`) by model, prompt version, messages and sampling
parameters: a rerun sends no request it already has an answer for.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from echat.schemas import vocab
from echat.schemas.stage import Reject, Stage, TransientError

from .cache import ContentCache, cache_key
from echat.endpoints import (
    TRANSIENT_STATUS, AnswerError, error_text, openai_client, parse_json_object, retry_after, safe_url, set_up_once,
)
from .llm_reply import language_problem, length_units

log = logging.getLogger(__name__)

LINES_FILE = "query_lines.yaml"
PROMPT_FILE = "prompts/query.yaml"
CACHE_NAMESPACE = "llm-query"
QUERY_KEY = "_query"  # the planned query a record carries through the stage
TEXT_KEY = "_query_text"


# ---------------------------------------------------------------------------------------------
# the offline bank


class LineBank:
    """Lines per language, emotion and (optionally) age group, dealt without repeats per list."""

    def __init__(self, lines: dict[tuple[str, str | None, str], list[str]], version: str, seed: int = 0):
        self.lines = lines
        self.version = version
        self.seed = seed
        self._decks: dict[tuple, list[str]] = {}
        self._taken: Counter = Counter()

    @classmethod
    def load(cls, path: str | Path | None = None, seed: int = 0) -> "LineBank":
        if path:
            text, where = Path(path).read_text("utf-8"), str(path)
        else:
            text, where = resources.files("echat.synth").joinpath(LINES_FILE).read_text("utf-8"), f"synth/{LINES_FILE}"
        data = yaml.safe_load(text) or {}
        lines: dict[tuple[str, str | None, str], list[str]] = {}
        for language in vocab.LANGUAGES:
            section = data.get(language)
            if not isinstance(section, dict):
                raise ValueError(f"{where}: no lines for language {language!r}")
            for key, value in section.items():
                if key in vocab.AGES:
                    for emotion, items in (value or {}).items():
                        lines[(language, key, _emotion(emotion, where))] = _texts(items, where)
                else:
                    lines[(language, None, _emotion(key, where))] = _texts(value, where)
            if (language, None, "neutral") not in lines:
                raise ValueError(f"{where}: {language} needs neutral lines (the fallback of every emotion)")
        return cls(lines, str(data.get("version") or "query-lines"), seed)

    def emotions(self, language: str) -> set[str]:
        return {emotion for (lang, age, emotion) in self.lines if lang == language and age is None}

    def pick(self, language: str, age: str, emotion: str) -> str:
        """The next line for a query in `language` by a speaker of `age` in `emotion`."""
        key = (language, age, emotion) if (language, age, emotion) in self.lines else (language, None, emotion)
        if key not in self.lines:
            raise ValueError(f"the line bank has no {language} lines for emotion {emotion!r}")
        deck = self._decks.get(key)
        if not deck:
            deck = list(self.lines[key])
            random.Random(f"{self.seed}:{key}:{self._taken[key]}").shuffle(deck)
            self._decks[key] = deck
        self._taken[key] += 1
        return deck.pop()


def _emotion(name: Any, where: str) -> str:
    if name not in vocab.EMOTIONS:
        raise ValueError(f"{where}: {name!r} is neither an emotion ({', '.join(vocab.EMOTIONS)}) nor an age group")
    return str(name)


def _texts(items: Any, where: str) -> list[str]:
    if not isinstance(items, list) or not items or not all(isinstance(t, str) and t.strip() for t in items):
        raise ValueError(f"{where}: every list of lines must hold non-empty strings")
    return [t.strip() for t in items]


# ---------------------------------------------------------------------------------------------
# the LLM


@dataclass(frozen=True)
class QueryPrompt:
    version: str
    system: str
    user: str
    feedback: str
    languages: dict[str, str]
    speakers: dict[str, str]
    units: dict[str, str]
    topics: tuple[str, ...]


@lru_cache(maxsize=4)
def load_query_prompt(path: str | None = None) -> QueryPrompt:
    text = Path(path).read_text("utf-8") if path else resources.files("echat.synth").joinpath(PROMPT_FILE).read_text("utf-8")
    data = yaml.safe_load(text) or {}
    try:
        return QueryPrompt(
            version=str(data["version"]), system=str(data["system"]).strip(), user=str(data["user"]).strip(),
            feedback=str(data["feedback"]).strip(), languages=dict(data["languages"]), speakers=dict(data["speakers"]),
            units=dict(data["units"]), topics=tuple(data["topics"]),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path or 'synth/' + PROMPT_FILE}: missing or bad key {exc}") from None


def query_messages(prompt: QueryPrompt, query: dict[str, Any], max_units: int) -> list[dict[str, str]]:
    """The chat messages that ask for one user turn fitting `query`'s cues."""
    language = query["language"]
    events = ", ".join(e.replace("_", " ") for e in query["events"]) or "none"
    user = prompt.user.format(
        index=int(query.get("plan_index", 0)) + 1, language_name=prompt.languages[language],
        speaker=f"{prompt.speakers[query['age']]}, {query['gender']}", emotion=query["emotion"], events=events,
        topic=prompt.topics[int(query.get("plan_index", 0)) % len(prompt.topics)], max_units=max_units,
        unit=prompt.units[language],
    )
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


def validate_text(data: Any, language: str, max_units: int) -> str:
    """The user turn of an answer; AnswerError saying what is wrong with it."""
    if not isinstance(data, dict) or not isinstance(data.get("text"), str):
        raise AnswerError("llm_malformed", 'the answer must be a JSON object {"text": "..."}')
    text = " ".join(data["text"].split()).strip().strip('"“”')
    if not text:
        raise AnswerError("llm_empty", "the text is empty")
    if any(mark in text for mark in ("*", "(", ")", "（", "）", "[", "]")):
        raise AnswerError("llm_malformed", "the text holds stage directions or brackets; write only the spoken words")
    problem = language_problem(text, language)
    if problem:
        raise AnswerError("llm_wrong_language", problem)
    if length_units(text) > max_units:
        raise AnswerError("llm_too_long", f"the text has {length_units(text)} units; at most {max_units}")
    return text


class QueryTextLLM(Stage):
    """A user turn for each planned query (`_query`) from an OpenAI-compatible chat endpoint."""

    name = "query_text"
    reads = (QUERY_KEY,)
    writes = (TEXT_KEY,)
    max_in_flight = 8
    thread_safe = True

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 temperature: float | None = 0.9, max_tokens: int | None = 200, timeout_s: float = 60.0,
                 answer_attempts: int = 3, max_words_en: int = 30, max_chars_zh: int = 45, cache_dir: str | None = None,
                 prompt_file: str | None = None, json_mode: bool = True):
        if not model:
            raise ValueError("an LLM model name is required (--llm-model)")
        self.model, self.base_url, self.api_key_env = str(model), base_url, api_key_env
        self.temperature, self.max_tokens, self.timeout_s = temperature, max_tokens, float(timeout_s)
        self.answer_attempts = int(answer_attempts)
        self.max_units = {"en": int(max_words_en), "zh": int(max_chars_zh)}
        self.cache_dir, self.json_mode = cache_dir, bool(json_mode)
        self.prompt = load_query_prompt(prompt_file)
        self._client = None
        self._cache: ContentCache | None = None
        self._lock = threading.Lock()
        self._usage: Counter = Counter()

    def setup(self) -> None:
        self._client = openai_client(api_key_env=self.api_key_env, base_url=self.base_url, timeout_s=self.timeout_s,
                                     what="query text")
        self._cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def describe(self) -> str:
        return f"openai-compatible:{self.model}"

    def usage(self) -> dict[str, int]:
        with self._lock:
            return dict(self._usage)

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._usage.update(amounts)

    def sampling(self) -> dict[str, Any]:
        return {k: v for k, v in {"temperature": self.temperature, "max_tokens": self.max_tokens}.items() if v is not None}

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        set_up_once(self)
        query = record[QUERY_KEY]
        language, limit = query["language"], self.max_units[query["language"]]
        messages = query_messages(self.prompt, query, limit)
        key = cache_key(kind="query", model=self.model, prompt_version=self.prompt.version, messages=messages,
                        sampling=self.sampling(), json_mode=self.json_mode)
        if self._cache is not None:
            entry = self._cache.get_json(key)
            if isinstance(entry, dict):
                try:
                    text = validate_text({"text": entry.get("text")}, language, limit)
                    self._count(cache_hits=1)
                    yield {**record, TEXT_KEY: text}
                    return
                except AnswerError:
                    pass
        conversation, error = list(messages), None
        for _ in range(self.answer_attempts):
            content = self._request(conversation)
            try:
                text = validate_text(parse_json_object(content), language, limit)
            except AnswerError as exc:
                error = exc
                self._count(invalid_answers=1)
                conversation += [{"role": "assistant", "content": content or "(no answer)"},
                                 {"role": "user", "content": self.prompt.feedback.replace("{error}", str(exc))}]
                continue
            if self._cache is not None:
                self._cache.put_json(key, {"text": text, "model": self.model, "prompt_version": self.prompt.version})
            yield {**record, TEXT_KEY: text}
            return
        yield self.reject(record, error.reason if error else "llm_malformed", f"{self.answer_attempts} answer(s) not usable; last: {error}")

    def _request(self, messages: list[dict[str, str]]) -> str:
        import openai
        from openai.types.chat import ChatCompletion

        assert self._client is not None
        body: dict[str, Any] = {"model": self.model, "messages": messages, **self.sampling()}
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        self._count(requests=1)
        try:
            response = self._client.post("/chat/completions", body=body, cast_to=ChatCompletion)
        except openai.APIStatusError as exc:
            if exc.status_code in TRANSIENT_STATUS or exc.status_code >= 500:
                self._count(transient_errors=1)
                raise TransientError(f"HTTP {exc.status_code}: {error_text(exc)}", retry_after=retry_after(exc.response)) from None
            raise RuntimeError(f"HTTP {exc.status_code} from {safe_url(self.base_url)}: {error_text(exc)}") from None
        except openai.APITimeoutError:
            self._count(transient_errors=1)
            raise TransientError(f"no answer within {self.timeout_s:g} s") from None
        except openai.APIConnectionError as exc:
            self._count(transient_errors=1)
            raise TransientError(f"connection failed: {exc}") from None
        usage = getattr(response, "usage", None)
        self._count(prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                    completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))
        choices = response.choices or []
        return (choices[0].message.content or "") if choices else ""


def texts_from_llm(stage: QueryTextLLM, queries: list[dict[str, Any]], retry) -> tuple[list[str | None], list[Reject]]:
    """The LLM's text for each query (None where it gave none), and the rejects saying why."""
    from echat.schemas.stage_runner import run_stages

    records = [{"id": f"q{q['index']:05d}", "source_uri": q["path"], QUERY_KEY: q} for q in queries]
    done, rejects = run_stages([stage], records, retry=retry)
    by_id = {r["id"]: r[TEXT_KEY] for r in done}
    return [by_id.get(r["id"]) for r in records], rejects

