"""The TTS back-check: does the reply audio say the reply text?

The reply audio (`_reply_waveform`) is transcribed with an ASR backend of the `asr` table
(pipelines/backends.py; `asr_backend: pocketsphinx` offline, any other name or a
`package.module:Class` path) and scored against `reply_text`: word error rate, or character error
rate for Chinese (schemas/scoring.py `ErrorRate`, transcripts normalised as the build's label
accuracy normalises them). The figure goes to `reply_check_error` (capped at 10: insertions can
push a rate past 1) and the ASR's name to `reply_check_model`. Above `max_error` the record is
rejected as `reply_check_failed`, with the figure and both texts in the detail; `max_error: null`
only measures.

The ASR is used for the languages it knows: its class's `languages` (pocketsphinx: en), or the
`languages` param. A reply in another language (offline Mandarin) keeps `reply_check_error`
empty and gets the quality flag `reply_check_no_asr:<language>`.

`check_query: true` also checks a synthetic query (`source_kind: synthetic`) against the text it
was written to say (its manifest transcript): above `max_query_error` (default `max_error`) it is
rejected as `query_check_failed`; a piece of a file that VAD split has no transcript of its own and
is not checked. The figure is not a column; the summary's `stages.<slot>.usage` counts the checks.

How the ASR is called: `transcribe(waveform)` when the class has it (pocketsphinx: words), else the
ASR stage's own `process` on a probe record holding only the audio and the language.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from echat.schemas import vocab
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.scoring import ErrorRate, language_of
from echat.schemas.stage import Reject, Stage

from .reasoning import guess_language

MAX_ERROR_VALUE = 10.0  # the field's declared maximum (schemas/record.py)
NO_ASR_FLAG = "reply_check_no_asr:"
QUERY_NO_ASR_FLAG = "query_check_no_asr:"


def error_rate(reference: str, hypothesis: str, language: str) -> float | None:
    """WER (en) or CER (zh) of one hypothesis; None when the reference has no scoring tokens."""
    scorer = ErrorRate(language_of(reference, language))
    scorer.add(reference, hypothesis)
    report = scorer.report()
    if not report["reference_tokens"]:
        return None
    return float(min(MAX_ERROR_VALUE, report[report["metric"]]))


class ReplyBackCheck(Stage):
    """Transcribe the reply audio and store its error rate against the reply text.

    Args:
        asr_backend: a backend name of the `asr` table (pocketsphinx, whisper, sensevoice,
            paraformer...) or a `package.module:Class` path.
        asr_params: that backend's params (a model path, device...).
        languages: the reply languages to check with it (default: the ASR class's `languages`,
            else every corpus language).
        max_error: reject a reply whose error rate is above this (None: measure only).
        check_query: also check synthetic queries' audio against their transcript.
        max_query_error: the threshold for queries (default: max_error).
    """

    name = "reply_check"
    reads = ("_reply_waveform", "reply_text", "language", "_waveform", "transcript", "source_kind")
    writes = ("reply_check_error", "reply_check_model", "quality_flags")

    def __init__(
        self,
        asr_backend: str = "pocketsphinx",
        asr_params: dict[str, Any] | None = None,
        languages: list[str] | None = None,
        max_error: float | None = None,
        check_query: bool = False,
        max_query_error: float | None = None,
    ):
        from echat.pipelines import backends

        for name, value in (("max_error", max_error), ("max_query_error", max_query_error)):
            if value is not None and not 0.0 <= float(value) <= MAX_ERROR_VALUE:
                raise ValueError(f"{name} must be within 0-{MAX_ERROR_VALUE:g} (an error rate), got {value!r}")
        self.asr_backend = asr_backend
        self.asr_params = dict(asr_params or {})
        if asr_backend == "pocketsphinx":
            # A check wants the careful search: the build's `fast` preset read matching espeak
            # replies at WER 0.73 against 0.27 with `accurate` (tests/test_synth_speech.py's sentence).
            self.asr_params.setdefault("preset", "accurate")
        cls = backends.stage_class("asr", asr_backend)
        backends.check_params(cls, self.asr_params, where="reply_check.params.asr_params")
        self._asr_class = cls
        known = languages if languages is not None else getattr(cls, "languages", None) or vocab.LANGUAGES
        unknown = sorted(set(known) - set(vocab.LANGUAGES))
        if unknown:
            raise ValueError(f"languages {unknown} are not corpus languages ({', '.join(vocab.LANGUAGES)})")
        self.languages = tuple(known)
        self.max_error = None if max_error is None else float(max_error)
        self.check_query = bool(check_query)
        self.max_query_error = self.max_error if max_query_error is None else float(max_query_error)
        self._asr = None
        self._lock = threading.Lock()
        self._usage: Counter = Counter()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_asr=None, _lock=None, _usage=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock, self._usage = threading.Lock(), Counter()

    def setup(self) -> None:
        asr = self._asr_class(**self.asr_params)
        asr.slot = f"{self.slot_name}.asr"
        asr.setup()
        self._asr = asr

    def teardown(self) -> None:
        if self._asr is not None:
            self._asr.teardown()
            self._asr = None

    def describe(self) -> str:
        return self._asr.describe() if self._asr is not None else str(self.asr_backend)

    def usage(self) -> dict[str, int]:
        return dict(self._usage)

    # ------------------------------------------------------------------ transcribing

    def transcribe(self, waveform: np.ndarray, language: str) -> str:
        """What the configured ASR hears in 16 kHz mono `waveform`."""
        if self._asr is None:
            self.setup()
        asr = self._asr
        if hasattr(asr, "transcribe"):
            result = asr.transcribe(waveform)
            if isinstance(result, str):
                return result
            return " ".join(str(w["word"] if isinstance(w, dict) else w) for w in result or [])
        probe = {"id": "reply-check", "source_uri": "reply-check", "_waveform": np.asarray(waveform, dtype=np.float32),
                 "sampling_rate": SAMPLE_RATE, "duration": len(waveform) / SAMPLE_RATE, "segment_start": 0.0,
                 "segment_end": len(waveform) / SAMPLE_RATE, "language": language, "transcript": None}
        outcome = asr.process_one(probe)
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, Reject):
            raise RuntimeError(f"the ASR rejected the audio: {outcome.reason}: {outcome.detail}")
        texts = [out.get("transcript") or "" for out in outcome if isinstance(out, dict)]
        return " ".join(t for t in texts if t)

    def measure(self, waveform: np.ndarray, text: str, language: str) -> tuple[float | None, str]:
        """(error rate of the audio against `text`, the hypothesis)."""
        with self._lock:  # one ASR decoder per stage instance
            hypothesis = self.transcribe(waveform, language)
        return error_rate(text, hypothesis, language), hypothesis

    # ------------------------------------------------------------------ one record

    def _count(self, **amounts: int) -> None:
        self._usage.update(amounts)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        from echat.labelers.flags import add_flag

        out = dict(record)
        if self.check_query and record.get("source_kind") == "synthetic":
            problem = self._check_query(record, out)
            if problem is not None:
                yield problem
                return
        reply = record.get("_reply_waveform")
        text = (record.get("reply_text") or "").strip()
        if reply is None or len(reply) == 0 or not text:
            yield out  # nothing was spoken: nothing to check
            return
        language = record.get("language") or guess_language(text)
        if language not in self.languages:
            add_flag(out, f"{NO_ASR_FLAG}{language}")
            self._count(replies_without_asr=1)
            yield out
            return
        error, hypothesis = self.measure(reply, text, language)
        self._count(replies_checked=1)
        if error is None:
            yield out
            return
        if self.max_error is not None and error > self.max_error:
            self._count(replies_failed=1)
            yield self.reject(record, "reply_check_failed",
                              f"{_metric(language)} {error:.2f} > max_error {self.max_error:g}: "
                              f"the reply says {text[:200]!r}, the ASR ({self.describe()}) heard {hypothesis[:200]!r}")
            return
        out["reply_check_error"] = round(error, 4)
        out["reply_check_model"] = self.describe()
        yield out

    def _check_query(self, record: dict[str, Any], out: dict[str, Any]) -> Reject | None:
        from echat.labelers.flags import add_flag

        text = (record.get("transcript") or "").strip()
        waveform = record.get("_waveform")
        if not text or waveform is None or len(waveform) == 0:
            self._count(queries_unchecked=1)
            return None
        language = record.get("language") or guess_language(text)
        if language not in self.languages:
            add_flag(out, f"{QUERY_NO_ASR_FLAG}{language}")
            self._count(queries_without_asr=1)
            return None
        error, hypothesis = self.measure(waveform, text, language)
        self._count(queries_checked=1)
        if error is not None and self.max_query_error is not None and error > self.max_query_error:
            self._count(queries_failed=1)
            return self.reject(record, "query_check_failed",
                               f"{_metric(language)} {error:.2f} > max_query_error {self.max_query_error:g}: "
                               f"the query was to say {text[:200]!r}, the ASR ({self.describe()}) heard {hypothesis[:200]!r}")
        return None


def _metric(language: str) -> str:
    return "CER" if language == "zh" else "WER"
