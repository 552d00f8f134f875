"""The judge of `echat eval --judge` (model/judge.py): its prompt and the stage that asks for verdicts.

`load_judge_prompt` reads and checks the judge prompt (model/judge_prompt.yaml: version, scale,
dimensions, templates). `LLMJudge` is a Stage: one chat-completions request per response to an
OpenAI-compatible endpoint, through the reply stage's machinery (synth/llm_reply.py: `openai_client`
with the key from the environment only, `CircuitBreaker`, `KeyedGate`, `retry_after`, the JSON
reader and the error mapping): HTTP 429/5xx/timeouts raise TransientError for the stage runner to
retry with backoff (Retry-After honoured); 401/403, quota and other 4xx are permanent (`llm_auth_error`,
`llm_quota`, `llm_request_error`); a verdict that is not JSON, lacks a dimension or scores off the
scale is asked again with the error fed back, then rejected (`llm_malformed`, `llm_out_of_range`).
Valid verdicts are cached (synth/cache.py, namespace `echat-judge`; the key: judge model, prompt
version, messages, sampling, structured-output mode; never the key or the URL); failures are not,
so a rerun asks again only what had no verdict.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from echat.endpoints import STRUCTURED_MODES, ChatEndpoint, CircuitOpen, set_up_once
from echat.schemas.stage import Reject, Stage

log = logging.getLogger(__name__)

PROMPT_FILE = "judge_prompt.yaml"
CACHE_NAMESPACE = "echat-judge"
# The query labels the judge is shown, in this order (record field, name in the prompt).
QUERY_LABELS = (("emotion", "emotion"), ("age", "age group"), ("gender", "gender"), ("events", "sounds heard"),
                ("style", "speaking style"))
PLACEHOLDERS: dict[str, set[str]] = {
    "system": {"scale_min", "scale_max", "dimensions", "keys"},
    "user_template": {"transcript", "labels", "cues", "response", "response_emotion"},
    "labels.known": {"name", "value", "score"},
    "labels.known_no_score": {"name", "value"},
    "labels.unknown": {"name"},
    "no_cues": set(),
    "response_emotion": {"value", "model", "score"},
    "feedback": {"error", "keys", "scale_min", "scale_max"},
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class JudgeError(ValueError):
    """Input or configuration the judge cannot work with; the message names the thing."""


# ----------------------------------------------------------------------------- the prompt


@dataclass(frozen=True)
class Dimension:
    name: str
    description: str


@dataclass(frozen=True)
class JudgePrompt:
    version: str
    scale_min: int
    scale_max: int
    dimensions: tuple[Dimension, ...]
    templates: dict[str, str]  # PLACEHOLDERS' keys -> text
    source: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    def render(self, which: str, **values: Any) -> str:
        from echat.synth.llm_prompts import fill

        return fill(self.templates[which], **values)

    def system_message(self) -> str:
        listed = "\n".join(f"- {d.name}: {' '.join(d.description.split())}" for d in self.dimensions)
        return self.render("system", scale_min=self.scale_min, scale_max=self.scale_max, dimensions=listed, keys=self.keys())

    def keys(self) -> str:
        return ", ".join(f'"{n}"' for n in self.names)

    def answer_schema(self) -> dict[str, Any]:
        entry = {"type": "object", "additionalProperties": False, "required": ["score", "reason"],
                 "properties": {"score": {"type": "integer"}, "reason": {"type": "string"}}}
        return {"type": "object", "additionalProperties": False, "required": list(self.names),
                "properties": {n: entry for n in self.names}}


def load_judge_prompt(path: str | Path | None = None) -> JudgePrompt:
    """The judge prompt at `path`, or the packaged model/judge_prompt.yaml; JudgeError naming the problem."""
    import yaml

    if path is None:
        where, text = PROMPT_FILE, resources.files("echat.model").joinpath(PROMPT_FILE).read_text(encoding="utf-8")
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise JudgeError(f"judge prompt {where}: cannot read it ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JudgeError(f"judge prompt {where}: not YAML ({exc})") from None
    if not isinstance(data, dict):
        raise JudgeError(f"judge prompt {where}: expected a mapping at the top")

    def need(key: str, kind: type) -> Any:
        value = data.get(key)
        if not isinstance(value, kind) or (isinstance(value, str) and not value.strip()):
            raise JudgeError(f"judge prompt {where}: `{key}` must be a non-empty {kind.__name__}")
        return value

    version = need("version", str)
    scale = need("scale", dict)
    low, high = scale.get("min"), scale.get("max")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)) or low >= high:
        raise JudgeError(f"judge prompt {where}: `scale` must be {{min: N, max: M}} with whole numbers, min < max")
    dims = []
    for i, entry in enumerate(need("dimensions", list)):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) and entry[k].strip() for k in ("name", "description")):
            raise JudgeError(f"judge prompt {where}: dimensions[{i}] must have a `name` and a `description`")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", entry["name"]):
            raise JudgeError(f"judge prompt {where}: dimension name {entry['name']!r} must be lower_case_with_underscores")
        dims.append(Dimension(entry["name"], entry["description"]))
    if len({d.name for d in dims}) != len(dims):
        raise JudgeError(f"judge prompt {where}: a dimension name appears twice")
    templates: dict[str, str] = {}
    for key, allowed in PLACEHOLDERS.items():
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, str) or not value.strip():
            raise JudgeError(f"judge prompt {where}: `{key}` must be a non-empty string")
        unknown = set(_PLACEHOLDER.findall(value)) - allowed
        if unknown:
            raise JudgeError(f"judge prompt {where}: `{key}` names unknown placeholder(s) {sorted(unknown)}; "
                             f"it may use {sorted(allowed) or 'none'}")
        templates[key] = value
    return JudgePrompt(version, low, high, tuple(dims), templates, where)


# ----------------------------------------------------------------------------- the judge


def validate_verdict(data: Any, prompt: JudgePrompt) -> dict[str, dict[str, Any]]:
    """{dimension: {score, reason}} from the judge's JSON; AnswerError when it is not usable."""
    from echat.endpoints import AnswerError

    if not isinstance(data, dict):
        raise AnswerError("llm_malformed", "the answer is not a JSON object")
    missing = [n for n in prompt.names if n not in data]
    if missing:
        raise AnswerError("llm_malformed", f"the answer lacks the dimension(s) {', '.join(missing)}")
    verdict = {}
    for name in prompt.names:
        entry = data[name]
        if not isinstance(entry, dict):
            raise AnswerError("llm_malformed", f"{name!r} must be an object with `score` and `reason`")
        score, reason = entry.get("score"), entry.get("reason")
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise AnswerError("llm_malformed", f"{name}.score must be a number, not {score!r}")
        if not prompt.scale_min <= score <= prompt.scale_max:
            raise AnswerError("llm_out_of_range", f"{name}.score {score} is outside {prompt.scale_min}-{prompt.scale_max}")
        if not isinstance(reason, str) or not reason.strip():
            raise AnswerError("llm_malformed", f"{name}.reason must be a non-empty string")
        verdict[name] = {"score": score, "reason": " ".join(reason.split())}
    return verdict


