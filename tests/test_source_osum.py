"""The pipeline's OSUM readers: raw-list lines and WeNet tar shards -> starting records or Rejects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

import osum_support as osum
from echat.labelers.decode import AUDIO_BYTES_KEY, SOURCE_PATH_KEY, DecodeAudio
from echat.pipelines.source_osum import raw_list_records, shard_records
from echat.pipelines.source_rows import REFERENCE_KEY, SourceContext
from echat.schemas.audio import load_audio
from echat.schemas.record import LABEL_GROUPS
from echat.schemas.stage import Reject


@pytest.fixture()
def corpus(tmp_path):
    items = osum.entries(tmp_path)
    (tmp_path / "shards").mkdir()
    tar = tmp_path / "shards" / "shards_000000000.tar"
    tar.write_bytes(osum.shard_bytes(items, tmp_path))
    return {"root": tmp_path, "items": items, "tar": tar}


def _ctx(root, trusted=frozenset(LABEL_GROUPS)) -> SourceContext:
    return SourceContext(root=str(root), dataset_name="osum-demo", license="cc-by-4.0", trust_manifest=trusted)


def _by_key(outputs, prefix: str) -> dict[str, dict]:
    return {r["source_uri"][len(prefix):]: r for r in outputs if not isinstance(r, Reject)}


def test_raw_list_lines_become_records_with_the_users_turn(corpus):
    ctx = _ctx(corpus["root"])
    out = {item["key"]: list(raw_list_records(json.dumps(item, ensure_ascii=False), f"data.list:{n}", ctx))
           for n, item in enumerate(corpus["items"], start=1)}
    assert all(len(v) == 1 and not isinstance(v[0], Reject) for v in out.values())
    rec = out["s2s_think"][0]
    assert rec["source_uri"] == "wav/a.wav" and rec[SOURCE_PATH_KEY] == str(corpus["root"] / "wav" / "a.wav")
    assert (rec["source_dataset"], rec["license"], rec["source_kind"]) == ("osum-demo", "cc-by-4.0", "real")
    # the user's words are extra.question; labels normalised, trusted as the profile says
    assert (rec["transcript"], rec["transcript_origin"], rec["gender"], rec["age"], rec["language"], rec["speaker"]) == (
        "I feel so tired", "manifest", "female", "adult", "en", "spk1")
    assert "reply_text" not in rec and "think_text" not in rec and "reply_speech_tokens" not in rec
    legacy = out["legacy_s2s"][0]
    assert (legacy["age"], legacy["emotion"], legacy["transcript"]) == ("old", "sad", "my cat is ill")
    asr = out["asr"][0]  # an understanding task: txt without its label tag is the transcript
    assert (asr["transcript"], asr["emotion"]) == ("good morning", "happy") and "gender" not in asr
    assert out["thinker"][0]["events"] == ["cough"]
    assert "transcript" not in out["tts"][0]  # a TTS row's text is what to speak, not what was said
    # untrusted labels go to the reference, not the record
    (plain,) = raw_list_records(json.dumps(corpus["items"][0]), "data.list:1", _ctx(corpus["root"], frozenset()))
    assert "gender" not in plain and plain[REFERENCE_KEY]["gender"] == "female" and plain[REFERENCE_KEY]["transcript"] == "I feel so tired"


def test_bad_raw_list_lines_are_rejects(corpus):
    ctx = _ctx(corpus["root"])
    assert list(raw_list_records("   \n", "data.list:9", ctx)) == []
    (bad,) = raw_list_records("{not json", "data.list:2", ctx)
    assert (bad.stage, bad.reason, bad.source_uri) == ("source", "osum_row_invalid", "data.list:2") and "not JSON" in bad.detail
    (nowav,) = raw_list_records(json.dumps({"key": "k", "txt": "hi"}), "data.list:3", ctx)
    assert nowav.reason == "osum_row_invalid" and "lacks wav" in nowav.detail
    item = corpus["items"][0]
    (teen,) = raw_list_records(json.dumps({**item, "extra": {**item["extra"], "age": "<TEEN>"}}), "data.list:4", ctx)
    assert teen.reason == "invalid_label" and "age '<TEEN>'" in teen.detail and teen.source_uri == "wav/a.wav"
    (span,) = raw_list_records(json.dumps({**item, "start": 0.1, "end": 0.4}), "data.list:5", ctx)
    assert span.reason == "osum_span_unsupported" and "s2s_think" in span.detail
    (unknown,) = raw_list_records(json.dumps({**item, "gender": "<NONE>", "extra": {"age": "<&&>", "gender": "none"}}), "data.list:6", ctx)
    assert not isinstance(unknown, Reject) and "age" not in unknown and "gender" not in unknown  # unknown, not wrong


def test_shard_samples_become_records_with_inline_audio(corpus):
    ctx = _ctx(corpus["root"])
    out = list(shard_records(str(corpus["tar"]), ctx))
    recs = _by_key(out, "shards/shards_000000000.tar/")
    assert len(out) == len(recs) == 6 and sorted(recs) == sorted(i["key"] for i in corpus["items"])
    for item in corpus["items"]:
        rec = recs[item["key"]]
        assert rec["source_uri"] == f"shards/shards_000000000.tar/{item['key']}" and SOURCE_PATH_KEY not in rec
        want, _ = sf.read(corpus["root"] / item["wav"], dtype="float32")
        np.testing.assert_allclose(load_audio(rec[AUDIO_BYTES_KEY], target_sample_rate=16000).waveform, want, atol=1e-4)
    # the decode stage reads the bytes (the tar member name is no file)
    (decoded,) = DecodeAudio().process(dict(recs["asr"]))
    assert decoded["_waveform"].shape == (8000,) and AUDIO_BYTES_KEY not in decoded
    # the same labels as the raw list's line: `none` members are unknown
    (from_raw,) = raw_list_records(json.dumps(corpus["items"][4]), "data.list:5", ctx)
    labels_of = lambda r: {k: r.get(k) for k in ("transcript", "emotion", "gender", "age", "language", "speaker")}  # noqa: E731
    assert labels_of(recs["asr"]) == labels_of(from_raw) == {
        "transcript": "good morning", "emotion": "happy", "gender": None, "age": None, "language": None, "speaker": None}
    assert labels_of(recs["s2s_think"])["gender"] == "female"
    # a tar outside the input root is named by its folder's hash, never by this machine's path
    outside = list(shard_records(str(corpus["tar"]), _ctx(corpus["root"] / "wav")))
    assert all(r["source_uri"].startswith("external/") and r["source_uri"].endswith("/shards_000000000.tar/" + k)
               for r, k in zip(outside, [i["key"] for i in corpus["items"]]))


def test_damaged_shards_and_samples_are_rejects_not_errors(corpus, tmp_path):
    ctx = _ctx(tmp_path)
    items = corpus["items"]
    tar = tmp_path / "bad.tar"
    tar.write_bytes(osum.shard_bytes(items[:3], corpus["root"], drop_wav={"legacy_s2s"},
                                     extra_text={"tts": b"{not json"}))
    first, nowav, badextra = shard_records(str(tar), ctx)
    assert not isinstance(first, Reject) and first["source_uri"] == "bad.tar/s2s_think"
    assert (nowav.reason, nowav.source_uri) == ("missing_audio", "bad.tar/legacy_s2s") and "no audio member" in nowav.detail
    assert (badextra.reason, badextra.source_uri) == ("osum_sample_invalid", "bad.tar/tts") and "extra is not JSON" in badextra.detail
    whole = osum.shard_bytes(items, corpus["root"])
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) // 2])
    out = list(shard_records(str(cut), ctx))
    assert isinstance(out[-1], Reject) and out[-1].reason == "shard_unreadable" and out[-1].source_uri == "cut.tar"
    assert "cut-short" in out[-1].detail and 1 <= len(out) - 1 < len(items)
    assert all(not isinstance(r, Reject) for r in out[:-1])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"this is no tar archive" * 50)
    (not_tar,) = shard_records(str(junk), ctx)
    assert not_tar.reason == "shard_unreadable" and "not a readable tar" in not_tar.detail
    (missing,) = shard_records(str(tmp_path / "gone.tar"), ctx)
    assert missing.reason == "shard_unreadable" and missing.source_uri == "gone.tar" and "cannot open" in missing.detail
