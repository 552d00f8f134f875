"""A local OpenAI-compatible speech server for tests and benchmarks (no network).

`FakeSpeechServer` listens on 127.0.0.1 and speaks the `audio.speech` protocol of the OpenAI API:
`POST /v1/audio/speech` with a JSON body {model, input, voice, instructions?, response_format?,
speed?} answers 200 with the audio bytes of the input (`Content-Type: audio/wav`), or an error
object with the HTTP status. The audio is a WAV file at 24 kHz (the rate OpenAI's endpoint speaks
at, so the client resamples): with `speak=True` espeak-ng really says the input (so an ASR can
check it), otherwise a short tone per word (fast). It can be told to misbehave for inputs that hold
a substring: `faults[substring] = [spec for the 1st request, spec for the 2nd, ...]` (requests past
the list answer normally; `always[substring] = spec` for every request). A spec:
  {"status": 429, "retry_after": "0"}   an error status (with a Retry-After header)
  {"status": 500}                        a server error
  {"truncate": 0.5}                      a WAV whose data chunk is cut to half of what its header declares
  {"garbage": True}                      200 with bytes that are no audio at all
  {"sleep": 3.0}                         answer late (past the client's timeout)
It counts what it saw: every request (input, voice, instructions, model, outcome) and the
Authorization headers.
"""

from __future__ import annotations

import io
import json
import re
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np

from llm_server import _Server

RATE = 24_000


def tone_wav(text: str, rate: int = RATE) -> bytes:
    """A 16-bit mono WAV with one 0.25 s tone per word of `text` (pitch from the word)."""
    import soundfile as sf

    pieces = []
    for i, word in enumerate(text.split() or ["x"]):
        t = np.arange(int(0.25 * rate)) / rate
        freq = 180 + (sum(map(ord, word)) % 200)
        pieces += [0.4 * np.sin(2 * np.pi * freq * t) * np.hanning(t.size), np.zeros(int(0.05 * rate))]
    buffer = io.BytesIO()
    sf.write(buffer, np.concatenate(pieces).astype(np.float32), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def espeak_wav(text: str, rate: int = RATE) -> bytes:
    """espeak-ng saying `text` (Mandarin through pinyin), as a 16-bit WAV at `rate`."""
    import soundfile as sf

    from echat.schemas.audio import resample
    from echat.synth.espeak_tts import Prosody, speakable_text, synthesize

    language = "zh" if re.search(r"[\u4e00-\u9fff]", text) else "en"
    voice = "cmn-latn-pinyin" if language == "zh" else "en-us"
    audio, native = synthesize(speakable_text(text, language), voice, Prosody())
    buffer = io.BytesIO()
    sf.write(buffer, resample(audio, native, rate), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def truncate_wav(data: bytes, keep: float) -> bytes:
    """The WAV cut to `keep` of its data chunk, the header still declaring the whole."""
    at = data.find(b"data")
    size = struct.unpack("<I", data[at + 4:at + 8])[0]
    cut = int(size * keep) // 2 * 2
    return data[:at + 8 + cut]


class FakeSpeechServer:
    def __init__(self, speak: bool = False, latency_s: float = 0.0):
        self.speak = speak
        self.latency_s = latency_s
        self._lock = threading.Lock()
        self.reset()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                server._handle(self)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "FakeSpeechServer":
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
            self.requests: list[dict[str, Any]] = []
            self.attempts: Counter = Counter()
            self.auth_headers: set[str] = set()
            self.faults: dict[str, list[dict[str, Any]]] = {}
            self.always: dict[str, dict[str, Any]] = {}

    def count_for(self, part: str) -> int:
        with self._lock:
            return sum(1 for r in self.requests if part in r["input"])

    # ------------------------------------------------------------------ one request

    def _spec(self, text: str, attempt: int) -> dict[str, Any]:
        for part, spec in self.always.items():
            if part in text:
                return spec
        for part, specs in self.faults.items():
            if part in text and attempt <= len(specs):
                return specs[attempt - 1]
        return {}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        with self._lock:
            self.auth_headers.add(str(handler.headers.get("Authorization")))
        if not handler.path.rstrip("/").endswith("/audio/speech"):
            self._send_json(handler, 404, {"error": {"message": f"no route {handler.path}"}})
            return
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            self._send_json(handler, 400, {"error": {"message": "request body is not JSON", "type": "invalid_request_error"}})
            return
        text = str(body.get("input") or "")
        entry = {"input": text, "voice": body.get("voice"), "instructions": body.get("instructions"),
                 "model": body.get("model"), "response_format": body.get("response_format"), "outcome": "pending"}
        with self._lock:
            self.requests.append(entry)
            self.attempts[text] += 1
            attempt = self.attempts[text]
        if not text or not body.get("voice") or not body.get("model"):
            entry["outcome"] = "http_400"
            self._send_json(handler, 400, {"error": {"message": "model, voice and input are required",
                                                     "type": "invalid_request_error"}})
            return
        if body.get("response_format", "mp3") != "wav":
            entry["outcome"] = "http_400"
            self._send_json(handler, 400, {"error": {"message": "this server speaks wav only", "type": "invalid_request_error"}})
            return
        spec = self._spec(text, attempt)
        if self.latency_s:
            time.sleep(self.latency_s)
        if "sleep" in spec:
            time.sleep(spec["sleep"])
        if "status" in spec:
            entry["outcome"] = f"http_{spec['status']}"
            headers = {"Retry-After": str(spec["retry_after"])} if "retry_after" in spec else {}
            self._send_json(handler, spec["status"], {"error": {"message": "injected fault", "type": "server_error"}}, headers)
            return
        if spec.get("garbage"):
            entry["outcome"] = "garbage"
            self._send(handler, 200, b"<html><body>upstream hiccup</body></html>" * 8, "audio/wav")
            return
        audio = espeak_wav(text) if self.speak else tone_wav(text)
        if "truncate" in spec:
            entry["outcome"] = "truncated"
            audio = truncate_wav(audio, float(spec["truncate"]))
        else:
            entry["outcome"] = "ok"
        self._send(handler, 200, audio, "audio/wav")

    def _send_json(self, handler, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send(handler, status, json.dumps(payload).encode("utf-8"), "application/json", headers)

    @staticmethod
    def _send(handler, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", content_type)
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
