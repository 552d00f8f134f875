"""`echat export osum-raw|wenet-shards`: the exports read back as OSUM-EChat's own code reads them.

The reader below is this test's own, written to OSUM's documented rules (ASLP-lab/OSUM OSUM-EChat/
wenet/dataset/process/processor.py `parse_raw`, `tar_file_and_group_full_data`, `tokenize`;
processor_tag_think.py; common_utils/fake_data/): every entry the export writes must pass it, and
the entry counts must match what the shards support (schemas/tasks.py).
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from echat.cli import main
from echat.schemas import record as rec
from echat.schemas import tasks as task_table

# --- OSUM's vocabulary, as their processor.py spells it -------------------------------------------
THEIR_TASKS = {
    "<TRANSCRIBE>", "<TRANSCRIBE> <ALIGN>", "<CAPTION>", "<EMOTION>", "<STYLE>", "<GENDER>", "<AGE>",
    "<TRANSCRIBE> <AGE> <GENDER>", "<TRANSCRIBE> <EMOTION>", "<S2TCHAT>", "<S2TCHAT> <THINKER>",
    "<S2TCHAT> <TEXT2TOKEN>", "<S2TCHAT> <TEXT2TOKEN> <THINK>", "<TEXT2TOKEN>", "<TEXT2TEXT>",
}
SPEECH_TOKEN_TASKS = {"<S2TCHAT> <TEXT2TOKEN>", "<S2TCHAT> <TEXT2TOKEN> <THINK>", "<TEXT2TOKEN>"}
THINK_TASKS = {"<S2TCHAT> <THINKER>", "<S2TCHAT> <TEXT2TOKEN> <THINK>"}
CHAT_TASKS = {"<S2TCHAT> <THINKER>", "<S2TCHAT> <TEXT2TOKEN> <THINK>", "<S2TCHAT>", "<S2TCHAT> <TEXT2TOKEN>"}
NEW_ANSWER_EMOTION_TAGS = {"<愉悦>", "<抱歉>", "<开心>", "<愤怒>", "<惊讶>", "<厌恶>", "<悲伤>", "<害怕>", "<哭腔>", "<安慰鼓励>", "<中立>"}
AGE_TAGS, GENDER_TAGS = {"<CHILD>", "<ADULT>", "<OLD>"}, {"<MALE>", "<FEMALE>"}
STYLE_NAMES = {"新闻科普", "恐怖故事", "童话故事", "客服", "诗歌散文", "有声书", "日常口语", "其他"}
EMOTION_TAGS = {f"<{e.upper()}>" for e in ("sad", "anger", "neutral", "happy", "surprise", "fear", "disgust", "other")}
SELF_NAMES = re.compile(r"MOSS|QWEN|ChatGPT|chatgpt|ChatBot|chatbot|Helper|helper|AI Agent|AI agent|语言模型")


def check_wav(data: bytes, where: str) -> float:
    info = sf.info(io.BytesIO(data))
    assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV"), f"{where}: {info}"
    return info.frames / info.samplerate


def their_target(task: str, txt: str, extra: dict) -> str:
    """The training target their tokenize builds (processor.py; the natural-language reasoning model)."""
    assert not SELF_NAMES.search(txt), f"their if_have_other_name drops {txt!r}"
    m = re.match(r"^<([^<>]+)>(.*)$", txt)  # process_tagged_string_and_delete_tag_from_txt
    body = m.group(2).lstrip() if m else txt
    if task in THINK_TASKS:
        assert extra.get("think_str"), f"{task} needs extra.think_str"
        body = f"<think>{extra['think_str']}<think end>{body}"
    if "question" in extra:
        assert extra["question"].strip(), "their tokenize skips an empty question"
    if task in SPEECH_TOKEN_TASKS:
        tokens = extra.get("speech_token")
        assert isinstance(tokens, list) and tokens and all(isinstance(t, int) and 0 <= t < 4096 for t in tokens), task
    return body


def their_tag_think(task: str, txt: str, extra: dict) -> str:
    """The tag-form target processor_tag_think.py builds from extra (no random placeholders here)."""
    if task not in CHAT_TASKS:
        return txt
    m = re.match(r"^<([^<>]+)>", txt)
    assert m and f"<{m.group(1)}>" in NEW_ANSWER_EMOTION_TAGS, f"reply must start with a tag-think reply emotion: {txt[:30]!r}"
    if task not in THINK_TASKS:
        return txt
    q_txt = extra.get("q_txt", extra.get("question"))
    assert q_txt, "the tag-think loader needs q_txt or question"
    for key, allowed in (("age", AGE_TAGS), ("gender", GENDER_TAGS), ("q_emotion", EMOTION_TAGS)):
        if key in extra:
            assert extra[key] in allowed, (key, extra[key])
    if "caption" in extra:
        assert re.fullmatch(r"(<[A-Z_]+>)+", extra["caption"]), extra["caption"]
    think = (f"<think>用户说的话是:{q_txt},年龄为:{extra.get('age', '<&&>')},性别为:{extra.get('gender', '<&&>')},"
             f"情感为:{extra.get('q_emotion', '<&&>')},声音事件为:{extra.get('caption', '<&&>')},推测使用的回复情感为:{m.group(0)},"
             "我应该综合用户的语义和副语言信息给出专业且对应的回答<think end>")
    return think + txt


def check_label_target(task: str, txt: str) -> None:
    tags = re.findall(r"<([^<>]+)>", txt)
    if task == "<EMOTION>":
        assert len(tags) == 1 and f"<{tags[0]}>" in EMOTION_TAGS, txt
    elif task == "<GENDER>":
        assert f"<{tags[0]}>" in GENDER_TAGS, txt
    elif task == "<AGE>":
        assert f"<{tags[0]}>" in AGE_TAGS, txt
    elif task == "<STYLE>":
        assert tags[0] in STYLE_NAMES, txt  # processor.py maps styles onto its Chinese names
    elif task == "<CAPTION>":
        assert tags and all(re.fullmatch(r"[A-Z_]+", t) for t in tags), txt
    elif task == "<TRANSCRIBE> <EMOTION>":
        assert txt.endswith(f"<{tags[-1]}>") and f"<{tags[-1]}>" in EMOTION_TAGS and len(txt) > len(tags[-1]) + 2, txt


def read_raw(dest: Path) -> list[dict]:
    """parse_raw + tokenize's rules over DEST/data.list; returns the entries."""
    entries = []
    for line in (dest / "data.list").read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        assert {"key", "wav", "txt", "task", "extra"} <= obj.keys()
        assert "." not in obj["key"] and obj["task"] in THEIR_TASKS, obj["key"]
        wav = Path(obj["wav"])
        assert wav.is_absolute() and wav.exists(), obj["wav"]
        check_wav(wav.read_bytes(), obj["wav"])
        extra = obj["extra"]
        assert isinstance(extra, dict) and extra.get("dataset")
        if "a_wav_path" in extra:
            check_wav(Path(extra["a_wav_path"]).read_bytes(), extra["a_wav_path"])
        their_target(obj["task"], obj["txt"], extra)
        their_tag_think(obj["task"], obj["txt"], extra)
        check_label_target(obj["task"], obj["txt"])
        entries.append(obj)
    return entries