class LLMJudge(ChatEndpoint, Stage):
    """Scores one response per record on the prompt's dimensions, through an OpenAI-compatible endpoint.

    Args:
        model: the judge model the endpoint serves (required).
        base_url: the endpoint (http://localhost:8000/v1 for vLLM); None: OpenAI's.
        api_key_env: the environment variable holding the key (read in setup, never stored).
        temperature, max_tokens, seed: sampling (temperature 0: a judge should be repeatable).
        structured_output: json_schema | json_object | none; an endpoint that refuses one with
            HTTP 400 is asked with the next weaker, once, with a warning.
        timeout_s: per request; past it is a transient failure (retried by the runner).
        answer_attempts: verdicts asked for per response, the error fed back, before it is unscorable.
        prompt_path: another judge prompt file (default model/judge_prompt.yaml).
        cache_dir: the call cache root; None: no cache.
        breaker_failures / breaker_cooldown_s: as the reply stage's circuit breaker.
    """

    name: ClassVar[str] = "judge"
    reads: ClassVar[tuple[str, ...]] = (
        "id", "transcript", *(f for name, _ in QUERY_LABELS for f in (name, f"{name}_score")), "cues",
        "response_text", "response_emotion", "response_emotion_score", "response_emotion_model",
    )
    writes: ClassVar[tuple[str, ...]] = ("judge_scores", "judge_model", "judge_prompt_version")
    batch_size: ClassVar[int] = 1
    max_in_flight = 8
    thread_safe: ClassVar[bool] = True

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float | None = 0.0,
        max_tokens: int | None = 800,
        seed: int | None = None,
        structured_output: str = "json_object",
        timeout_s: float = 60.0,
        answer_attempts: int = 2,
        prompt_path: str | None = None,
        cache_dir: str | None = None,
        breaker_failures: int | None = None,
        breaker_cooldown_s: float = 30.0,
    ):
        if not model or not str(model).strip():
            raise JudgeError("the judge needs a model name: --judge-model NAME (the model the endpoint serves)")
        if structured_output not in STRUCTURED_MODES:
            raise JudgeError(f"structured output must be one of {', '.join(STRUCTURED_MODES)}, got {structured_output!r}")
        if not api_key_env or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env):
            raise JudgeError(f"the API key variable must name an environment variable, got {api_key_env!r}")
        if not isinstance(answer_attempts, int) or answer_attempts < 1:
            raise JudgeError(f"answer attempts must be a whole number of at least 1, got {answer_attempts!r}")
        if timeout_s <= 0 or breaker_cooldown_s < 0 or (breaker_failures is not None and breaker_failures < 1):
            raise JudgeError("the timeout must be positive, the cool-down not negative, breaker failures at least 1")
        self.model, self.base_url, self.api_key_env = str(model), base_url, api_key_env
        self.temperature, self.max_tokens, self.seed = temperature, max_tokens, seed
        self.structured_output = structured_output
        self.timeout_s, self.answer_attempts = float(timeout_s), answer_attempts
        self.cache_dir = cache_dir
        self.breaker_failures, self.breaker_cooldown_s = breaker_failures, float(breaker_cooldown_s)
        self.prompt = load_judge_prompt(prompt_path)
        self._system = self.prompt.system_message()
        self._client = None
        self._cache = None
        self._breaker = None
        self._mode = structured_output
        self._lock = threading.Lock()
        self._usage: Counter = Counter()
        self._gate = None

    def __repr__(self) -> str:
        from echat.endpoints import safe_url

        return f"{type(self).__name__}(model={self.model!r}, base_url={safe_url(self.base_url)!r}, api_key_env={self.api_key_env!r})"

    def setup(self) -> None:
        from echat.synth.cache import ContentCache
        from echat.endpoints import CircuitBreaker, KeyedGate, openai_client

        if self._client is not None:  # set up already (the command checks the key before the labeler runs)
            return
        self._client = openai_client(api_key_env=self.api_key_env, base_url=self.base_url, timeout_s=self.timeout_s,
                                     what="judge")
        self._cache = ContentCache(self.cache_dir, CACHE_NAMESPACE) if self.cache_dir else None
        self._breaker = CircuitBreaker(self.breaker_failures or max(8, 2 * self.max_in_flight), self.breaker_cooldown_s)
        self._gate = KeyedGate()

    # ------------------------------------------------------------------ one response

    def messages(self, item: dict[str, Any]) -> list[dict[str, str]]:
        """The chat messages that ask for one verdict."""
        p = self.prompt
        lines = []
        for field, name in QUERY_LABELS:
            value, score = item.get(field), item.get(f"{field}_score")
            if field == "events" and value is not None:
                value = ", ".join(value) if value else "none"
            if value is None:
                lines.append(p.render("labels.unknown", name=name))
            elif score is None:
                lines.append(p.render("labels.known_no_score", name=name, value=value))
            else:
                lines.append(p.render("labels.known", name=name, value=value, score=f"{score:.2f}"))
        cues = ", ".join(item.get("cues") or []) or p.render("no_cues")
        score = item.get("response_emotion_score")
        heard = p.render("response_emotion", value=item["response_emotion"], model=item.get("response_emotion_model") or "?",
                         score=f"{score:.2f}" if isinstance(score, (int, float)) else "not given")
        user = p.render("user_template", transcript=(item.get("transcript") or "").strip(), labels="\n".join(lines),
                        cues=cues, response=item["response_text"], response_emotion=heard)
        return [{"role": "system", "content": self._system}, {"role": "user", "content": user}]

    def sampling(self) -> dict[str, Any]:
        params = {"temperature": self.temperature, "max_tokens": self.max_tokens, "seed": self.seed}
        return {k: v for k, v in params.items() if v is not None}

    def request_key(self, messages: list[dict[str, str]]) -> str:
        from echat.synth.cache import cache_key

        return cache_key(kind="judge", model=self.model, prompt_version=self.prompt.version, messages=messages,
                         sampling=self.sampling(), structured_output=self.structured_output)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        from echat.endpoints import AnswerError

        set_up_once(self)
        messages = self.messages(record)
        key = self.request_key(messages)
        with self._gate.hold(key):  # the same case twice: the second finds the first's verdict
            verdict = self._cached(key)
            if verdict is None:
                try:
                    verdict = self._ask(messages)
                except AnswerError as exc:
                    yield self.reject(record, exc.reason, str(exc))
                    return
                except CircuitOpen as exc:
                    self._count(circuit_open=1)
                    yield self.reject(record, "circuit_open", str(exc))
                    return
                self._store(key, {"verdict": verdict, "model": self.model, "prompt_version": self.prompt.version}, "verdict")
        yield {**record, "judge_scores": verdict, "judge_model": self.describe(), "judge_prompt_version": self.prompt.version}

    def _cached(self, key: str) -> dict[str, Any] | None:
        from echat.endpoints import AnswerError

        if self._cache is None:
            return None
        entry = self._cache.get_json(key)
        if not isinstance(entry, dict):
            return None
        try:
            verdict = validate_verdict(entry.get("verdict"), self.prompt)
        except AnswerError as exc:
            log.warning("cached verdict %s no longer passes validation (%s); asking again", key[:12], exc)
            return None
        self._count(cache_hits=1)
        return verdict

    def _ask(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        """A valid verdict, asking again with the error fed back; AnswerError after the last try."""
        from echat.endpoints import AnswerError, parse_json_object

        conversation = list(messages)
        error = None
        for attempt in range(1, self.answer_attempts + 1):
            content = self._request(conversation)
            try:
                return validate_verdict(parse_json_object(content), self.prompt)
            except AnswerError as exc:
                error = exc
                self._count(invalid_answers=1)
                log.info("verdict %d/%d not usable (%s): %s", attempt, self.answer_attempts, exc.reason, exc)
                feedback = self.prompt.render("feedback", error=str(exc), keys=self.prompt.keys(),
                                              scale_min=self.prompt.scale_min, scale_max=self.prompt.scale_max)
                conversation = conversation + [{"role": "assistant", "content": content or "(no answer)"},
                                               {"role": "user", "content": feedback}]
        assert error is not None
        raise AnswerError(error.reason, f"{self.answer_attempts} verdict(s) not usable; last: {error}")

    def _response_format(self, mode: str) -> dict[str, Any] | None:
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "empathy_verdict", "strict": True,
                                                           "schema": self.prompt.answer_schema()}}
        return {"type": "json_object"} if mode == "json_object" else None

    def _request(self, conversation: list[dict[str, str]]) -> str:
        """The text of one completion. TransientError for what may pass, AnswerError for what will not."""
        from echat.endpoints import AnswerError

        response = self._complete(conversation)
        choices = response.choices or []
        if not choices:
            raise AnswerError("llm_malformed", "the completion has no choices")
        message = choices[0].message
        if getattr(message, "refusal", None):
            raise AnswerError("llm_refused", f"the judge refused: {str(message.refusal)[:200]}")
        if choices[0].finish_reason == "length":
            raise AnswerError("llm_too_long", f"the verdict was cut off at max_tokens={self.max_tokens}")
        return message.content or ""

