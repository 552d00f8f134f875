"""Speech: the OpenAI-compatible TTS backend, CosyVoice, the speech tokenizer, the reply back-check
and synthetic queries built into shards.

The speech backend is tested against tests/speech_server.py, a local server on 127.0.0.1 that
speaks the OpenAI `audio.speech` protocol (POST /v1/audio/speech answering WAV bytes) and injects
its faults: 429 with Retry-After, 500, a truncated WAV body, bytes that are no audio. The speech
tokenizer runs a tiny ONNX model built here with the same input and output signature as
CosyVoice's speech_tokenizer_v1.onnx (feats (1, 128, T) float32 + feats_length int32 -> tokens at
a quarter of the mel frame rate). The back-check speaks with the real espeak-ng and transcribes
with the real pocketsphinx; espeak-ng is part of the set-up (scripts/setup.sh), so without it these
tests fail rather than skip. Nothing here reaches the network.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import test_labelers_support as speech
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject
from echat.schemas.stage_runner import RetryPolicy, StageRunner
from echat.synth.openai_tts import OpenAISpeechTTS
from speech_server import FakeSpeechServer

run_stage = speech.run_stage
SAID = "Congratulations on passing your driving test! You must be so proud."
OTHER = "The train to the northern mountains leaves at seven in the morning from platform nine."


@pytest.fixture(scope="module")
def server():
    with FakeSpeechServer() as srv:
        yield srv


@pytest.fixture
def speech_server(server):
    server.reset()
    return server


def reply(text: str, emotion: str = "WORRIED", language: str = "en", **extra) -> dict:
    return {"id": f"r-{abs(hash(text)) % 10**8}", "source_uri": "a.wav", "reply_text": text, "reply_emotion": emotion,
            "language": language, **extra}


def runner(stage, sleeps: list | None = None) -> StageRunner:
    return StageRunner(stage, retry=RetryPolicy(max_attempts=4, backoff_s=0.01, max_backoff_s=5.0),
                       sleep=(sleeps.append if sleeps is not None else (lambda s: None)))


def results(stage, *records, sleeps=None) -> list:
    return [r if isinstance(r, Reject) else r[0] for r in runner(stage, sleeps).run(list(records))]


# ---------------------------------------------------------------------------------------------
# the OpenAI-compatible speech endpoint


def test_openai_speech_speaks_reply_with_voice_by_gender_and_emotion_instructions(speech_server, monkeypatch):
    monkeypatch.setenv("ECHAT_TEST_TTS_KEY", "sk-test-0123456789")
    stage = OpenAISpeechTTS(model="gpt-4o-mini-tts", base_url=speech_server.url, api_key_env="ECHAT_TEST_TTS_KEY", gender="male")
    (out,) = results(stage, reply("I am sorry you feel so alone tonight.", "SORRY"))
    assert not isinstance(out, Reject), out
    wave = out["_reply_waveform"]
    assert wave.dtype == np.float32 and wave.ndim == 1
    # 8 words -> 8 tones of 0.3 s at the server's 24 kHz, resampled to 16 kHz
    assert out["reply_duration"] == pytest.approx(8 * 0.3, abs=0.02) == pytest.approx(wave.size / SAMPLE_RATE, abs=1e-3)
    assert out["tts_model"] == "openai-compatible:gpt-4o-mini-tts onyx"
    (request,) = speech_server.requests
    assert request["voice"] == "onyx" and request["model"] == "gpt-4o-mini-tts" and request["response_format"] == "wav"
    assert "apologetic" in request["instructions"]  # the SORRY line of synth/templates/speech_styles.yaml
    assert speech_server.auth_headers == {"Bearer sk-test-0123456789"}
    assert "sk-test" not in repr(stage) and "sk-test" not in json.dumps(stage.usage())


def test_openai_speech_retries_429_with_retry_after_and_500_then_succeeds(speech_server):
    speech_server.faults["busy"] = [{"status": 429, "retry_after": "2"}, {"status": 500}]
    stage = OpenAISpeechTTS(model="tts", base_url=speech_server.url)
    sleeps: list[float] = []
    (out,) = results(stage, reply("The line is busy today."), sleeps=sleeps)
    assert not isinstance(out, Reject), out
    assert [r["outcome"] for r in speech_server.requests] == ["http_429", "http_500", "ok"]
    assert sleeps[0] == 2.0  # Retry-After honoured; then the runner's own backoff
    assert stage.usage()["transient_errors"] == 2 and stage.usage()["requests"] == 3


def test_openai_speech_gives_up_on_a_server_that_keeps_failing(speech_server):
    speech_server.always["down"] = {"status": 503}
    stage = OpenAISpeechTTS(model="tts", base_url=speech_server.url)
    (out,) = results(stage, reply("The server is down."))
    assert isinstance(out, Reject) and out.reason == "transient_error" and "HTTP 503" in out.detail
    assert speech_server.count_for("down") == 4  # the runner's max_attempts


def test_openai_speech_reasks_a_truncated_body_then_rejects_it(speech_server):
    speech_server.faults["once"] = [{"truncate": 0.5}]  # cut once, then whole
    speech_server.always["always cut"] = {"truncate": 0.4}
    speech_server.always["noise"] = {"garbage": True}
    stage = OpenAISpeechTTS(model="tts", base_url=speech_server.url, audio_attempts=2)
    healed, cut, garbage = results(stage, reply("Cut once, then fine."), reply("This one is always cut."),
                                   reply("Only noise comes back."))
    assert not isinstance(healed, Reject) and speech_server.count_for("once") == 2
    assert isinstance(cut, Reject) and cut.reason == "tts_bad_audio" and "truncated" in cut.detail
    assert speech_server.count_for("always cut") == 2  # bounded re-asks, not retried as transient
    assert isinstance(garbage, Reject) and garbage.reason == "tts_bad_audio"


def test_openai_speech_refusals_are_rejects_not_retries(speech_server, monkeypatch):
    monkeypatch.setenv("ECHAT_TEST_TTS_KEY", "sk-secret-abcdef123456")
    speech_server.always["auth"] = {"status": 401}
    speech_server.always["bad"] = {"status": 400}
    stage = OpenAISpeechTTS(model="tts", base_url=speech_server.url, api_key_env="ECHAT_TEST_TTS_KEY")
    auth, bad = results(stage, reply("auth fails"), reply("bad request"))
    assert (auth.reason, bad.reason) == ("tts_auth_error", "tts_request_error")
    assert speech_server.count_for("auth") == 1 and "sk-secret" not in auth.detail + bad.detail


def test_openai_speech_rerun_pays_for_nothing_already_spoken(speech_server, tmp_path):
    texts = ["Take a deep breath, it will be all right.", "That is wonderful news!", "Take a deep breath, it will be all right."]
    records = [reply(t, e) for t, e in zip(texts, ["WORRIED", "HAPPY", "WORRIED"])]
    first = OpenAISpeechTTS(model="tts", base_url=speech_server.url, cache_dir=str(tmp_path))
    spoken = runner(first).run(records)
    assert len(speech_server.requests) == 2  # the repeated reply was asked for once, in flight or not
    second = OpenAISpeechTTS(model="tts", base_url=speech_server.url, cache_dir=str(tmp_path))
    again = runner(second).run(records)
    assert len(speech_server.requests) == 2  # the rerun sent nothing
    assert second.usage().get("requests", 0) == 0 and second.usage()["cache_hits"] == 3
    for a, b in zip(spoken, again):
        np.testing.assert_array_equal(a[0]["_reply_waveform"], b[0]["_reply_waveform"])
    other_voice = OpenAISpeechTTS(model="tts", base_url=speech_server.url, cache_dir=str(tmp_path), voice="alloy")
    runner(other_voice).run(records[:1])
    assert len(speech_server.requests) == 3  # another voice is other speech


# ---------------------------------------------------------------------------------------------
# CosyVoice


def test_cosyvoice_missing_is_a_load_time_error_naming_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from echat.pipelines.profile import ProfileError, load_profile
    from echat.synth import cosyvoice_tts

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cosyvoice" else real(name, *a))
    with pytest.raises(ProfileError) as err:
        load_profile("local", ["tts.backend=cosyvoice", f"tts.params={{model: {tmp_path}}}"])
    message = str(err.value)
    assert "tts (cosyvoice)" in message and "CosyVoice package" in message and "FunAudioLLM/CosyVoice" in message
    assert "pip install -r requirements.txt" in message and "CosyVoice-300M-Instruct" in message
    stage = object.__new__(cosyvoice_tts.CosyVoiceTTS)
    with pytest.raises(RuntimeError, match="CosyVoice package"):
        stage.setup()


def test_cosyvoice_instruct_mode_speaks_with_the_emotion(monkeypatch, tmp_path):
    """With a stand-in `cosyvoice` package of CosyVoice's API (no real model exists offline)."""
    import importlib.util

    import torch

    calls = []

    class CosyVoice:
        sample_rate = 22_050

        def __init__(self, model_dir):
            calls.append(("load", model_dir))

        def inference_instruct(self, tts_text, spk_id, instruct_text, stream=False):
            calls.append(("instruct", tts_text, spk_id, instruct_text))
            yield {"tts_speech": torch.full((1, 11_025), 0.1)}
            yield {"tts_speech": torch.full((1, 11_025), -0.1)}

    cli = types.ModuleType("cosyvoice.cli.cosyvoice")
    cli.CosyVoice = CosyVoice
    for name, module in (("cosyvoice", types.ModuleType("cosyvoice")), ("cosyvoice.cli", types.ModuleType("cosyvoice.cli")),
                         ("cosyvoice.cli.cosyvoice", cli)):
        monkeypatch.setitem(sys.modules, name, module)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "cosyvoice" else real(name, *a))
    from echat.synth.cosyvoice_tts import CosyVoiceTTS

    stage = CosyVoiceTTS(model=str(tmp_path / "CosyVoice-300M-Instruct"), cache_dir=str(tmp_path / "cache"))
    (out,) = run_stage(stage, reply("你好，别担心，我在这里陪着你。", "WORRIED", "zh"))
    assert not isinstance(out, Reject), out
    assert out["reply_duration"] == pytest.approx(1.0, abs=0.01)  # two 0.5 s chunks at 22,050 Hz -> 16 kHz
    assert out["tts_model"] == "cosyvoice:CosyVoice-300M-Instruct 中文女"
    (_, text, speaker, instruction), = [c for c in calls if c[0] == "instruct"]
    assert speaker == "中文女" and "caring" in instruction
    run_stage(stage, reply("你好，别担心，我在这里陪着你。", "WORRIED", "zh"))
    assert len([c for c in calls if c[0] == "instruct"]) == 1  # cached


