"""What every stage that calls an OpenAI-compatible endpoint shares: the client, its errors, the
circuit breaker, one-request-per-key gating and the peer's Retry-After.

Used by the reply stage (synth/llm_reply.py), the style labeler, reply speech and query text
stages, and the judge of `echat eval --judge` (model/judge_stage.py), so none of them reaches into
another's module for it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 409, 425, 429})
NO_KEY = "EMPTY"  # sent to a local server (vLLM, llama.cpp) when the key variable is unset


class AnswerError(ValueError):
    """An answer that cannot be used; `reason` is the reject code if it is the last one."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class CircuitBreaker:
    """Opens after `failures` consecutive transient failures, for `cooldown_s` seconds.

    Thread-safe. While open, `allow()` is False. After the cool-down requests go through again;
    the count is not reset until a success, so the next failure opens it again at once.
    """

    def __init__(self, failures: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic):
        self.failures, self.cooldown_s, self.clock = failures, cooldown_s, clock
        self._count = 0
        self._open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        with self._lock:
            return self.clock() >= self._open_until

    def success(self) -> None:
        with self._lock:
            self._count = 0

    def failure(self) -> bool:
        """Count one failure; True when this one opened the circuit."""
        with self._lock:
            self._count += 1
            if self._count >= self.failures and self.clock() >= self._open_until:
                self._open_until = self.clock() + self.cooldown_s
                return True
            return False


def redact(text: str, key: str | None) -> str:
    """`text` without the API key, bearer tokens or sk-... strings (an error body may echo them)."""
    if isinstance(key, str) and key and key != NO_KEY:
        text = text.replace(key, "***")
    text = re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text)
    return re.sub(r"\bsk-[A-Za-z0-9_\-*]{6,}", "sk-***", text)


def client_redact(client: Any, text: str) -> str:
    """`redact` with the key an `openai` client holds."""
    return redact(text, getattr(client, "api_key", None))


