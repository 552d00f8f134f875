"""A local OpenAI-compatible chat-completions server for tests and benchmarks (no network).

`FakeChatServer` listens on 127.0.0.1 (http.server.ThreadingHTTPServer in a thread) and answers
`POST /v1/chat/completions` as the OpenAI protocol does: a `chat.completion` object with choices,
finish_reason and usage, or an error object with the HTTP status. It writes a valid answer to the
reply backend's prompt (think / reply_emotion / reply, and `history` when the request's JSON
schema asks for it) in the language of the transcript, and can be told to misbehave for chosen
transcripts: `faults[substring] = [spec for the 1st request, spec for the 2nd, ...]` (requests
past the list answer normally; `always[substring] = spec` for every request). A spec:
  {"status": 429, "retry_after": "1"}   an error status (with a Retry-After header)
  {"sleep": 3.0}                         answer late (past the client's timeout)
  {"content": "not json"}                this text as the answer
  {"answer": {"reply_emotion": "X"}}     a valid answer with these fields replaced
  {"refusal": "I can't help"}           a refusal (structured outputs' `refusal`)
  {"finish_reason": "length"}           a cut-off answer
  {"status": 401, "echo_auth": True}     an error whose message repeats the Authorization header
`unsupported_formats` ({"json_schema"}...) answers HTTP 400 to a request with that response_format
type, as an endpoint without structured outputs does.
It counts what it saw: every request (with its record's transcript), answers sent, the requests in
flight and their peak, and the Authorization headers (so a test can check the key arrived, and
nothing else). `GET /_stats` returns those counts as JSON and `POST /_reset` forgets them, for a
server run in its own process (`python tests/llm_server.py --latency 0.2` prints its URL), so that
a benchmark's client does not share a GIL with the server.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# The record's transcript in the reply prompts (synth/prompts/reply_*.yaml user_template): the last
# such line of a request is the record's (few-shot examples come before it, feedback after it).
TRANSCRIPT_LINE = re.compile(r'^(?:The user said[^:\n]*: "(.*)"|用户说[^：\n]*：“(.*)”)\s*$', re.M)
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


def transcript_of(body: dict[str, Any]) -> str:
    found = ""
    for message in body.get("messages") or []:
        if message.get("role") == "user":
            for match in TRANSCRIPT_LINE.finditer(str(message.get("content") or "")):
                found = match.group(1) if match.group(1) is not None else match.group(2)
    return found


def default_answer(transcript: str, history_items: int) -> dict[str, Any]:
    if CJK.search(transcript):
        answer = {
            "think": f"用户说“{transcript[:20]}”，语气里能听出一些情绪。我要先体谅对方的感受，再温和地回应。",
            "reply_emotion": "WORRIED",
            "reply": "听起来你现在不太容易，先别着急，慢慢跟我说说好吗？",
        }
        exchange = {"user": "你好，我想跟你聊聊。", "assistant": "好呀，你说，我在听。"}
    else:
        answer = {
            "think": "They tell me something that matters to them, and the voice carries it too. "
                     "I should acknowledge how they feel and answer warmly.",
            "reply_emotion": "WORRIED",
            "reply": "That sounds like a lot to deal with. Do you want to tell me more about it?",
        }
        exchange = {"user": "Hey, do you have a minute?", "assistant": "Of course, what's on your mind?"}
    if history_items:
        answer["history"] = [dict(exchange) for _ in range(history_items)]
    return answer


class FakeChatServer:
    """`answer` and `key_of` (optional) make it another kind of endpoint, e.g. a judge: `key_of(body)`
    names the request (what `faults`, `always`, `attempts` and `count_for` match; default: the
    reply prompt's transcript) and `answer(body)` is the JSON object to answer with (default: a
    reply, `default_answer`); a spec's `answer` fields are laid over it as for a reply."""

    def __init__(self, latency_s: float = 0.0, *, answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 key_of: Callable[[dict[str, Any]], str] | None = None):
        self.latency_s = latency_s
        self.answer = answer
        self.key_of = key_of
        self.faults: dict[str, list[dict[str, Any]]] = {}
        self.always: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                if self.path.endswith("/_reset"):
                    self.rfile.read(int(self.headers.get("Content-Length") or 0))
                    server.reset()
                    server._send(self, 200, {"ok": True})
                    return
                server._handle(self)

            def do_GET(self):
                if self.path.endswith("/_stats"):
                    with server._lock:
                        stats = {"requests": len(server.requests), "answered": server.answered,
                                 "peak_in_flight": server.peak_in_flight, "in_flight": server.in_flight}
                    server._send(self, 200, stats)
                else:
                    server._send(self, 404, {"error": {"message": "not found"}})

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeChatServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}/v1"

    def reset(self) -> None:
        """Forget what was seen and every fault."""
        with self._lock:
            self.requests: list[dict[str, Any]] = []  # {transcript, outcome, model, at (monotonic arrival time)}
            self.attempts: Counter = Counter()  # transcript -> requests seen
            self.answered = 0
            self.in_flight = 0
            self.peak_in_flight = 0
            self.auth_headers: set[str] = set()
            self.bodies: list[dict[str, Any]] = []
            self.faults = {}
            self.always = {}
            self.unsupported_formats: set[str] = set()
            self.formats: list[str | None] = []  # response_format type of each request

    def count_for(self, transcript_part: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if transcript_part in r["transcript"])

    # ------------------------------------------------------------------ one request

    def _spec(self, transcript: str, attempt: int) -> dict[str, Any] | None:
        for part, spec in self.always.items():
            if part in transcript:
                return spec
        for part, specs in self.faults.items():
            if part in transcript and attempt <= len(specs):
                return specs[attempt - 1]
        return None

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length)
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            self.auth_headers.add(str(handler.headers.get("Authorization")))
        try:
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                self._send(handler, 400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
                return
            transcript = self.key_of(body) if self.key_of is not None else transcript_of(body)
            fmt = (body.get("response_format") or {}).get("type")
            entry = {"transcript": transcript, "outcome": "pending", "model": body.get("model"), "at": time.monotonic()}
            with self._lock:
                self.requests.append(entry)  # counted on arrival, whatever happens next
                self.formats.append(fmt)
                unsupported = fmt in self.unsupported_formats
                if unsupported:
                    entry["outcome"] = "http_400"
                else:
                    self.attempts[transcript] += 1
                    attempt = self.attempts[transcript]
                    self.bodies.append(body)
            if unsupported:
                self._send(handler, 400, {"error": {"message": f"response_format type {fmt} is not supported by this server",
                                                    "type": "invalid_request_error"}})
                return
            spec = self._spec(transcript, attempt) or {}
            outcome = "ok"
            if self.latency_s:
                time.sleep(self.latency_s)
            if "sleep" in spec:
                time.sleep(spec["sleep"])
                outcome = "slow"
            if "status" in spec:
                headers = {"Retry-After": str(spec["retry_after"])} if "retry_after" in spec else {}
                entry["outcome"] = f"http_{spec['status']}"
                message = spec.get("message", "injected fault")
                if spec.get("echo_auth"):
                    message = f"Incorrect API key provided: {handler.headers.get('Authorization', '').removeprefix('Bearer ')}"
                self._send(handler, spec["status"], {"error": {"message": message,
                                                               "type": "server_error", "code": spec.get("code")}}, headers)
                return
            history_items = _history_items(body)
            answer = self.answer(body) if self.answer is not None else default_answer(transcript, history_items)
            answer.update(spec.get("answer") or {})
            content = spec.get("content", json.dumps(answer, ensure_ascii=False))
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if "refusal" in spec:
                message = {"role": "assistant", "content": None, "refusal": spec["refusal"]}
            completion = {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "?"),
                "choices": [{"index": 0, "message": message, "finish_reason": spec.get("finish_reason", "stop")}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
            }
            if "content" in spec or "answer" in spec or "refusal" in spec or "finish_reason" in spec:
                outcome = "bad_answer"
            entry["outcome"] = outcome
            self._send(handler, 200, completion)
            with self._lock:
                self.answered += 1
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _send(handler, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout): nothing to answer


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: more connections at once than that wait for a
    # SYN retransmit (a second), which a client with a short timeout sees as a timeout.
    request_queue_size = 1024
    daemon_threads = True


def _history_items(body: dict[str, Any]) -> int:
    """How many earlier exchanges the request's JSON schema asks for (0 without a schema)."""
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema") or {}
    history = (schema.get("properties") or {}).get("history")
    if history:
        return int(history.get("minItems", 0))
    system = next((str(m.get("content")) for m in body.get("messages") or [] if m.get("role") == "system"), "")
    asked = re.search(r'"history": the (\d+) earlier|"history"：.*?之前的 (\d+) 轮', system, re.S)
    return int(asked.group(1) or asked.group(2)) if asked else 0


def main() -> None:
    """Serve in this process until killed; print the base URL first."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="a local chat-completions endpoint for benchmarks")
    parser.add_argument("--latency", type=float, default=0.2)
    args = parser.parse_args()
    server = FakeChatServer(latency_s=args.latency).start()
    print(server.url, flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop()


if __name__ == "__main__":
    main()
