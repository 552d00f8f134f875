"""`echat eval --judge` (model/judge.py) end to end, against a LOCAL stand-in for a real judge model.

The judge endpoint here is tests/llm_server.py's FakeChatServer on 127.0.0.1, speaking the OpenAI
chat-completions protocol to the real `openai` client, with a judge-specific answer: it reads the
case out of the request (query transcript, reply text, the emotion said to be heard in the reply's
speech) and answers scores derived from them by `scores_for`, so the test can compute what every
mean must be. It is a local stand-in for a real judge model (GPT-4o in the paper): it checks the
plumbing (what is sent, retries, caching, the arithmetic of the table), not the judgement.

Faults: a 429 with Retry-After and a 500 that succeed on retry, an answer that is never JSON
(unscorable), a request that always fails with 500 (unscorable after the runner's retries) and one
refused with 401 (the key in its error text must not leak). The reply audio is synthesised here
with espeak-ng, and the emotion sent to the judge is checked against the heuristic emotion stage
run on the same audio. A rerun with the cache sends requests only for what had no verdict.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from echat.cli import main as echat
from echat.labelers.emotion import HeuristicEmotion
from echat.model import judge
from echat.schemas.audio import encode_flac, load_audio, resample
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage_runner import run_stages
from llm_server import FakeChatServer

DIMENSIONS = judge.load_judge_prompt().names

# The lines of the packaged user template the stand-in reads (model/judge_prompt.yaml).
_QUERY = re.compile(r'^The user said: "(.*)"$', re.M)
_REPLY = re.compile(r'^The assistant replied: "(.*)"$', re.M)
_HEARD = re.compile(r"^Emotion heard in the reply's speech: (\S+) \(heard by (.+), confidence ([0-9.]+)\)$", re.M)


def _case_text(body: dict) -> str:
    return next(m["content"] for m in body["messages"] if m["role"] == "user")  # the case; feedback comes later


def query_of(body: dict) -> str:
    found = _QUERY.search(_case_text(body))
    return found.group(1) if found else ""


def heard_of(body: dict) -> str | None:
    found = _HEARD.search(_case_text(body))
    return found.group(1) if found else None


def scores_for(query: str, reply: str, heard: str) -> dict[str, int]:
    """The stand-in judge's scores: a function of what it was told, 0-100 per dimension."""
    digest = hashlib.sha256(f"{query}|{reply}|{heard}".encode()).digest()
    return {name: digest[i] % 101 for i, name in enumerate(DIMENSIONS)}


def judge_answer(body: dict) -> dict:
    text = _case_text(body)
    query, reply, heard = _QUERY.search(text).group(1), _REPLY.search(text).group(1), _HEARD.search(text).group(1)
    return {name: {"score": score, "reason": f"{name} fits the case."} for name, score in scores_for(query, reply, heard).items()}


@pytest.fixture
def endpoint():
    with FakeChatServer(answer=judge_answer, key_of=query_of) as server:
        yield server


@pytest.fixture
def api_key(monkeypatch):
    key = "sk-judge-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    return key


FLAT = {"speed": 90, "pitch": 20, "range": 0, "amplitude": 30}  # slow, flat and quiet: the heuristic hears sadness
LIVELY = {"speed": 230, "pitch": 65, "range": 250, "amplitude": 170}

# key -> (query transcript, query labels, reply text, reply prosody, expected task group)
CASES = {
    "q-sad": ("I failed my exam today and I feel terrible.", {"emotion": "sad", "emotion_score": 0.9, "gender": "female", "age": "adult"},
              "I'm so sorry. That sounds really hard, and it is okay to feel sad about it.", FLAT, "emotion"),
    "q-child": ("Can you tell me why the sky is blue?", {"emotion": "neutral", "gender": "male", "age": "child", "age_score": 0.8},
                "Great question! Sunlight bounces around in the air, and blue light bounces the most.", LIVELY, "age"),
    "q-gender": ("What should I wear to my job interview tomorrow?", {"emotion": "neutral", "gender": "male", "age": "adult"},
                 "Okay, I see what you mean about that.", FLAT, "gender"),
    "q-cough": ("I have had this cough for a week now.", {"emotion": "neutral", "gender": "female", "age": "adult", "events": ["cough"]},
                "Okay, I see what you mean about that.", LIVELY, "event"),
    "q-multi": ("Nobody visits me anymore since my wife passed away.", {"emotion": "sad", "gender": "male", "age": "old"},
                "That sounds very lonely. I'm glad you told me, and I'm here to listen.", FLAT, "multi"),
    "q-429": ("I just got the promotion I wanted!", {"emotion": "happy", "gender": "female", "age": "adult"},
              "That is wonderful news, congratulations! You worked so hard for it.", LIVELY, "emotion"),
    "q-500": ("My dog ran away this morning.", {"emotion": "sad", "gender": "female", "age": "child"},
              "Oh no, that must be scary. Let's think about where he might go.", FLAT, "multi"),
    "q-malformed": ("I can't sleep at night.", {"emotion": "fear", "gender": "male", "age": "adult"},
                    "That sounds exhausting. Do you know what keeps you awake?", FLAT, "emotion"),
    "q-down": ("Everything is going wrong this week.", {"emotion": "anger", "gender": "male", "age": "adult"},
               "That sounds like a rough week. What happened?", LIVELY, "emotion"),
    "q-auth": ("My grandson is visiting this weekend.", {"emotion": "happy", "gender": "female", "age": "old"},
               "How lovely! What are you planning to do together?", LIVELY, "multi"),
}
FAILING = {"q-malformed": "llm_malformed", "q-down": "transient_error", "q-auth": "llm_auth_error"}


