"""OSUM's own formats in the model's loader: WeNet tar shards, shard lists and raw lists give the
same records, the fields OSUM's loader gives them (task renames, history, the leading reply tag)."""

from __future__ import annotations

import io
import os
import logging

import fsspec
import numpy as np
import pytest
import soundfile as sf

import osum_support as osum
from echat.model.batch import IGNORE_INDEX
from echat.model.data import build_dataloader
from echat.model.data_sources import AUDIO_MISSING, OSUM_RAW, WENET_TAR, DataSourceError, plan_units, read_unit, resolve_files
from echat.model.features import decode_audio
from echat.schemas import osum_format
from echat.schemas import tasks as task_table


def _records(files, min_units: int = 1) -> dict[str, dict]:
    units = plan_units(resolve_files(files), min_units=min_units)
    return {r["id"]: r for u in units for r in read_unit(u)}


def _without_audio(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "_audio"}


@pytest.fixture()
def corpus(tmp_path):
    """Raw list, one tar shard per half and a shard list over them, of the same entries."""
    items = osum.entries(tmp_path)
    raw = osum.write_raw_list(tmp_path, items)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "shards_000000000.tar").write_bytes(osum.shard_bytes(items[:3], tmp_path))
    (shards / "shards_000000001.tar").write_bytes(osum.shard_bytes(items[3:], tmp_path))
    listing = shards / "shards_list.txt"
    listing.write_text("shards_000000000.tar\n\n-|shards_000000001.tar\n", encoding="utf-8")
    return {"folder": tmp_path, "items": items, "raw": raw, "list": listing, "tars": sorted(shards.glob("*.tar"))}


def test_tar_samples_map_onto_record_fields_as_osum_reads_them(corpus):
    recs = _records([str(p) for p in corpus["tars"]])
    assert sorted(recs) == sorted(i["key"] for i in corpus["items"])
    s2s = recs["s2s_think"]
    assert s2s["task"] == "<S2TCHAT> <TEXT2TOKEN> <THINK>"
    # the leading reply tag is stripped into reply_emotion; a newline is a space
    assert (s2s["reply_text"], s2s["reply_emotion"]) == ("Take it easy, rest a little.", "WORRIED")
    assert (s2s["transcript"], s2s["think_text"], s2s["reply_speech_tokens"]) == ("I feel so tired", "She sounds tired.", [5, 6, 7])
    assert (s2s["gender"], s2s["age"], s2s["language"], s2s["speaker"], s2s["source_dataset"]) == ("female", "adult", "en", "spk1", "demo")
    legacy = recs["legacy_s2s"]  # <Speech2TEXTandTOKEN> is their <S2TCHAT> <TEXT2TOKEN>
    assert (legacy["task"], legacy["reply_text"], legacy["reply_emotion"]) == ("<S2TCHAT> <TEXT2TOKEN>", "I am sorry to hear that.", "SAD")
    assert (legacy["age"], legacy["emotion"], legacy["reply_speech_tokens"]) == ("old", "sad", [1, 2])
    tts = recs["tts"]  # bare TEXT2TOKEN: text to speak and its tokens
    assert (tts["task"], tts["reply_text"], tts["reply_speech_tokens"], tts["transcript"]) == ("<TEXT2TOKEN>", "Hello there.", [9, 9, 9], None)
    multi = recs["multi"]  # <S2TCHAT> <TEXT2TOKEN> with history members is their ... <HISTORY>
    assert multi["task"] == "<HISTORY>" and multi["reply_emotion"] == "HAPPY" and multi["reply_text"] == "Glad it helped."
    assert multi["history"] == [{"role": "user", "text": None}, {"role": "assistant", "text": "Have you tried a walk?"}]
    asr = recs["asr"]  # `none` members are missing values; the label tag after the transcript is the label
    assert (asr["task"], asr["transcript"], asr["emotion"], asr["language"], asr["gender"]) == (
        "<TRANSCRIBE> <EMOTION>", "good morning", "happy", None, None)
    assert "reply_text" not in asr and "speaker" not in asr
    thinker = recs["thinker"]
    assert (thinker["task"], thinker["reply_text"], thinker["reply_emotion"], thinker["events"]) == (
        "<S2TCHAT> <THINK>", "Let us see.", "NEUTRAL", ["cough"])
    # the audio is the tar member's bytes, the user's speech of that entry
    for item in corpus["items"]:
        rec = recs[item["key"]]
        assert rec["_audio"].data is not None and rec["_num_samples"] == 8000
        want, _ = sf.read(corpus["folder"] / item["wav"], dtype="float32")
        np.testing.assert_allclose(decode_audio(rec["_audio"]), want, atol=1e-4)


def test_a_raw_list_and_a_shard_list_of_the_same_entries_give_the_same_records(corpus):
    from_tars = _records([str(corpus["list"])])
    from_raw = _records([str(corpus["raw"])])
    assert sorted(from_tars) == sorted(from_raw) and len(from_raw) == 6
    for item in corpus["items"]:
        key = item["key"]
        rec = from_raw[key]
        assert _without_audio(rec) == _without_audio(from_tars[key]), key
        assert rec["_audio"].path == str(corpus["folder"] / item["wav"])  # relative to the list's folder
        np.testing.assert_array_equal(decode_audio(rec["_audio"]), decode_audio(from_tars[key]["_audio"]))


