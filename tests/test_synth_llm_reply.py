"""The LLM reply backend (synth/llm_reply.py) against a real HTTP endpoint, with no network.

These tests run the real `openai` client against a local HTTP server on 127.0.0.1 that speaks the
OpenAI chat-completions protocol (tests/llm_server.py: http.server.ThreadingHTTPServer in a
thread; one server for the module) and injects faults: 429 with Retry-After, 500, an answer slower
than the client's timeout, malformed JSON, an off-vocabulary reply emotion, an empty reply, a
refusal, a cut-off answer, a reply in the wrong language, a reply that calls itself an AI, an
endpoint without structured outputs. Every sample ends with a valid reply or in rejects with the
reason; builds use the real Beam DirectRunner (`echat.pipelines.build.build`) and reconcile; a
second build sends no request, and a build killed with SIGKILL and run again sends only the
requests that had no answer yet. The API key (a random one per test) is grepped for in every
output.
"""

from __future__ import annotations

import json
import os
import pickle
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from echat.schemas import vocab
from echat.schemas.stage_runner import RetryPolicy, StageRunner, run_stages
from echat.schemas.tasks import record_task
from echat.synth import llm_prompts
from echat.synth.cache import ContentCache, cache_key
from echat.endpoints import AnswerError, CircuitBreaker, parse_json_object, retry_after
from echat.synth.llm_reply import CACHE_NAMESPACE, OpenAIReply, validate_answer
from llm_server import FakeChatServer

REPO = Path(__file__).resolve().parents[1]
FAST_RETRY = RetryPolicy(max_attempts=4, backoff_s=0.01, max_backoff_s=2.0)


@pytest.fixture(scope="module")
def server():
    with FakeChatServer() as srv:
        yield srv


@pytest.fixture
def endpoint(server):
    """The shared server, with nothing seen and no faults."""
    server.reset()
    server.latency_s = 0.0
    return server


@pytest.fixture
def api_key(monkeypatch):
    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    return key


def _record(transcript: str, language: str = "en", i: int = 0, **labels) -> dict:
    return {"id": f"r{i}", "source_uri": f"/audio/{i}.wav", "segment_start": 0.0, "segment_end": 1.0,
            "transcript": transcript, "language": language, **labels}


def _stage(endpoint, tmp_path=None, **params) -> OpenAIReply:
    params.setdefault("timeout_s", 5.0)
    return OpenAIReply(model="test-model", base_url=endpoint.url,
                       cache_dir=str(tmp_path / "cache") if tmp_path is not None else None, **params)


def _assert_valid_reply(out: dict, language: str = "en") -> None:
    assert out["reply_emotion"] in vocab.REPLY_EMOTIONS
    assert out["reply_text"].strip() and out["think_text"].startswith("<think>") and out["think_text"].endswith("<think end>")
    assert out["think_tags"].startswith("<think>User's words: ") and f"Reply emotion: <{out['reply_emotion']}>" in out["think_tags"]
    assert out["llm_model"] == "openai-compatible:test-model"
    assert out["prompt_version"] == f"echat-reply-{language}-1.0"


# ---------------------------------------------------------------------------------------------
# answers: parsing and validation