def read_tars(dest: Path) -> list[dict]:
    """tar_file_and_group_full_data's grouping (consecutive members by prefix, postfix after the
    last dot) + tokenize's rules, over every tar shards_list.txt names."""
    shards = [Path(p) for p in (dest / "shards_list.txt").read_text().split()]
    assert shards and all(p.is_absolute() and p.exists() for p in shards)
    entries = []
    for shard in shards:
        groups: list[tuple[str, dict]] = []
        with tarfile.open(shard, "r:*") as tar:
            for info in tar:
                prefix, postfix = info.name[: info.name.rfind(".")], info.name[info.name.rfind(".") + 1:]
                data = tar.extractfile(info).read()
                if not groups or groups[-1][0] != prefix:
                    assert prefix not in {g[0] for g in groups}, f"{prefix}: members not contiguous"
                    groups.append((prefix, {}))
                groups[-1][1][postfix] = data
        for key, m in groups:
            assert {"txt", "wav", "task", "lang", "speaker", "emotion", "gender", "duration", "extra"} <= m.keys(), key
            task, txt = m["task"].decode(), m["txt"].decode()
            extra = json.loads(m["extra"])
            assert task in THEIR_TASKS
            seconds = check_wav(m["wav"], key)
            assert abs(float(m["duration"]) - seconds) < 0.01
            assert m["gender"].decode() in GENDER_TAGS | {"none"} and m["emotion"].decode() in EMOTION_TAGS | {"none"}
            assert "duration" not in extra  # their converter keeps duration in its own member
            turns = sorted(int(p.split("_")[1]) for p in m if re.fullmatch(r"wav_\d+", p))
            assert turns == sorted(int(p.split("_")[1]) for p in m if re.fullmatch(r"txt_\d+", p)) == list(range(1, len(turns) + 1))
            for n in turns:
                check_wav(m[f"wav_{n}"], f"{key}.wav_{n}")
                assert m[f"txt_{n}"].decode().strip()
            if turns:
                assert task == "<S2TCHAT> <TEXT2TOKEN>"  # their tokenize turns it into ... <HISTORY>
            their_target(task, txt, extra)
            their_tag_think(task, txt, extra)
            check_label_target(task, txt)
            entries.append({"key": key, "task": task, "history": len(turns), "extra": extra})
    return entries


# --- a build with speech tokens and multi-turn rows -----------------------------------------------