def safe_url(url: str | None) -> str | None:
    """`url` without user:password and without a query string (either may hold a credential)."""
    if not url:
        return url
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def parse_json_object(content: str) -> dict[str, Any]:
    """The JSON object in `content`: alone, in a ``` fence, or amid prose (first { to last })."""
    text = content.strip()
    fenced = re.match(r"^```(?:json)?\s*(.*?)\s*```$", text, re.S | re.I)
    if fenced:
        text = fenced.group(1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        start, end = text.find("{"), text.rfind("}")
        if start < 0 or end <= start:
            raise AnswerError("llm_malformed", f"the answer is not a JSON object: {content[:120]!r}") from None
        try:
            value = json.loads(text[start:end + 1])
        except json.JSONDecodeError as exc:
            raise AnswerError("llm_malformed", f"the answer is not valid JSON ({exc.msg}): {content[:120]!r}") from None
    if not isinstance(value, dict):
        raise AnswerError("llm_malformed", f"the answer is JSON but not an object: {content[:120]!r}")
    return value


def openai_client(*, api_key_env: str, base_url: str | None, timeout_s: float, what: str, slot: str | None = None):
    """The `openai` client every endpoint stage uses (replies, style, speech, query text).

    The key comes from the environment variable `api_key_env` only. Without one, a request to
    OpenAI itself (no `base_url`) is refused, naming the variable; a local server gets the
    placeholder key and a warning. `max_retries=0`: the stage runner owns retries (backoff,
    jitter, Retry-After, a bound). httpx logs every request at INFO; the build's log keeps only
    our own lines about them.
    """
    import openai

    key = os.environ.get(api_key_env) or None
    if key is None:
        if base_url is None:
            hint = f" (or name another with {slot}.params.api_key_env)" if slot else ""
            raise RuntimeError(f"no API key: set the environment variable {api_key_env}{hint}")
        log.warning("$%s is not set: sending %s requests to %s without a key", api_key_env, what, safe_url(base_url))
    for name in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return openai.OpenAI(api_key=key or NO_KEY, base_url=base_url, timeout=timeout_s, max_retries=0)


class KeyedGate:
    """Records with the same key run one after the other (the second then finds the first's result
    in the cache), while different keys run at once."""

    def __init__(self):
        self._lock = threading.Lock()
        self._gates: dict[str, list] = {}

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._lock:
            gate = self._gates.setdefault(key, [threading.Lock(), 0])
            gate[1] += 1
        try:
            with gate[0]:
                yield
        finally:
            with self._lock:
                gate[1] -= 1
                if gate[1] == 0:
                    self._gates.pop(key, None)


def error_text(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:500]
    return str(getattr(exc, "message", None) or exc)[:500]


def error_code(exc: Any) -> str | None:
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = getattr(exc, "body", None)
    inner = body.get("error", body) if isinstance(body, dict) else None
    return str(inner.get("code")) if isinstance(inner, dict) and inner.get("code") else None


def retry_after(response: Any) -> float | None:
    """Seconds the peer asked to wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


STRUCTURED_MODES = ("json_schema", "json_object", "none")  # strongest first: a refusal steps one down


class CircuitOpen(Exception):
    """No request sent: the circuit breaker is open after repeated transient failures."""


def set_up_once(stage: Any) -> None:
    """Run `stage.setup()` the first time a worker thread needs its client (a stage is shared by the
    threads of a worker process, and one that was pickled arrives without one)."""
    if stage._client is None:
        with stage._lock:
            if stage._client is None:
                stage.setup()


class ChatEndpoint:
    """The request path every chat-completions stage shares (the reply stage, the style labeler,
    the judge): one POST through the client's own request machinery, the circuit breaker, HTTP
    errors sorted into what may pass (TransientError, retried by the stage runner) and what will
    not (AnswerError), a structured-output mode the endpoint refuses stepped down once for all
    threads, and token usage counted.

    A stage using it sets `_client`, `_breaker`, `_lock`, `_usage` (a Counter), `_mode`, `model`,
    `base_url`, `api_key_env`, `timeout_s`, `breaker_cooldown_s`, and has `sampling()` and
    `_response_format(mode)`. `_endpoint_label()` names it in log lines.
    """

    def teardown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def describe(self) -> str:
        return f"openai-compatible:{self.model}"

    def usage(self) -> dict[str, int]:
        with self._lock:
            return {k: int(v) for k, v in sorted(self._usage.items())}

    def _count(self, **amounts: int) -> None:
        with self._lock:
            self._usage.update(amounts)

    def _store(self, key: str, entry: dict[str, Any], what: str) -> None:
        """Cache a good answer; a failed write is counted and logged, never fatal (only a rerun
        would pay for that answer again)."""
        if self._cache is None:
            return
        try:
            self._cache.put_json(key, entry)
        except Exception as exc:  # noqa: BLE001 - any storage error: the answer in hand stays good
            self._count(cache_write_errors=1)
            log.warning("could not cache %s %s: %s", what, key[:12], exc)

    def _endpoint_label(self) -> str:
        return getattr(self, "slot_name", type(self).__name__)

    def _complete(self, conversation: list[dict[str, str]]) -> Any:
        """One ChatCompletion for `conversation`."""
        import openai
        from openai.types.chat import ChatCompletion

        from echat.schemas.stage import TransientError

        while True:
            if not self._breaker.allow():
                raise CircuitOpen(f"the circuit is open after repeated transient failures of {safe_url(self.base_url) or 'the endpoint'}; "
                                  f"no request sent (cool-down {self.breaker_cooldown_s:g} s)")
            mode = self._mode
            sampling = self.sampling()
            body: dict[str, Any] = {"model": self.model, "messages": conversation,
                                    **{k: v for k, v in sampling.items() if k != "extra_body"}, **sampling.get("extra_body", {})}
            response_format = self._response_format(mode)
            if response_format is not None:
                body["response_format"] = response_format
            self._count(requests=1)
            try:
                # The client's own request path (auth, timeout, errors) with a plain JSON body: the
                # typed `chat.completions.create` spends as much CPU walking its TypedDicts over
                # the messages as the rest of a request, which caps the requests one process keeps
                # in flight. The answer is parsed into the same ChatCompletion.
                response = self._client.post("/chat/completions", body=body, cast_to=ChatCompletion)
            except openai.APIStatusError as exc:
                status = exc.status_code
                if status in TRANSIENT_STATUS or status >= 500:
                    if status == 429 and error_code(exc) == "insufficient_quota":
                        self._breaker.success()
                        raise AnswerError("llm_quota", "HTTP 429 insufficient_quota: the account has no credit left") from None
                    self._transient()
                    raise TransientError(f"HTTP {status}: {self._redact(error_text(exc))}", retry_after=retry_after(exc.response)) from None
                self._breaker.success()
                if status == 400 and mode != "none" and re.search(r"response_format|json_schema|json_object|structured", str(exc), re.I):
                    self._downgrade(mode, exc)
                    continue
                if status in (401, 403):
                    raise AnswerError("llm_auth_error", f"HTTP {status}: the endpoint refused the credentials (${self.api_key_env})") from None
                raise AnswerError("llm_request_error", f"HTTP {status}: {self._redact(error_text(exc))}") from None
            except openai.APITimeoutError:
                self._transient()
                raise TransientError(f"no answer within {self.timeout_s:g} s") from None
            except openai.APIConnectionError as exc:
                self._transient()
                raise TransientError(f"connection failed: {self._redact(str(exc))}") from None
            self._breaker.success()
            usage = getattr(response, "usage", None)
            self._used(int(getattr(usage, "prompt_tokens", 0) or 0), int(getattr(usage, "completion_tokens", 0) or 0))
            return response

    def _used(self, prompt_tokens: int, completion_tokens: int) -> None:
        self._count(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)

    def _transient(self) -> None:
        self._count(transient_errors=1)
        if self._breaker.failure():
            log.warning("%s: %d consecutive transient failures of %s; no requests for %g s (records rejected as circuit_open)",
                        self._endpoint_label(), self._breaker.failures, safe_url(self.base_url) or "the endpoint",
                        self.breaker_cooldown_s)

    def _downgrade(self, mode: str, exc: Exception) -> None:
        weaker = STRUCTURED_MODES[STRUCTURED_MODES.index(mode) + 1]
        with self._lock:
            if self._mode == mode:
                self._mode = weaker
                log.warning("%s: the endpoint refused response_format %s (%s); using %s from now on",
                            self._endpoint_label(), mode, self._redact(str(exc))[:200], weaker)

    def _redact(self, text: str) -> str:
        return client_redact(self._client, text)