def test_parse_json_object_alone_fenced_or_amid_prose():
    assert parse_json_object('{"a": 1}') == {"a": 1}
    assert parse_json_object('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json_object('Sure! Here it is: {"a": 1} Hope that helps.') == {"a": 1}
    for bad in ("not json", "[1, 2]", '{"a": '):
        with pytest.raises(AnswerError) as err:
            parse_json_object(bad)
        assert err.value.reason == "llm_malformed"


@pytest.mark.parametrize(("change", "language", "reason"), [
    ({"reply": "  "}, "en", "llm_empty"),
    ({"think": ""}, "en", "llm_empty"),
    ({"reply_emotion": "ELATED"}, "en", "llm_off_vocabulary"),
    ({"reply": 42}, "en", "llm_malformed"),
    ({"reply": "<think>hmm<think end> Hello there."}, "en", "llm_malformed"),
    ({"reply": "听起来你很难过。"}, "en", "llm_wrong_language"),
    ({"reply": "That sounds hard. Do you want to talk?"}, "zh", "llm_wrong_language"),
    ({"reply": "As an AI, I don't have feelings, but that sounds hard."}, "en", "llm_self_reference"),
    ({"reply": "I'm just a language model, but I hope it gets better."}, "en", "llm_self_reference"),
    ({"reply": "作为一个人工智能，我没有感情，但我理解你。"}, "zh", "llm_self_reference"),
    ({"reply": " ".join(["word"] * 121)}, "en", "llm_too_long"),
])
def test_an_unusable_answer_has_a_reason(change, language, reason):
    good = {"en": {"think": "They sound tired and worried.", "reply_emotion": "WORRIED", "reply": "That sounds hard. Want to talk?"},
            "zh": {"think": "用户听起来很累。", "reply_emotion": "WORRIED", "reply": "听起来你很辛苦，要不要聊聊？"}}[language]
    limits = {"turns": 1, "max_reply_words": 120, "max_think_words": 300}
    assert validate_answer(dict(good), language=language, **limits)["reply_emotion"] == "WORRIED"
    with pytest.raises(AnswerError) as err:
        validate_answer({**good, **change}, language=language, **limits)
    assert err.value.reason == reason, err.value


def test_answer_normalisation_and_history_shape():
    limits = {"language": "en", "max_reply_words": 120, "max_think_words": 300}
    answer = validate_answer({"think": " ok \n fine ", "reply_emotion": "<worried>", "reply": "Hi  there.",
                              "history": [{"user": "Hey", "assistant": "Hello, what's up?"}]}, turns=2, **limits)
    assert answer == {"think": "ok fine", "reply_emotion": "WORRIED", "reply": "Hi there.",
                      "history": [{"user": "Hey", "assistant": "Hello, what's up?"}]}
    for history in ([], [{"user": "Hey"}], "Hey", [{"user": "a", "assistant": "b"}] * 2):
        with pytest.raises(AnswerError) as err:
            validate_answer({"think": "They say hi.", "reply_emotion": "NEUTRAL", "reply": "Hi there.", "history": history}, turns=2, **limits)
        assert err.value.reason == "llm_bad_history"
    # a user turn may ask about robots; an assistant turn may not call itself one
    ok = {"think": "They say hi.", "reply_emotion": "NEUTRAL", "reply": "Hi there."}
    validate_answer({**ok, "history": [{"user": "Are you an AI assistant?", "assistant": "Ha, no, just me."}]}, turns=2, **limits)
    with pytest.raises(AnswerError, match="machine"):
        validate_answer({**ok, "history": [{"user": "Hi", "assistant": "I am an AI assistant."}]}, turns=2, **limits)


# ---------------------------------------------------------------------------------------------
# prompts


def test_prompt_sets_load_with_versions_and_examples():
    for language in ("en", "zh"):
        ps = llm_prompts.load_prompt_set(language)
        assert ps.version == f"echat-reply-{language}-1.0" and len(ps.examples) >= 3
        messages = llm_prompts.messages(ps, _record("hello there" if language == "en" else "你好", language))
        assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
        assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * len(ps.examples)
        for reply_emotion in vocab.REPLY_EMOTIONS:
            assert reply_emotion in messages[0]["content"]
        for example in messages[2:-1:2]:
            assert validate_answer(json.loads(example["content"]), language=language, turns=1,
                                   max_reply_words=120, max_think_words=300)


def test_prompt_shows_scores_origins_weak_and_unknown_labels_and_picks_the_emphasis():
    ps = llm_prompts.load_prompt_set("en")
    single = llm_prompts.user_message(ps, _record(
        "Can you help me?", emotion="neutral", emotion_score=0.3, emotion_model="heuristic-prosody",
        gender="female", gender_score=0.9, gender_model="manifest", events=["cough"], events_score=0.85, events_model="sensevoice",
        transcript_origin="pocketsphinx", transcript_confidence=0.42), 0.5)
    assert 'The user said (automatic transcript, confidence 0.42: it may be misheard): "Can you help me?"' in single
    assert "- emotion: neutral (score 0.30, from heuristic-prosody): weak, a hint at most" in single
    assert "- gender: female (score 0.90, from the manifest: ground truth)" in single
    assert "- sound events: cough (score 0.85, from sensevoice)" in single
    assert "- age group: unknown (no labeler gave it): do not guess" in single
    assert "Single-label emphasis" in single and "the cough heard in the audio" in single
    multi = llm_prompts.user_message(ps, _record("I got a puppy!", emotion="happy", emotion_score=0.9, emotion_model="m",
                                                 age="child", age_score=0.8, age_model="m"), 0.5)
    assert "Multi-label emphasis" in multi and "happy" in multi and "a child" in multi
    words = llm_prompts.user_message(ps, _record("The meeting is at ten.", emotion="sad", emotion_score=0.2, emotion_model="m"), 0.5)
    assert "No cue from the voice is reliable" in words


# ---------------------------------------------------------------------------------------------
# the stage against the local endpoint (no Beam)


def test_faults_are_retried_or_rejected_with_their_reason(endpoint, api_key, tmp_path):
    endpoint.faults["malformed once"] = [{"content": "Sure! {not json"}]
    endpoint.always["always refused"] = {"refusal": "I can't help with that."}
    endpoint.always["always cut"] = {"finish_reason": "length", "content": '{"think": "th'}
    endpoint.always["always chinese"] = {"answer": {"reply": "听起来你很难过。"}}
    endpoint.always["always robot"] = {"answer": {"reply": "As an AI language model, I understand."}}
    endpoint.always["always empty"] = {"answer": {"reply": ""}}
    transcripts = ["malformed once please", "always refused here", "always cut off", "always chinese reply",
                   "always robot reply", "always empty reply", "a fine day today"]
    records = [_record(t, i=i) for i, t in enumerate(transcripts)]
    stage = _stage(endpoint, tmp_path, answer_attempts=2)
    out, rejects = run_stages([stage], records, retry=FAST_RETRY)
    assert len(out) + len(rejects) == len(records)  # nothing lost
    reasons = {r.id: r.reason for r in rejects}
    assert reasons == {"r1": "llm_refused", "r2": "llm_too_long", "r3": "llm_wrong_language",
                       "r4": "llm_self_reference", "r5": "llm_empty"}
    assert {o["id"] for o in out} == {"r0", "r6"}
    for o in out:
        _assert_valid_reply(o)
    # the malformed answer was asked again, with the error fed back after the bad answer
    assert endpoint.count_for("malformed once") == 2
    retry_body = [b for b in endpoint.bodies if "malformed once" in json.dumps(b)][1]
    assert retry_body["messages"][-2] == {"role": "assistant", "content": "Sure! {not json"}
    assert "cannot be used" in retry_body["messages"][-1]["content"] and "not a JSON object" in retry_body["messages"][-1]["content"]
    assert all(endpoint.count_for(t) == 2 for t in transcripts[1:6])  # answer_attempts=2, then rejected
    usage = stage.usage()
    assert usage["requests"] == len(endpoint.requests) == 2 + 5 * 2 + 1
    assert usage["invalid_answers"] == 1 + 5 * 2
    assert usage["prompt_tokens"] == 100 * usage["requests"]


def test_structured_output_modes_and_the_fallback_for_an_endpoint_without_them(endpoint, api_key):
    record = [_record("I lost my keys")]
    for mode, expected in (("json_schema", "json_schema"), ("json_object", "json_object"), ("none", None)):
        endpoint.reset()
        out, rejects = run_stages([_stage(endpoint, structured_output=mode)], record, retry=FAST_RETRY)
        assert out and not rejects and endpoint.formats == [expected]
        if mode == "json_schema":
            sent = endpoint.bodies[0]["response_format"]["json_schema"]
            assert sent["strict"] and sent["schema"]["properties"]["reply_emotion"]["enum"] == list(vocab.REPLY_EMOTIONS)
    # an answer in a fence amid prose, from an endpoint asked for nothing
    endpoint.reset()
    endpoint.faults["fenced"] = [{"content": 'Here you go:\n```json\n{"think": "They lost something.", "reply_emotion": "SORRY", '
                                             '"reply": "Oh no, I hope you find them soon."}\n```'}]
    out, _ = run_stages([_stage(endpoint, structured_output="none")], [_record("fenced answer")], retry=FAST_RETRY)
    assert out[0]["reply_emotion"] == "SORRY" and len(endpoint.requests) == 1
    # a server that knows neither json_schema nor json_object: asked again with the next weaker mode
    endpoint.reset()
    endpoint.unsupported_formats = {"json_schema", "json_object"}
    stage = _stage(endpoint)
    stage.max_in_flight = 1
    out, rejects = run_stages([stage], [_record("first", i=0), _record("second", i=1)], retry=FAST_RETRY)
    assert len(out) == 2 and not rejects
    assert endpoint.formats[:2] == ["json_schema", "json_object"] and endpoint.formats[-1] is None
    assert endpoint.formats.count(None) == 2  # the second record went straight to the mode that works


def test_429_retry_after_500_and_timeouts_are_transient(endpoint, api_key):
    endpoint.faults["rate limited"] = [{"status": 429, "retry_after": "0.3"}]
    endpoint.faults["server error"] = [{"status": 500}, {"status": 503}]
    endpoint.faults["too slow"] = [{"sleep": 1.5}]
    stage = _stage(endpoint, timeout_s=0.5)
    stage.setup()
    slept = []
    runner = StageRunner(stage, retry=RetryPolicy(max_attempts=4, backoff_s=0.01), sleep=slept.append, seed=0)
    records = [_record("rate limited now", i=0), _record("server error now", i=1), _record("too slow now", i=2)]
    results = runner.run(records)
    assert all(isinstance(r, list) and len(r) == 1 for r in results), results
    assert endpoint.count_for("rate limited") == 2 and endpoint.count_for("server error") == 3 and endpoint.count_for("too slow") == 2
    assert slept[0] == pytest.approx(0.3)  # the peer's Retry-After, not the backoff
    assert stage.usage()["transient_errors"] == 4
    # a fault that does not pass: rejected as transient_error after max_attempts
    endpoint.always["never up"] = {"status": 502}
    result = runner.run([_record("never up", i=3)])[0]
    assert result.reason == "transient_error" and "4 tries" in result.detail and "HTTP 502" in result.detail
    stage.teardown()


def test_circuit_breaker_stops_calling_a_failing_endpoint(endpoint, api_key):
    endpoint.always[""] = {"status": 500}
    stage = _stage(endpoint, breaker_failures=3, breaker_cooldown_s=60.0)
    stage.max_in_flight = 1
    records = [_record(f"hello number {i}", i=i) for i in range(6)]
    out, rejects = run_stages([stage], records, retry=RetryPolicy(max_attempts=4, backoff_s=0.0))
    assert not out and len(rejects) == 6
    assert len(endpoint.requests) == 3  # then nothing was sent
    assert [r.reason for r in rejects] == ["circuit_open"] * 6
    assert stage.usage()["circuit_open"] == 6


def test_retry_after_reads_seconds_milliseconds_and_dates():
    from email.utils import formatdate

    class Response:
        def __init__(self, headers):
            self.headers = headers

    assert retry_after(Response({"retry-after": "2"})) == 2.0
    assert retry_after(Response({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert 3.0 <= retry_after(Response({"retry-after": formatdate(time.time() + 5, usegmt=True)})) <= 5.0
    assert retry_after(Response({"retry-after": "soon"})) is None and retry_after(Response({})) is None


def test_circuit_breaker_cools_down_then_reopens_on_the_next_failure():
    now = [0.0]
    breaker = CircuitBreaker(failures=2, cooldown_s=10.0, clock=lambda: now[0])
    assert breaker.allow() and not breaker.failure()
    assert breaker.failure() and not breaker.allow()  # opened by the second
    now[0] = 10.5
    assert breaker.allow()
    assert breaker.failure() and not breaker.allow()  # half-open: one more failure opens it again
    now[0] = 21.0
    breaker.success()
    assert breaker.allow() and not breaker.failure()


def test_requests_run_concurrently_and_identical_requests_are_sent_once(endpoint, api_key, tmp_path):
    endpoint.latency_s = 0.2
    stage = _stage(endpoint, tmp_path)
    assert stage.max_in_flight == 32
    records = [_record(f"sentence number {i}", i=i) for i in range(64)]
    records += [_record("the very same words", i=100 + i) for i in range(5)]
    started = time.perf_counter()
    out, rejects = run_stages([stage], records, retry=FAST_RETRY)
    assert len(out) == len(records) and not rejects
    assert endpoint.peak_in_flight >= 32
    assert time.perf_counter() - started < 64 * 0.2 / 4  # far from one at a time
    assert endpoint.count_for("the very same words") == 1 and stage.usage()["cache_hits"] == 4


def test_the_key_never_leaves_the_client(endpoint, api_key, tmp_path, caplog):
    endpoint.always["bad key"] = {"status": 401, "echo_auth": True}
    endpoint.always["bad request"] = {"status": 400, "echo_auth": True}
    stage = _stage(endpoint, tmp_path)
    stage.setup()
    assert api_key not in repr(stage) and api_key not in repr(vars(stage)) and api_key not in str(stage.__getstate__())
    out, rejects = run_stages([stage], [_record("bad key here", i=0), _record("bad request here", i=1), _record("fine", i=2)],
                              retry=FAST_RETRY)
    assert endpoint.auth_headers == {f"Bearer {api_key}"}  # the key did reach the endpoint
    assert {r.reason for r in rejects} == {"llm_auth_error", "llm_request_error"}
    for reject in rejects:
        assert api_key not in json.dumps(reject.to_dict())
    assert api_key not in pickle.dumps(stage).decode("latin-1")
    assert api_key not in caplog.text and api_key not in json.dumps(stage.usage())
    assert api_key not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_a_missing_key_fails_setup_for_openai_and_is_allowed_for_a_local_server(monkeypatch, endpoint):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIReply(model="gpt-4o-mini").setup()
    out, _ = run_stages([_stage(endpoint, api_key_env="MY_LOCAL_KEY")], [_record("hello there")], retry=FAST_RETRY)
    assert out and endpoint.auth_headers == {"Bearer EMPTY"}


def test_bad_params_are_named():
    for params, match in (({}, "model is required"), ({"model": "m", "structured_output": "xml"}, "structured_output"),
                          ({"model": "m", "turns": 0}, "turns"), ({"model": "m", "api_key_env": "not a name"}, "api_key_env")):
        with pytest.raises(ValueError, match=match):
            OpenAIReply(**params)


def test_multi_turn_history_is_stored_as_turns_and_trains_as_history(endpoint, api_key):
    from echat.model.prompts import prompt_segments

    stage = _stage(endpoint, turns=3)
    out, rejects = run_stages([stage], [_record("I failed my exam"), _record("我考试没考好", "zh", i=1)], retry=FAST_RETRY)
    assert len(out) == 2 and not rejects
    schema = endpoint.bodies[0]["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["history"]["minItems"] == schema["properties"]["history"]["maxItems"] == 2
    for o in out:
        assert [t["role"] for t in o["history"]] == ["user", "assistant"] * 2
        assert all(t["text"].strip() for t in o["history"])
        assert record_task({**o, "audio": {"bytes": b"x"}}) == "<HISTORY>"
        texts = [s.text for s in prompt_segments("s2t_chat", history=o["history"])]
        assert o["history"][0]["text"] in texts
    assert record_task({"reply_text": "hi", "think_text": "<think>x<think end>"}) == "<S2TCHAT> <THINK>"


def test_a_torn_or_no_longer_valid_cache_entry_is_asked_again(endpoint, api_key, tmp_path):
    records = [_record("words worth an answer")]
    run_stages([_stage(endpoint, tmp_path)], records, retry=FAST_RETRY)
    (entry,) = (tmp_path / "cache" / CACHE_NAMESPACE).rglob("*.json")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # as a crash mid-write would leave it
    out, _ = run_stages([_stage(endpoint, tmp_path)], records, retry=FAST_RETRY)
    assert out and len(endpoint.requests) == 2
    out, _ = run_stages([_stage(endpoint, tmp_path)], records, retry=FAST_RETRY)
    assert out and len(endpoint.requests) == 2  # rewritten whole: a hit
    # validation is applied to what the cache holds too: a tighter limit asks again
    out, rejects = run_stages([_stage(endpoint, tmp_path, max_reply_words=5, answer_attempts=1)], records, retry=FAST_RETRY)
    assert not out and rejects[0].reason == "llm_too_long" and len(endpoint.requests) == 3


def test_cache_on_a_beam_filesystem_path(endpoint, api_key, memfs):
    cache = ContentCache("memtest://bucket/cache", "t")
    key = cache_key(x=1)
    assert cache.get_json(key) is None
    assert cache.put_json(key, {"a": "好"}) == f"memtest://bucket/cache/t/{key[:2]}/{key}.json"
    assert cache.get_json(key) == {"a": "好"}
    assert not [p for p in memfs if p.endswith(".tmp")]  # written aside, then renamed into place
    records = [_record("hello from the bucket", i=0), _record("and again", i=1)]
    for expected_requests in (2, 0):
        endpoint.reset()
        stage = OpenAIReply(model="test-model", base_url=endpoint.url, cache_dir="memtest://bucket/cache")
        out, _ = run_stages([stage], records, retry=FAST_RETRY)
        assert len(out) == 2 and len(endpoint.requests) == expected_requests
    assert sum(1 for p in memfs if f"/{CACHE_NAMESPACE}/" in p) == 2


@pytest.fixture
def memfs():
    """A Beam filesystem for the scheme memtest:// held in a dict (as gs:// would be, offline)."""
    import io

    from apache_beam.io.filesystem import FileMetadata, FileSystem

    store: dict[str, bytes] = {}

    class _Writer(io.BytesIO):
        def __init__(self, path):
            super().__init__()
            self.path = path

        def close(self):
            store[self.path] = self.getvalue()
            super().close()

    class MemTestFileSystem(FileSystem):
        @classmethod
        def scheme(cls):
            return "memtest"

        def join(self, base, *paths):
            return "/".join([base.rstrip("/"), *paths])

        def split(self, path):
            return path.rsplit("/", 1)

        def mkdirs(self, path):
            pass

        def has_dirs(self):
            return False

        def _list(self, dir_or_prefix):
            for path, data in store.items():
                if path.startswith(dir_or_prefix):
                    yield FileMetadata(path, len(data))

        def create(self, path, mime_type="application/octet-stream", compression_type=None):
            return _Writer(path)

        def open(self, path, mime_type="application/octet-stream", compression_type=None):
            if path not in store:
                raise FileNotFoundError(path)
            return io.BytesIO(store[path])

        def copy(self, sources, destinations):
            for s, d in zip(sources, destinations):
                store[d] = store[s]

        def rename(self, sources, destinations):
            for s, d in zip(sources, destinations):
                store[d] = store.pop(s)

        def exists(self, path):
            return path in store

        def size(self, path):
            return len(store[path])

        def last_updated(self, path):
            return 0.0

        def checksum(self, path):
            return str(len(store[path]))

        def metadata(self, path):
            return FileMetadata(path, len(store[path]))

        def delete(self, paths):
            for p in paths:
                store.pop(p, None)

    yield store
    MemTestFileSystem.scheme = classmethod(lambda cls: "memtest-retired")  # keep later lookups unambiguous


def test_the_template_engine_stays_the_default_and_says_so():
    from echat.pipelines.profile import load_profile
    from echat.synth.template_reply import MODEL_NAME, TemplateReply

    assert load_profile("local").stage("reply").backend == "template"
    stage = TemplateReply()
    stage.setup()
    out = list(stage.process(_record("I lost my keys and I am so upset.")))[0]
    assert out["llm_model"] == MODEL_NAME == "template-v1" and out["prompt_version"].startswith("templates-")


# ---------------------------------------------------------------------------------------------
# real Beam builds


def _rows(out: Path) -> list[dict]:
    return [row for shard in sorted((out / "data").glob("*.parquet")) for row in pq.read_table(shard).to_pylist()]


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for path in sorted((out / "rejects").glob("*.jsonl")) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small_manifest(demo_corpus, tmp_path_factory) -> tuple[Path, list[dict]]:
    """12 demo utterances with distinct transcripts, their paths absolute."""
    rows, seen = [], set()
    for line in (demo_corpus / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["text"] in seen:
            continue
        seen.add(row["text"])
        rows.append({**row, "path": str(demo_corpus / row["path"])})
        if len(rows) == 12:
            break
    path = tmp_path_factory.mktemp("llm-manifest") / "manifest.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path, rows


def _profile(endpoint, cache: Path, *extra: str):
    from echat.pipelines.profile import load_profile

    return load_profile("local", [
        f"cache_dir={cache}", "reply.backend=openai", f"reply.params.base_url={endpoint.url}",
        "reply.params.model=test-model", "reply.params.timeout_s=1.0", "tts.backend=none",
        "retry.backoff_s=0.05", *extra,
    ])


def _key_absent(key: str, out: Path) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), f"the API key is in {path}"


@pytest.mark.slow
def test_build_with_injected_faults_reconciles_and_leaks_no_key(endpoint, api_key, small_manifest, tmp_path):
    from echat.pipelines.build import build

    manifest, rows_in = small_manifest
    texts = [r["text"] for r in rows_in]
    endpoint.faults[texts[0]] = [{"status": 429, "retry_after": "1"}]
    endpoint.faults[texts[1]] = [{"status": 500}]
    endpoint.faults[texts[2]] = [{"sleep": 2.0}]  # past the 1 s timeout
    endpoint.faults[texts[3]] = [{"content": '{"think": "unterminated'}]
    endpoint.always[texts[4]] = {"answer": {"reply_emotion": "ELATED"}}
    endpoint.always[texts[5]] = {"answer": {"reply": ""}}
    out = tmp_path / "out"
    summary = build(_profile(endpoint, tmp_path / "cache"), str(manifest), str(out))
    assert summary["reconciliation"]["ok"], summary["reconciliation"]
    rows, rejects = _rows(out), _rejects(out)
    assert len(rows) + len(rejects) == len(rows_in)  # every sample: a valid reply or a reject
    by_text = {r["transcript"]: r for r in rows}
    assert set(by_text) == set(texts) - {texts[4], texts[5]}
    for row in rows:
        _assert_valid_reply(row, row["language"])
        assert row["task"] == "<S2TCHAT> <THINK>"  # no reply speech in this build (tts off)
    reasons = sorted(r["reason"] for r in rejects if r["stage"] == "reply")
    assert reasons == ["llm_empty", "llm_off_vocabulary"]
    reply = summary["stages"]["reply"]
    assert reply["in"] == len(rows_in) and reply["out"] == len(rows) and reply["rejected"] == 2
    assert reply["retried"] == 3  # 429, 500, timeout
    assert reply["usage"]["requests"] == len(endpoint.requests) == len(rows_in) + 3 + 1 + 2 * 2
    assert reply["usage"]["prompt_tokens"] == 100 * (reply["usage"]["requests"] - 3)  # none for 429, 500, the timed-out one
    _key_absent(api_key, out)


@pytest.mark.slow
def test_second_build_sends_no_request_and_multi_turn_rows_train_as_history(endpoint, api_key, small_manifest, tmp_path):
    from echat.pipelines.build import build
    from echat.model.samples import SampleBuilder

    manifest, rows_in = small_manifest
    profile = _profile(endpoint, tmp_path / "cache", "reply.params.turns=2", "reply.params.price_input_per_m=2.5",
                       "reply.params.price_output_per_m=10")
    first = build(profile, str(manifest), str(tmp_path / "a"))
    sent = len(endpoint.requests)
    assert sent == len(rows_in) and first["stages"]["reply"]["usage"]["cost_micro_usd"] == sent * (100 * 2.5 + 20 * 10)
    second = build(profile, str(manifest), str(tmp_path / "b"))
    assert len(endpoint.requests) == sent  # the second build sent nothing
    assert second["stages"]["reply"]["usage"] == {"cache_hits": len(rows_in)}
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert len(a) == len(b) == len(rows_in)
    assert sorted((r["id"], r["reply_text"], json.dumps(r["history"])) for r in a) == sorted((r["id"], r["reply_text"], json.dumps(r["history"])) for r in b)
    for row in b:
        assert row["task"] == "<HISTORY>"
        assert [t["role"] for t in row["history"]] == ["user", "assistant"]
        assert SampleBuilder._history(row) == row["history"]  # the trainer reads it as written


@pytest.mark.slow
def test_killed_build_resumes_without_asking_again(endpoint, api_key, small_manifest, tmp_path):
    from echat.pipelines.build import build

    manifest, rows_in = small_manifest
    endpoint.latency_s = 0.4
    cache = tmp_path / "cache"
    overrides = [f"cache_dir={cache}", "reply.backend=openai", f"reply.params.base_url={endpoint.url}",
                 "reply.params.model=test-model", "tts.backend=none", "reply.max_in_flight=2"]
    command = [sys.executable, "-m", "echat.cli", "build", "--profile", "local", "--input", str(manifest),
               "--output", str(tmp_path / "killed"), "--quiet"]
    for o in overrides:
        command += ["--set", o]
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OPENAI_API_KEY": api_key},
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while endpoint.answered < 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, f"the build ended before it was killed: {(tmp_path / 'killed.log').read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)  # a real crash: no cleanup, no flush
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    asked_before = {r["transcript"] for r in endpoint.requests}
    answered_before = endpoint.answered
    saved = len(list((cache / CACHE_NAMESPACE).rglob("*.json")))
    assert 1 <= saved < len(rows_in)
    assert answered_before - saved <= 2  # at most the requests in flight at the kill were lost

    endpoint.reset()
    endpoint.latency_s = 0.0
    from echat.pipelines.profile import load_profile

    summary = build(load_profile("local", overrides), str(manifest), str(tmp_path / "resumed"))
    assert summary["reconciliation"]["ok"] and summary["outputs"]["rows"] == len(rows_in)
    asked_after = [r["transcript"] for r in endpoint.requests]
    assert len(asked_after) == len(set(asked_after)) == len(rows_in) - saved  # only what had no answer
    assert summary["stages"]["reply"]["usage"]["cache_hits"] == saved
    assert len(asked_before) >= saved and set(asked_after) | asked_before == {r["text"] for r in rows_in}