@pytest.fixture(scope="module")
def rich_build(demo_build, tmp_path_factory) -> Path:
    """The demo build with reply speech tokens on 12 rows, 3 of them multi-turn (<HISTORY>)."""
    src = demo_build[0]
    out = tmp_path_factory.mktemp("rich-build")
    (out / "data").mkdir()
    rng = random.Random(7)
    for path in sorted((src / "data").glob("*.parquet")):
        rows = pq.read_table(path).to_pylist()
        for i, row in enumerate(rows[:12]):
            row["reply_speech_tokens"] = [rng.randrange(4096) for _ in range(40)]
            row["speech_tokenizer_model"] = "test-tokens"
            if i < 3:
                user = "I had a long day." if row["language"] == "en" else "我今天很累。"
                row["history"] = [{"role": "user", "text": user}, {"role": "assistant", "text": "Tell me about it."}]
                row["task"] = task_table.record_task(row)
        pq.write_table(pa.Table.from_pylist(rows, schema=rec.arrow_schema()), out / "data" / path.name)
    shutil.copy(src / "summary.json", out / "summary.json")
    return out


def expected_counts(out: Path, raw: bool) -> Counter:
    """Entries per OSUM task the shards should give, by the export's documented rules."""
    expected = Counter()
    for path in sorted((out / "data").glob("*.parquet")):
        for row in pq.read_table(path).to_pylist():
            for tag in task_table.tasks_a_record_supports(row):
                spec = task_table.TASKS[tag]
                if spec.speaks and not row["reply_speech_tokens"]:
                    continue
                if tag == "<HISTORY>" and (raw or not row["reply_speech_tokens"]):
                    continue
                if row["history"] and spec.replies and tag not in ("<HISTORY>", "<TEXT2TOKEN>"):
                    continue
                expected[{"<S2TCHAT> <THINK>": "<S2TCHAT> <THINKER>", "<HISTORY>": "<S2TCHAT> <TEXT2TOKEN>"}.get(tag, tag)] += 1
    return expected


def test_osum_raw_export_reads_back(rich_build, tmp_path, capsys):
    dest = tmp_path / "raw"
    assert main(["export", "osum-raw", str(rich_build), str(dest)]) == 0
    printed = capsys.readouterr().out
    entries = read_raw(dest)
    assert Counter(e["task"] for e in entries) == expected_counts(rich_build, raw=True)
    rows = pq.read_table(rich_build / "data").num_rows
    assert len({e["extra"]["echat_id"] for e in entries}) == rows  # every row gave at least one entry
    assert len({e["key"] for e in entries}) == len(entries)
    speaking = [e for e in entries if e["task"] == "<S2TCHAT> <TEXT2TOKEN> <THINK>"]
    assert speaking and all("a_wav_path" in e["extra"] and e["extra"]["question"] for e in speaking)
    assert "<S2TCHAT> <THINKER>" in printed and "multi-turn rows go to wenet-shards" in printed
    # dialogue entries carry what the tag-form loader builds its reasoning from
    think = next(e for e in entries if e["task"] == "<S2TCHAT> <THINKER>")
    assert {"q_txt", "q_emotion", "caption", "think_str", "question"} <= think["extra"].keys()
    assert not think["extra"]["think_str"].startswith("<think>")
    # understanding tasks carry no question (their tokenize would take it as the prompt)
    assert all("question" not in e["extra"] for e in entries if e["task"] in {"<TRANSCRIBE>", "<EMOTION>", "<GENDER>"})
    summary = json.loads((dest / "export.json").read_text())
    assert summary["entries"] == len(entries) and summary["rows"] == rows


def test_wenet_shards_export_reads_back(rich_build, tmp_path):
    dest = tmp_path / "shards"
    assert main(["export", "wenet-shards", str(rich_build), str(dest), "--per-shard", "100"]) == 0
    entries = read_tars(dest)
    assert Counter(e["task"] for e in entries) == expected_counts(rich_build, raw=False)
    assert len(list(dest.glob("shards_*.tar"))) == -(-len(entries) // 100)  # about --per-shard entries each
    history = [e for e in entries if e["history"]]
    assert len(history) == 3 and all(e["history"] == 1 and e["extra"]["speech_token"] for e in history)
    # both exports write the same single-turn entries
    raw = tmp_path / "raw"
    main(["export", "osum-raw", str(rich_build), str(raw)])
    raw_keys = {json.loads(line)["key"] for line in (raw / "data.list").read_text().splitlines()}
    assert raw_keys == {e["key"] for e in entries if not e["history"]}


def test_export_rejects_unknown_task(demo_build, tmp_path, capsys):
    assert main(["export", "osum-raw", str(demo_build[0]), str(tmp_path / "x"), "--tasks", "<NOPE>"]) == 2
    assert "<NOPE>" in capsys.readouterr().err