def test_a_shard_list_resolves_to_its_tars_one_unit_each(corpus):
    files = resolve_files([str(corpus["list"]), str(corpus["raw"])])
    assert files == [(str(p), WENET_TAR) for p in corpus["tars"]] + [(str(corpus["raw"]), OSUM_RAW)]
    units = plan_units(files[:2])
    assert [(u.path, u.index) for u in units] == [(str(p), 0) for p in corpus["tars"]]
    # more workers than tars: each tar is read by every part, each keeping its own samples
    parts = plan_units(files[:2], min_units=4)
    assert len(parts) == 4
    keys = [r["id"] for u in parts for r in read_unit(u)]
    assert sorted(keys) == sorted(i["key"] for i in corpus["items"])


def test_osum_data_trains_with_their_targets(corpus):
    from echat.model.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    tasks = {"<TRANSCRIBE>": 1.0, "<S2TCHAT> <TEXT2TOKEN>": 1.0, "<S2TCHAT> <THINK>": 1.0, "<TEXT2TOKEN>": 1.0, "<HISTORY>": 1.0}
    loader = build_dataloader([str(corpus["list"])], tokenizer, tasks=tasks, max_frames_per_batch=2000,
                              shuffle_buffer=2, seed=0, epochs=1)
    targets = {}
    for batch in loader:
        for i, (key, task) in enumerate(zip(batch.keys, batch.tasks)):
            targets[(key, task)] = tokenizer.decode(batch.input_ids[i][batch.labels[i] != IGNORE_INDEX])
    # each record gives the tasks its fields support (a dialogue's question is its transcript)
    assert set(targets) == {
        ("s2s_think", "<TRANSCRIBE>"), ("s2s_think", "<S2TCHAT> <TEXT2TOKEN>"), ("s2s_think", "<S2TCHAT> <THINK>"),
        ("s2s_think", "<TEXT2TOKEN>"),
        ("legacy_s2s", "<TRANSCRIBE>"), ("legacy_s2s", "<S2TCHAT> <TEXT2TOKEN>"), ("legacy_s2s", "<TEXT2TOKEN>"),
        ("tts", "<S2TCHAT> <TEXT2TOKEN>"), ("tts", "<TEXT2TOKEN>"),
        ("multi", "<TRANSCRIBE>"), ("multi", "<S2TCHAT> <TEXT2TOKEN>"), ("multi", "<TEXT2TOKEN>"), ("multi", "<HISTORY>"),
        ("asr", "<TRANSCRIBE>"),
        ("thinker", "<TRANSCRIBE>"), ("thinker", "<S2TCHAT> <THINK>"),
    }
    assert targets[("asr", "<TRANSCRIBE>")].startswith("good morning")
    assert targets[("legacy_s2s", "<S2TCHAT> <TEXT2TOKEN>")].startswith("I am sorry to hear that.")  # no <SAD> in the target
    assert targets[("thinker", "<S2TCHAT> <THINK>")].startswith("<think>A calm voice.<think end>Let us see.")
    assert targets[("multi", "<HISTORY>")].startswith("Glad it helped.")


def test_the_real_osum_fake_data_shard_loads(tmp_path):
    data = osum.real_fake_data("shard/shards_000000000.tar")
    if data is None:
        pytest.skip(f"the OSUM mirror is not at {osum.OSUM_MIRROR}")
    tar = tmp_path / "shards_000000000.tar"
    tar.write_bytes(data)
    (tmp_path / "shards_list.txt").write_text(f"{tar}\n")
    recs = _records([str(tmp_path / "shards_list.txt")])
    assert len(recs) == 10 and sorted(recs) == sorted(f"1023390_bed51684_{i}" for i in range(1, 11))
    rec = recs["1023390_bed51684_1"]
    assert rec["task"] == "<S2TCHAT> <TEXT2TOKEN> <THINK>" and rec["source_dataset"] == "KeSpeech"
    assert (rec["gender"], rec["age"], rec["language"]) == ("female", "adult", None)  # `.lang` is `none`
    assert rec["transcript"] == "解惑答疑请加入孙建发专家服务系统" and rec["reply_text"].startswith("你好呀姐妹")
    assert rec["think_text"].startswith("语音里能听出是一位成年女性") and len(rec["reply_speech_tokens"]) > 100
    info = sf.info(io.BytesIO(rec["_audio"].data))
    assert info.samplerate == 16000 and rec["_num_samples"] == info.frames > 16000
    # their own raw list (its wav path relative to their repository root, here the list's folder)
    # names the same entries: the same records; the shard holds its audio resampled to 16 kHz
    (tmp_path / "data.list").write_bytes(osum.real_fake_data("raw/data.list"))
    wav = tmp_path / "common_utils/fake_data/raw/wav/random.wav"
    wav.parent.mkdir(parents=True)
    wav.write_bytes(osum.real_fake_data("raw/wav/random.wav"))
    from_raw = _records([str(tmp_path / "data.list")])
    assert sorted(from_raw) == sorted(recs)
    for key, r in from_raw.items():
        assert os.path.samefile(r["_audio"].path, wav)
        assert abs(r["_num_samples"] - recs[key]["_num_samples"]) <= 16  # the same speech, resampled
        assert _without_audio(r) | {"_num_samples": 0} == _without_audio(recs[key]) | {"_num_samples": 0}, key