# ---------------------------------------------------------------------------------------------
# speech tokens


def tiny_tokenizer(path: Path, scale: int = 64, offset: int = 0) -> Path:
    """An ONNX model with speech_tokenizer_v1.onnx's signature: feats (1, 128, T) float32 and
    feats_length (1,) int32 in; tokens (1, T // 4) int32 and their count out (64 random codes,
    times `scale`, plus `offset`)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    constants = [
        numpy_helper.from_array(rng.standard_normal((64, 128, 4)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([4], dtype=np.int32), "four"),
        numpy_helper.from_array(np.array(scale, dtype=np.int64), "scale"),
        numpy_helper.from_array(np.array(offset, dtype=np.int64), "offset"),
    ]
    nodes = [
        helper.make_node("Conv", ["feats", "W"], ["logits"], strides=[4], kernel_shape=[4]),
        helper.make_node("ArgMax", ["logits"], ["codes"], axis=1, keepdims=0),
        helper.make_node("Mul", ["codes", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["shifted"]),
        helper.make_node("Cast", ["shifted"], ["indices"], to=TensorProto.INT32),
        helper.make_node("Div", ["feats_length", "four"], ["indices_lens"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_speech_tokenizer",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, 128, "T"]),
         helper.make_tensor_value_info("feats_length", TensorProto.INT32, [1])],
        [helper.make_tensor_value_info("indices", TensorProto.INT32, [1, "T4"]),
         helper.make_tensor_value_info("indices_lens", TensorProto.INT32, [1])],
        initializer=constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("CosyVoice-300M")
    tiny_tokenizer(folder / "speech_tokenizer_v1.onnx")
    return folder


def test_speech_tokens_at_25_hz_from_the_onnx_tokenizer(tokenizer_dir):
    from echat.synth.speech_tokens import CosyVoiceSpeechTokens

    stage = CosyVoiceSpeechTokens(model=str(tokenizer_dir))  # CosyVoice-300M's folder layout
    wave = speech.say(SAID)
    (out,) = run_stage(stage, {"id": "t1", "_reply_waveform": wave})
    tokens = out["reply_speech_tokens"]
    assert len(tokens) == wave.size // 640 == pytest.approx(wave.size / SAMPLE_RATE * 25, abs=1)
    assert all(isinstance(t, int) and 0 <= t < 4096 for t in tokens) and len(set(tokens)) > 5
    assert out["speech_tokenizer_model"] == f"cosyvoice-onnx:{tokenizer_dir.name}/speech_tokenizer_v1.onnx"
    long = np.concatenate([wave] * int(np.ceil(32 * SAMPLE_RATE / wave.size)))  # over CosyVoice's 30 s limit
    assert len(stage.tokenize(long)) == pytest.approx(long.size / 640, abs=2)
    (no_audio,) = run_stage(stage, {"id": "t2"})
    assert "reply_speech_tokens" not in no_audio


def test_speech_tokens_features_are_whispers_log_mel():
    from transformers import WhisperFeatureExtractor

    from echat.synth.speech_tokens import whisper_log_mel

    wave = speech.say("Hello there.")
    ours = whisper_log_mel(wave)
    theirs = WhisperFeatureExtractor(feature_size=128)._np_extract_fbank_features(wave[None], device="cpu")[0]
    assert ours.shape == theirs.shape == (128, wave.size // 160)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_speech_tokens_out_of_range_and_bad_paths_are_named(tmp_path):
    from echat.pipelines.profile import ProfileError, load_profile
    from echat.synth.speech_tokens import CosyVoiceSpeechTokens

    wide = tiny_tokenizer(tmp_path / "wide.onnx", offset=4000)  # codes up to 4000 + 63 * 64
    (out,) = run_stage(CosyVoiceSpeechTokens(model=str(wide)), {"id": "w", "source_uri": "a", "_reply_waveform": speech.say("Hi.")})
    assert isinstance(out, Reject) and out.reason == "speech_tokens_out_of_range"
    with pytest.raises(ValueError, match="holds no speech_tokenizer_v1.onnx"):
        CosyVoiceSpeechTokens(model=str(tmp_path))  # a folder, but not a model folder
    profile = tmp_path / "p.yaml"
    text = (Path(load_profile.__globals__["configs_dir"]()) / "local.yaml").read_text()
    profile.write_text(text.replace("dedup:", "  - {slot: speech_tokens, backend: cosyvoice-onnx, params: {model: /no/such.onnx}}\n\ndedup:"))
    with pytest.raises(ProfileError, match=r"speech_tokens .*/no/such.onnx not found"):
        load_profile(str(profile))


# ---------------------------------------------------------------------------------------------
# the back-check


@pytest.fixture(scope="module")
def back_check():
    from echat.synth.reply_check import ReplyBackCheck

    stage = ReplyBackCheck(asr_backend="pocketsphinx", max_error=0.8, check_query=True)
    stage.setup()
    return stage


def test_back_check_keeps_a_reply_that_says_its_text_and_rejects_one_that_does_not(back_check):
    # espeak-ng through pocketsphinx's general language model: WER 0.27 on this sentence as spoken,
    # 1.0 against the other (measured; matching replies of the template engine ran 0.3-0.9)
    said = speech.say(SAID, "en-us+f3")
    good, bad = run_stage(back_check, reply(SAID, _reply_waveform=said), reply(OTHER, _reply_waveform=said))
    assert not isinstance(good, Reject), good
    assert 0.0 <= good["reply_check_error"] <= 0.5 and good["reply_check_model"] == "pocketsphinx-5 en-us"
    assert isinstance(bad, Reject) and bad.reason == "reply_check_failed"
    assert bad.detail.startswith("WER 1.00 > max_error 0.8") and "northern mountains" in bad.detail


def test_back_check_flags_a_language_without_asr_and_checks_synthetic_queries(back_check):
    zh = {**reply("别担心，我在这里。", language="zh"), "_reply_waveform": speech.say(speech.PINYIN, "cmn-latn-pinyin+f4")}
    (out,) = run_stage(back_check, zh)
    assert out.get("reply_check_error") is None and "reply_check_no_asr:zh" in out["quality_flags"]
    said = speech.say(SAID, "en-us+f3")
    query = {"id": "q1", "source_uri": "q.wav", "source_kind": "synthetic", "language": "en", "_waveform": said}
    kept, dropped, real = run_stage(back_check, {**query, "transcript": SAID}, {**query, "id": "q2", "transcript": OTHER},
                                    {**query, "id": "q3", "transcript": OTHER, "source_kind": "real"})
    assert not isinstance(kept, Reject) and isinstance(dropped, Reject) and dropped.reason == "query_check_failed"
    assert not isinstance(real, Reject)  # real speech is not checked against its transcript
    assert back_check.usage()["queries_checked"] == 2


# ---------------------------------------------------------------------------------------------
# synthetic queries


def test_query_plans_allocate_shares_languages_and_voices():
    from echat.synth.query_plans import allocate, largest_remainder, load_plans

    spec = load_plans()
    queries = allocate(spec, 200, seed=0)
    assert len(queries) == 200 and allocate(spec, 200, seed=0) == queries  # deterministic
    kinds = {q["plan_kind"] for q in queries}
    assert kinds == {"single", "multi"}
    by_language = {lang: sum(q["language"] == lang for q in queries) for lang in ("en", "zh")}
    assert by_language["en"] == pytest.approx(120, abs=len(spec.plans())) and by_language["zh"] >= 60
    child = [q for q in queries if q["age"] == "child"]
    assert child and all(q["voice"].split("+")[1] in ("f5", "anika", "Annie") for q in child)
    assert {q["gender"] for q in queries if q["plan"] == "sad"} == {"male", "female"}  # open genders alternate
    assert largest_remainder(10, {"a": 1, "b": 1, "c": 1}) == {"a": 4, "b": 3, "c": 3}
    first_24 = {q["plan_kind"] for q in queries[:24]}
    assert first_24 == {"single", "multi"}  # plans are interleaved


def test_query_plan_file_errors_name_the_plan(tmp_path):
    from echat.synth.query_plans import load_plans

    text = Path(__file__).parents[1].joinpath("synth/query_plans.yaml").read_text()
    bad = tmp_path / "plans.yaml"
    bad.write_text(text.replace("{name: child, share: 6, cues: {age: child}}", "{name: child, share: 6, cues: {age: child, emotion: sad}}"))
    with pytest.raises(ValueError, match="single-label plan 'child' must set exactly one cue"):
        load_plans(bad)
    bad.write_text(text.replace("cues: {emotion: sad}}", "cues: {emotion: gloomy}}"))
    with pytest.raises(ValueError, match="gloomy"):
        load_plans(bad)


def test_synth_queries_corpus_builds_into_shards_scored_against_the_intent(tmp_path, tokenizer_dir):
    from echat.pipelines.build import build
    from echat.pipelines.profile import load_profile
    from echat.synth.queries import BUILD_OVERRIDES, make_queries

    corpus = tmp_path / "queries"
    cache = tmp_path / "cache"
    profile = load_profile("local", [f"cache_dir={cache}"])
    summary = make_queries(corpus, 20, profile=profile, seed=1)
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text("utf-8").splitlines()]
    assert len(rows) == summary["count"] == 20
    assert {r["plan_kind"] for r in rows} == {"single", "multi"} and {r["language"] for r in rows} == {"en", "zh"}
    assert all(r["source_kind"] == "synthetic" for r in rows) and any(r["events"] for r in rows)
    assert {r["age"] for r in rows} >= {"child", "old", "adult"}
    info = sf.info(str(corpus / rows[0]["path"]))
    assert info.samplerate == SAMPLE_RATE and info.channels == 1

    # the offline profile plus the speech tokens (the back-check is left out here: pocketsphinx runs
    # at ~5x real time, 19 s on these replies; the tests above run it under the same stage runner)
    text = (Path(load_profile.__globals__["configs_dir"]()) / "local.yaml").read_text()
    extra = f"  - {{slot: speech_tokens, backend: cosyvoice-onnx, params: {{model: {tokenizer_dir}}}}}\n\ndedup:"
    speech_profile = tmp_path / "speech.yaml"
    speech_profile.write_text(text.replace("dedup:", extra, 1))
    out = tmp_path / "build"
    built = build(load_profile(str(speech_profile), [f"cache_dir={cache}", *BUILD_OVERRIDES]),
                  str(corpus / "manifest.jsonl"), str(out), overwrite=True)
    assert built["reconciliation"]["ok"], built["reconciliation"]
    accuracy = built["label_accuracy"]
    assert accuracy["rows_with_reference"] == built["outputs"]["rows"] == 20
    assert {"gender", "age", "emotion", "events", "style"} <= set(accuracy)
    assert accuracy["gender"]["scored"] == 20 and accuracy["emotion"]["confusion"]

    import pyarrow.parquet as pq

    table = pq.read_table(sorted((out / "data").glob("*.parquet"))[0]).to_pylist()
    by_source = {r["source_uri"]: r for r in table}
    for row in rows:  # every event mixed in lies inside the segment VAD kept
        shard = by_source[row["path"]]
        for event in row["events_at"]:
            assert shard["segment_start"] <= event["start"] + 0.05 and event["end"] - 0.05 <= shard["segment_end"], (row, event)
    assert all(r["reply_speech_tokens"] and r["speech_tokenizer_model"].startswith("cosyvoice-onnx:") for r in table)


def test_synth_queries_text_from_an_llm_is_cached_and_retried(tmp_path):
    from llm_server import FakeChatServer

    from echat.pipelines.profile import load_profile
    from echat.synth.queries import make_queries

    plans = tmp_path / "plans.yaml"
    text = Path(__file__).parents[1].joinpath("synth/query_plans.yaml").read_text()
    plans.write_text(text.replace("languages: {en: 0.6, zh: 0.4}", "languages: {en: 1}"))
    profile = load_profile("local", [f"cache_dir={tmp_path / 'cache'}", "retry.backoff_s=0.01"])
    with FakeChatServer() as llm:
        # the first request of all is told to wait, then every request gets the same valid answer
        # (the fake server tells requests apart by a reply prompt's transcript line; these have none)
        answer = {"content": json.dumps({"text": "I finally fixed the old bicycle in my garage."})}
        llm.faults[""] = [{"status": 429, "retry_after": "0"}] + [answer] * 20
        settings = {"model": "query-writer", "base_url": llm.url}
        summary = make_queries(tmp_path / "q", 4, profile=profile, plan_file=str(plans), llm=settings)
        first = len(llm.requests)
        assert first == 5 and summary["text_sources"] == {"llm:query-writer": 4}
        assert summary["llm_usage"]["transient_errors"] == 1
        again = make_queries(tmp_path / "q", 4, profile=profile, plan_file=str(plans), llm=settings, overwrite=True)
        assert len(llm.requests) == first and again["llm_usage"]["cache_hits"] == 4  # the rerun paid nothing
        rows = [json.loads(line) for line in (tmp_path / "q" / "manifest.jsonl").read_text().splitlines()]
        assert {r["text"] for r in rows} == {"I finally fixed the old bicycle in my garage."}
        # an answer in the wrong language is asked again, then the query takes a bank line
        llm.reset()
        llm.always[""] = {"content": json.dumps({"text": "这是中文。"})}
        fallback = make_queries(tmp_path / "q2", 2, profile=profile, plan_file=str(plans), llm={**settings, "model": "other"})
        assert fallback["text_sources"] == {"bank": 2} and fallback["llm_rejects"][0]["reason"] == "llm_wrong_language"


def test_synth_queries_spoken_by_the_profiles_speech_endpoint(tmp_path, speech_server):
    from echat.pipelines.profile import load_profile
    from echat.synth.queries import make_queries

    profile = load_profile("local", [f"cache_dir={tmp_path / 'cache'}", "tts.backend=openai",
                                     f"tts.params={{model: tts-x, base_url: '{speech_server.url}', voices: {{female: f-voice, male: m-voice}}}}"])
    summary = make_queries(tmp_path / "q", 6, profile=profile, tts="profile", seed=2)
    rows = [json.loads(line) for line in (tmp_path / "q" / "manifest.jsonl").read_text().splitlines()]
    assert summary["count"] == 6 and len(speech_server.requests) >= 6
    by_text = {r["input"]: r for r in speech_server.requests}
    for row in rows:
        sent = next(r for text, r in by_text.items() if text in row["text"] or row["text"].startswith(text))
        assert sent["voice"] == {"female": "f-voice", "male": "m-voice"}[row["gender"]]
        assert row["tts"] == f"openai-compatible:tts-x {sent['voice']}"
        assert {"child": "young child", "old": "elderly", "adult": "adult"}[row["age"]] in sent["instructions"]


def test_synth_queries_command_line(tmp_path, capsys):
    from echat.cli import main

    out = tmp_path / "q"
    assert main(["synth-queries", "--n", "3", "--output", str(out), "--set", f"cache_dir={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 3 synthetic queries" in printed and "vad.params.pad_s=1.5" in printed
    assert json.loads((out / "synth_summary.json").read_text())["count"] == 3
    assert main(["synth-queries", "--n", "3", "--output", str(out)]) == 2  # no overwrite without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["synth-queries", "--n", "3", "--output", str(tmp_path / "r"), "--plan", str(tmp_path / "none.yaml")]) == 2


def test_synth_queries_take_events_from_a_bank_of_real_clips(tmp_path):
    from echat.pipelines.profile import load_profile
    from echat.synth.queries import make_queries

    text = Path(__file__).parents[1].joinpath("synth/query_plans.yaml").read_text()
    plans = tmp_path / "plans.yaml"
    start = text.index("single:")
    end = text.index("# espeak-ng voices")
    plans.write_text(text[:start] + "single:\n  - {name: crying, share: 1, cues: {events: [cry]}}\n\n" + text[end:])
    profile = load_profile("local", [f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(ValueError, match=r"no sound for event\(s\) \['cry'\].*--event-bank"):
        make_queries(tmp_path / "q", 2, profile=profile, plan_file=str(plans))
    bank = tmp_path / "bank" / "cry"
    bank.mkdir(parents=True)
    t = np.arange(int(0.6 * 44_100)) / 44_100
    sf.write(str(bank / "sob.wav"), 0.5 * np.sin(2 * np.pi * 440 * t) * np.hanning(t.size), 44_100)  # any rate
    summary = make_queries(tmp_path / "q", 2, profile=profile, plan_file=str(plans), event_bank=str(tmp_path / "bank"))
    rows = [json.loads(line) for line in (tmp_path / "q" / "manifest.jsonl").read_text().splitlines()]
    assert summary["events"] == {"cry": 2} and all(r["events"] == ["cry"] for r in rows)
    assert all(e["sound"] == "bank" and 0.5 < e["end"] - e["start"] < 0.65 for r in rows for e in r["events_at"])