def _synthesize(text: str, prosody: dict, path: Path) -> None:
    from echat.synth.espeak_tts import Prosody, synthesize

    waveform, rate = synthesize(text, "en", Prosody(**prosody))
    sf.write(path, resample(waveform, rate, SAMPLE_RATE), SAMPLE_RATE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A one-shard build holding the queries, reply wavs, and a predictions file made on them."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    root = tmp_path_factory.mktemp("judge")
    tone = encode_flac((0.1 * np.sin(np.arange(SAMPLE_RATE) / 8.0)).astype(np.float32))  # the query audio: not judged
    rows = []
    for key, (query, labels, _, _, _) in CASES.items():
        rows.append({"id": key, "audio": {"bytes": tone, "path": None}, "transcript": query, "language": "en",
                     "events": [], **labels})
    (root / "build" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "build" / "data" / "part-00000.parquet")
    wavs = root / "wavs"
    wavs.mkdir()
    predictions = []
    for key, (_, _, reply, prosody, _) in CASES.items():
        _synthesize(reply, prosody, wavs / f"{key}.wav")
        # One reply carries its reasoning, as <S2TCHAT> <THINK> writes it: the judge sees the reply alone.
        prediction = f"<think>They sound low.<think end>{reply}" if key == "q-sad" else reply
        predictions.append({"key": key, "task": "<S2TCHAT> <THINK>" if key == "q-sad" else "<S2TCHAT>",
                            "prediction": prediction, "reference": None, "language": "en", "finished": True})
    predictions.append({"key": "q-sad", "task": "<TRANSCRIBE>", "prediction": "i failed", "reference": "i failed my exam"})
    predictions.append({"key": "q-gone", "task": "<S2TCHAT>", "prediction": "Hello there.", "reference": None})
    path = root / "preds.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in predictions), encoding="utf-8")
    return root


def heard_by_labeler(wav: Path, reply: str) -> tuple[str, float]:
    """What the heuristic emotion stage says for this reply audio (its words as the transcript)."""
    waveform = load_audio(str(wav), target_sample_rate=SAMPLE_RATE).waveform
    (out,), rejects = run_stages([HeuristicEmotion()], [{"id": "x", "source_uri": str(wav), "_waveform": waveform,
                                                         "sampling_rate": SAMPLE_RATE, "transcript": reply, "language": "en"}])
    assert not rejects
    return out["emotion"], out["emotion_score"]


def _run(corpus: Path, endpoint, report: Path, *extra: str) -> int:
    return echat(["eval", "--judge", "--predictions", str(corpus / "preds.jsonl"), "--shards", str(corpus / "build"),
                  "--response-audio", str(corpus / "wavs"), "--judge-model", "judge-test", "--judge-base-url", endpoint.url,
                  "--judge-timeout-s", "5", "--report", str(report), "--cache-dir", str(report.parent / "cache"),
                  "--set", "retry.backoff_s=0.01", "--set", "retry.max_backoff_s=2", *extra])


def test_judge_end_to_end_with_faults_cache_and_heard_emotion(corpus, endpoint, api_key, tmp_path, capsys):
    endpoint.latency_s = 0.1  # long enough for requests to overlap
    endpoint.faults["I just got the promotion"] = [{"status": 429, "retry_after": "1"}]
    endpoint.faults["My dog ran away"] = [{"status": 500}]
    endpoint.always["I can't sleep"] = {"content": "Scores: empathy high, content fine."}
    endpoint.always["Everything is going wrong"] = {"status": 500}
    endpoint.always["My grandson"] = {"status": 401, "echo_auth": True}
    report_path = tmp_path / "judge.json"

    assert _run(corpus, endpoint, report_path) == 0
    printed = capsys.readouterr()
    report = json.loads(report_path.read_text())

    # The emotion sent to the judge is the one the heuristic stage hears in each reply's audio.
    heard = {key: heard_by_labeler(corpus / "wavs" / f"{key}.wav", reply) for key, (_, _, reply, _, _) in CASES.items()}
    sent = {}
    for body in endpoint.bodies:
        key = next(k for k, case in CASES.items() if case[0] == query_of(body))
        sent.setdefault(key, set()).add(heard_of(body))
    assert set(sent) == set(CASES)
    for key, values in sent.items():
        assert values == {heard[key][0]}, key
    by_key = {r["key"]: r for r in report["responses"] if r["task"].startswith("<S2TCHAT")}
    for key, (emotion, score) in heard.items():
        assert by_key[key]["response_emotion"] == emotion and by_key[key]["response_emotion_score"] == pytest.approx(score)
        assert by_key[key]["response_emotion_model"] == "heuristic-v1"
    # The same words spoken flat or lively are heard differently: the label comes from the audio.
    assert heard["q-gender"][0] != heard["q-cough"][0]

    # Each response's scores are the judge's; the means are their means, per task and overall.
    expected = {key: scores_for(query, reply, heard[key][0]) for key, (query, _, reply, _, _) in CASES.items() if key not in FAILING}
    for key, scores in expected.items():
        assert {d: v["score"] for d, v in by_key[key]["scores"].items()} == scores
        assert by_key[key]["unscorable"] is None
    groups = {key: case[4] for key, case in CASES.items()}
    assert {key: by_key[key]["group"] for key in CASES} == groups
    assert list(report["tasks"]) == ["emotion", "age", "gender", "event", "multi", "none"]
    for group, block in report["tasks"].items():
        members = [k for k in expected if groups[k] == group]
        assert block["judged"] == len(members)
        for d in DIMENSIONS:
            want = sum(expected[k][d] for k in members) / len(members) if members else None
            assert block["means"][d] == (pytest.approx(want) if members else None), (group, d)
    for d in DIMENSIONS:
        assert report["overall"]["means"][d] == pytest.approx(sum(s[d] for s in expected.values()) / len(expected))

    # What could not be judged is there with its reason, counted, out of the means.
    for key, reason in FAILING.items():
        assert by_key[key]["scores"] is None and by_key[key]["unscorable"]["reason"] == reason, by_key[key]
    gone = next(r for r in report["responses"] if r["key"] == "q-gone")
    assert gone["unscorable"]["reason"] == judge.NO_RECORD and gone["group"] == "none"
    assert report["unscorable"] == {"llm_auth_error": 1, "llm_malformed": 1, judge.NO_RECORD: 1, "transient_error": 1}
    assert report["overall"] == {**report["overall"], "responses": len(CASES) + 1, "judged": len(expected), "unscorable": 4}
    assert report["tasks"]["emotion"]["unscorable"] == 2 and report["tasks"]["multi"]["unscorable"] == 1
    assert report["skipped"] == {"task '<TRANSCRIBE>' is not a spoken-dialogue reply": 1}
    assert "gave up after 4 tries" in by_key["q-down"]["unscorable"]["detail"]

    # Retries: the 429 was retried after the Retry-After it named; the 500 once; the dead one 4 times.
    promo = [r for r in endpoint.requests if r["transcript"].startswith("I just got the promotion")]
    assert [r["outcome"] for r in promo] == ["http_429", "ok"]
    assert promo[1]["at"] - promo[0]["at"] >= 0.9
    assert [r["outcome"] for r in endpoint.requests if r["transcript"].startswith("My dog")] == ["http_500", "ok"]
    assert endpoint.count_for("Everything is going wrong") == 4
    assert endpoint.count_for("I can't sleep") == 2  # the answer asked again once, the error fed back
    assert endpoint.peak_in_flight >= 2  # the responses are judged concurrently

    # The table printed is the report's: a row per dimension, a column per task.
    table = printed.out
    assert re.search(r"dimension\s+Emotion\s+Age\s+Gender\s+Event\s+Multi\s+None\s+All", table)
    empathy = re.search(r"^empathy\s+(.*)$", table, re.M).group(1).split()
    blocks = [*report["tasks"].values(), report["overall"]]
    assert empathy == [f"{b['means']['empathy']:.1f}" if b["means"]["empathy"] is not None else "-" for b in blocks]

    # The key reached the server, and nothing else holds it.
    assert endpoint.auth_headers == {f"Bearer {api_key}"}
    for text in (report_path.read_text(), printed.out, printed.err):
        assert api_key not in text

    # A rerun asks only what has no verdict yet (failures are not cached)...
    seen = len(endpoint.requests)
    assert _run(corpus, endpoint, tmp_path / "again.json") == 0
    asked_again = {r["transcript"] for r in endpoint.requests[seen:]}
    assert asked_again == {CASES[k][0] for k in FAILING}
    again = json.loads((tmp_path / "again.json").read_text())
    assert again["tasks"] == report["tasks"] and again["usage"]["cache_hits"] == len(expected)
    # ...and once the endpoint is well, one more run fills the gaps, after which nothing is sent.
    endpoint.reset()
    assert _run(corpus, endpoint, tmp_path / "healed.json") == 0
    assert len(endpoint.requests) == len(FAILING)
    assert _run(corpus, endpoint, tmp_path / "cached.json") == 0
    assert len(endpoint.requests) == len(FAILING)
    cached = json.loads((tmp_path / "cached.json").read_text())
    assert cached["overall"]["judged"] == len(CASES) and cached["usage"].get("requests", 0) == 0


def test_query_cues_and_groups():
    assert judge.query_cues({"emotion": "sad", "age": "adult", "gender": "female"}) == ["emotion:sad"]
    assert judge.query_cues({"emotion": "neutral", "age": "adult", "gender": "female"}) == ["gender:female"]
    assert judge.query_cues({"emotion": "neutral", "age": "old", "gender": "male", "events": ["cough", "sigh"]}) == \
        ["age:old", "event:cough", "event:sigh"]
    assert judge.query_cues({"cues": ["gender:male", "emotion:happy"], "emotion": "neutral"}) == ["emotion:happy", "gender:male"]
    with pytest.raises(judge.JudgeError, match="pitch:high"):
        judge.query_cues({"id": "r1", "cues": ["pitch:high"]})
    assert judge.task_group(["event:cough", "event:sigh"]) == "event"
    assert judge.task_group(["age:old", "event:cough"]) == "multi"
    assert judge.task_group([]) == "none"


def test_verdict_validation_names_the_problem():
    from echat.synth.llm_reply import AnswerError

    prompt = judge.load_judge_prompt()
    good = {d: {"score": 70, "reason": "fine"} for d in prompt.names}
    assert judge.validate_verdict(good, prompt)["empathy"] == {"score": 70, "reason": "fine"}
    for change, reason, words in (({"empathy": {"score": 140, "reason": "x"}}, "llm_out_of_range", "outside 0-100"),
                                  ({"content": {"score": "high", "reason": "x"}}, "llm_malformed", "content.score"),
                                  ({"speech_emotion": {"score": 5, "reason": " "}}, "llm_malformed", "speech_emotion.reason")):
        with pytest.raises(AnswerError, match=words) as err:
            judge.validate_verdict({**good, **change}, prompt)
        assert err.value.reason == reason
    with pytest.raises(AnswerError, match="lacks the dimension"):
        judge.validate_verdict({"empathy": good["empathy"]}, prompt)


def test_a_bad_prompt_file_is_named(tmp_path):
    bad = tmp_path / "judge.yaml"
    text = (Path(judge.__file__).parent / judge.PROMPT_FILE).read_text().replace("{response_emotion}\n", "{heard}\n", 1)
    bad.write_text(text)
    with pytest.raises(judge.JudgeError, match=r"user_template.*unknown placeholder.*heard"):
        judge.load_judge_prompt(bad)


def test_missing_inputs_are_clear_errors(corpus, tmp_path, capsys):
    preds = str(corpus / "preds.jsonl")
    assert echat(["eval", "--judge", "--predictions", preds, "--judge-model", "m"]) == 2
    assert "--shards is required" in capsys.readouterr().err
    assert echat(["eval", "--judge", "--predictions", preds, "--shards", str(corpus / "build")]) == 2
    assert "--judge-model is required" in capsys.readouterr().err
    assert echat(["eval", "--judge", "--predictions", preds, "--shards", str(tmp_path / "nowhere"), "--judge-model", "m",
                  "--judge-base-url", "http://127.0.0.1:9/v1"]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_the_emotion_labeler_is_the_profiles_emotion_stage():
    labeler = judge.emotion_labeler(judge.load_profile("local", []))
    assert isinstance(labeler.stage, HeuristicEmotion) and labeler.stage.slot == "emotion"
    production = judge.emotion_labeler(judge.load_profile("local", ["emotion.backend=emotion2vec", "retry.max_attempts=2"]))
    assert type(production.stage).__name__ == "Emotion2vecEmotion" and production.retry.max_attempts == 2
    with pytest.raises(judge.JudgeError, match="no enabled emotion stage"):
        judge.emotion_labeler(judge.load_profile("local", ["emotion.backend=none"]))
    with pytest.raises(judge.JudgeError, match="emotion.params.bogus"):
        judge.load_profile("local", ["emotion.params.bogus=1"])


def test_judge_options_without_judge_are_an_error(corpus, capsys):
    assert echat(["eval", "--predictions", str(corpus / "preds.jsonl"), "--judge-model", "m", "--shards", "x"]) == 2
    assert "--shards, --judge-model only mean something with --judge" in capsys.readouterr().err