def test_lists_and_shards_on_an_fsspec_url_load(corpus):
    fs = fsspec.filesystem("memory")
    for tar in corpus["tars"]:
        fs.pipe(f"/osum/shards/{tar.name}", tar.read_bytes())
    fs.pipe("/osum/shards/shards_list.txt", corpus["list"].read_bytes())
    try:
        files = resolve_files(["memory://osum/shards/shards_list.txt"])
        assert [p for p, _ in files] == [f"memory://osum/shards/{t.name}" for t in corpus["tars"]]
        from_memory = _records(["memory://osum/shards/shards_list.txt"])
        # a raw list by file:// URL, its audio relative to the list's folder
        from_file_url = _records([f"file://{corpus['raw']}"])
    finally:
        fs.rm("/osum", recursive=True)
    local = _records([str(corpus["list"])])
    assert {k: _without_audio(r) for k, r in from_memory.items()} == {k: _without_audio(r) for k, r in local.items()}
    assert {k: _without_audio(r) for k, r in from_file_url.items()} == {k: _without_audio(r) for k, r in local.items()}
    assert all(r["_num_samples"] == 8000 for r in from_file_url.values())


def test_damaged_shards_and_samples_are_skipped_with_a_reason(corpus, tmp_path, caplog):
    items = corpus["items"]
    whole = osum.shard_bytes(items, corpus["folder"], drop_wav={"tts"})
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) * 2 // 3])  # cut short in the middle of a member
    caplog.set_level(logging.WARNING)
    recs = _records([str(cut)])
    assert 2 <= len(recs) < len(items) and "corrupt or cut-short tar" in caplog.text
    assert recs["tts"]["_audio"] is None and recs["tts"]["_audio_issue"] == AUDIO_MISSING
    assert recs["tts"]["reply_text"] == "Hello there."  # its text-only tasks still use it
    bad_extra = tmp_path / "bad.tar"
    bad_extra.write_bytes(osum.shard_bytes(items[:2], corpus["folder"], extra_text={"s2s_think": b"{not json"}))
    assert list(_records([str(bad_extra)])) == ["legacy_s2s"] and "extra is not JSON" in caplog.text


def test_list_kind_is_told_by_the_first_line_with_clear_errors(tmp_path):
    assert osum_format.list_kind('{"key": 1}') == osum_format.RAW_LIST
    assert osum_format.list_kind("-|/data/shards_000.tar") == osum_format.SHARD_LIST
    for text, message in (("hello\n", "neither a JSON object"), ("a.tar\nx.json|b.tar\n", "combined shard lists")):
        path = tmp_path / "bad.list"
        path.write_text(text)
        with pytest.raises(DataSourceError, match=message):
            resolve_files([str(path)])
    (tmp_path / "gone.txt").write_text("missing.tar\n")
    with pytest.raises(DataSourceError, match="names missing.tar, which does not exist"):
        resolve_files([str(tmp_path / "gone.txt")])
    with pytest.raises(DataSourceError, match="no such file"):
        resolve_files(["memory://nowhere/list.txt"])


def test_osum_task_names_are_ours():
    assert osum_format.our_task("TEXT2TOKEN") == "<TEXT2TOKEN>"
    assert osum_format.our_task("<Speech2TEXTandTOKEN>") == "<S2TCHAT> <TEXT2TOKEN>"
    assert osum_format.our_task("<S2TCHAT><TEXT2TOKEN><EMOTION>") == "<S2TCHAT> <TEXT2TOKEN>"
    assert osum_format.our_task("<S2TCHAT> <TEXT2TOKEN>", has_history=True) == "<HISTORY>"
    assert osum_format.our_task("<S2TCHAT> <THINKER>") == "<S2TCHAT> <THINK>"
    assert osum_format.our_task(None) == "<TRANSCRIBE>"
    assert task_table.task("<Speech2TEXTandTOKEN>").tag == "<S2TCHAT> <TEXT2TOKEN>"  # a plain rename is the table's alias
    sample = osum_format.OsumSample(key="k", txt="so tired<开始回答><悲伤>Rest now.", task="<TRANSCRIBE> <S2TCHAT>")
    rec = osum_format.record_fields(sample)
    assert (rec["task"], rec["transcript"], rec["reply_text"], rec["reply_emotion"]) == ("<S2TCHAT>", "so tired", "Rest now.", "SAD")
    assert osum_format.split_reply_tag("<think>x<think end>y") == (None, "<think>x<think end>y")
    assert osum_format.split_reply_tag("<WHISPER>hi") == (None, "hi")  # stripped as they do, names no reply emotion
