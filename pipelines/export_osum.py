"""`echat export osum-raw|wenet-shards OUT DEST`: a build in the formats OSUM-EChat's own code reads.

What their code expects (ASLP-lab/OSUM, OSUM-EChat/ at f2bcfac; DESIGN.md "What OSUM's own code
does"): `wenet/dataset/process/processor.py` (`parse_raw`, `tar_file_and_group_full_data`,
`tokenize`), `processor_tag_think.py` and `common_utils/fake_data/`.

- osum-raw: DEST/data.list, one JSON object per line: `key`, `txt`, `wav`, `task`, `lang` (and
  `speaker`, `emotion`, `gender`, read by their raw-to-shard script), `extra` with `dataset`,
  `duration`, `age`/`gender` (`<ADULT>`, `<FEMALE>`), and per task `question` (the user's words;
  their `tokenize` uses it as the prompt, so only dialogue tasks carry it), `think_str`, `q_txt`,
  `q_emotion`, `caption` (what the tag-form loader builds its reasoning from), `speech_token` and
  `a_wav_path` (the reply's speech). Audio beside it in DEST/wav/ as 16 kHz 16-bit WAV.
- wenet-shards: DEST/shards_NNNNNNNNN.tar of about 1,000 entries each (`--per-shard`), members per
  key `.txt .wav .task .lang .speaker .emotion .gender .duration .extra` (real values, `none` when
  unknown; `.extra` without `duration`, as their converter writes it), plus `.txt_N`/`.wav_N` for
  each earlier turn of a multi-turn row; DEST/shards_list.txt names one tar per line (their
  `do_format_shard_manifest4one` turns it into the `-|path` lines `url_opener` reads).

One entry per training task a row supports (schemas/tasks.py), under OSUM's task names:
`<S2TCHAT> <THINK>` is theirs `<S2TCHAT> <THINKER>`; a multi-turn row (`<HISTORY>`) is their
`<S2TCHAT> <TEXT2TOKEN>` with history members (their `tokenize` makes it `... <HISTORY>`). Dialogue
replies start with the reply-emotion tag from their tag-think set (`<安慰鼓励>...`), which
processor.py strips and processor_tag_think.py reads. A task their loader would drop is not
written, and the export summary says why: a speech-output task without `reply_speech_tokens`
(their `tokenize` skips an empty `speech_token`), tag-form reasoning without the user's words,
a reply naming an assistant their self-introduction filter drops, dialogue tasks of a multi-turn
row other than `<HISTORY>` (the reply answers the earlier turns), and multi-turn rows in the raw
list (their `parse_raw` reads no history). Earlier user turns have text only in our records; the
shard export speaks them with espeak-ng (`--history-speech espeak`, the offline TTS) for `.wav_N`.

Both exports stream the parquet shards batch by batch (pyarrow `iter_batches`).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from echat.schemas import labels, vocab
from echat.schemas import tasks as task_table
from echat.schemas.reasoning import split_think
from echat.schemas.text import has_cjk

log = logging.getLogger(__name__)

OSUM_RAW, WENET_SHARDS = "osum-raw", "wenet-shards"
RAW_LIST = "data.list"
SHARD_LIST = "shards_list.txt"
SHARD_NAME = "shards_{:09d}.tar"
WAV_DIR = "wav"
PER_SHARD = 1000
NONE = "none"  # their converter's value for an unknown member
SAMPLE_RATE = 16_000

# Our task tags that OSUM names differently.
OSUM_TASK = {"<S2TCHAT> <THINK>": "<S2TCHAT> <THINKER>", "<HISTORY>": "<S2TCHAT> <TEXT2TOKEN>"}
# Their tag-think reply-emotion set (processor_tag_think.py `new_answer_emotion_tags`), for ours.
REPLY_EMOTION_TAG = {
    "ANGER": "<愤怒>", "FEAR": "<害怕>", "HAPPY": "<开心>", "SURPRISE": "<惊讶>", "SAD": "<悲伤>", "DISGUST": "<厌恶>",
    "SORRY": "<抱歉>", "EMBARRASSED": "<抱歉>", "WORRIED": "<安慰鼓励>", "CURIOUS": "<愉悦>",
    "CONFUSED": "<中立>", "SARCASM": "<中立>", "SHY": "<中立>", "NEUTRAL": "<中立>",
}
NEUTRAL_TAG = "<中立>"
# Their style names (Chinese; processor.py maps its finer styles onto these), from the one alias table.
STYLE_TAG = {canonical: f"<{name}>" for name, canonical in labels.ALIASES["style"].items() if has_cjk(name)}
# Names processor.py's `if_have_other_name` filter drops a sample for (its `self_list`, case-sensitive).
SELF_NAMES = (
    "MOSS", "QWEN", "Qwen助手", "小智机器人", "小智助手", "VirtualAssistant", "virtual assistant", "Helper", "helper",
    "ChatBot", "chat bot", "chatbot", "Chat Bot", "AI Agent", "AI agent", "ChatGPT", "chatgpt", "小刚AI", "阿强Bot",
    "李娜AI", "赵敏Bot", "小智Bot", "AI小智", "大型语言模型", "语言模型",
)
_SELF_NAME = re.compile("|".join(re.escape(n) for n in SELF_NAMES))


COLUMNS = ["id", "source_dataset", "audio", "duration", "language", "transcript", "words", "speaker",
           "gender", "gender_score", "age", "age_score", "emotion", "emotion_score", "events", "events_score",
           "style", "style_score", "think_tags", "think_text", "reply_emotion", "reply_text", "reply_audio",
           "reply_speech_tokens", "task", "history"]


@dataclass
class Entry:
    """One OSUM training sample: a key, its task, its target text and what else their loader reads."""

    key: str
    task: str  # OSUM's task tag
    txt: str
    audio: str  # which audio is the sample's `wav`: "audio" (the user's) or "reply_audio"
    extra: dict[str, Any]
    lang: str | None = None
    speaker: str | None = None
    emotion: str | None = None  # `<SAD>`
    gender: str | None = None  # `<FEMALE>`
    duration: float | None = None
    history: list[tuple[str, str]] = field(default_factory=list)  # (user's words, assistant's reply) per earlier turn
    ours: str = ""  # our task tag


def slug(tag: str) -> str:
    """`<S2TCHAT> <TEXT2TOKEN> <THINK>` -> `s2tchat_text2token_think` (no dots: their reader splits keys at the last one)."""
    return "_".join(w.strip("<>").lower() for w in tag.split())


def label_tag(value: str | None) -> str | None:
    return vocab.osum_label(value) if value else None


def caption_tag(events: list[str] | None) -> str | None:
    """`<COUGH><LAUGH>`; `<NONE>` when nothing was heard (`[]`); None when unknown."""
    if events is None:
        return None
    return "".join(f"<{e.upper()}>" for e in events) if events else "<NONE>"


def label_text(label: str, value: Any) -> str:
    """A label as OSUM's targets write it: `<SAD>`, `<ADULT>`, `<COUGH><LAUGH>`, styles by their Chinese names."""
    if label == "events":
        return caption_tag(value) or ""
    if label == "style":
        return STYLE_TAG.get(value, "")
    return label_tag(value) or ""


def reply_with_emotion(reply: str, reply_emotion: str | None) -> str:
    return f"{REPLY_EMOTION_TAG.get(reply_emotion or '', NEUTRAL_TAG)}{reply.strip()}"


def align_text(words: list[dict[str, Any]], language: str | None) -> str:
    """`<start>word<end>` per word to 0.1 s (model/samples.py `align_text`, which the model reads back)."""
    joiner = "" if language == "zh" else " "
    return joiner.join(f"<{float(w['start']):.1f}>{str(w['word']).strip()}<{float(w['end']):.1f}>" for w in words)


def history_pairs(history: list[dict[str, Any]] | None) -> list[tuple[str, str]] | None:
    """Earlier turns as (user, assistant) pairs, oldest first; None when they do not pair up."""
    turns = [(t.get("role"), (t.get("text") or "").strip()) for t in history or []]
    if len(turns) % 2 or any(r != ("user" if i % 2 == 0 else "assistant") or not text for i, (r, text) in enumerate(turns)):
        return None
    return [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]


def _label_ok(row: dict[str, Any], label: str, min_score: float) -> bool:
    score = row.get(f"{label}_score")
    return score is None or score >= min_score


def entries_of(row: dict[str, Any], *, fmt: str, min_label_score: float = 0.0, tasks: set[str] | None = None,
               skipped: Counter | None = None) -> list[Entry]:
    """The OSUM entries of one row (a dict of the shard's columns), one per task it supports.

    `skipped` counts, per reason, the supported tasks not written (their loader would drop them).
    """
    skipped = skipped if skipped is not None else Counter()
    supported = task_table.tasks_a_record_supports(row)
    if tasks is not None:
        supported = [t for t in supported if t in tasks]
    rid = row["id"]
    lang = row.get("language")
    transcript = (row.get("transcript") or "").strip()
    base_extra: dict[str, Any] = {"dataset": row.get("source_dataset") or NONE}
    for label in ("age", "gender"):
        if row.get(label):
            base_extra[label] = label_tag(row[label])
    multi_turn = task_table.filled(row.get("history"))
    pairs = history_pairs(row.get("history")) if multi_turn else []
    out: list[Entry] = []
    for tag in supported:
        spec = task_table.TASKS[tag]

        def skip(reason: str) -> None:
            skipped[f"{tag}: {reason}"] += 1

        if spec.speaks and not row.get("reply_speech_tokens"):
            skip("no reply_speech_tokens (OSUM's tokenize drops a speech target without speech tokens)")
            continue
        if tag == "<HISTORY>":
            if fmt == OSUM_RAW:
                skip("multi-turn rows go to wenet-shards (OSUM's parse_raw reads no history)")
                continue
            if pairs is None:
                skip("history is not user/assistant pairs")
                continue
            if not row.get("reply_speech_tokens"):
                skip("no reply_speech_tokens (OSUM's only multi-turn task speaks)")
                continue
        elif multi_turn and spec.replies and spec.output != task_table.SPEECH:  # TTS of the reply needs no context
            skip("the row is multi-turn: its reply answers earlier turns (exported as <HISTORY>)")
            continue
        if spec.labels and not all(_label_ok(row, label, min_label_score) for label in spec.labels):
            skip(f"label score below --min-label-score {min_label_score:g}")
            continue
        extra = dict(base_extra)
        audio = "reply_audio" if tag == "<TEXT2TOKEN>" else "audio"  # TTS: the speech of its text
        reply = (row.get("reply_text") or "").strip()
        if spec.replies:
            if spec.input == task_table.SPEECH_INPUT:
                txt = reply_with_emotion(reply, row.get("reply_emotion"))
            else:
                txt = reply
            if transcript:
                extra["question"] = transcript
                extra["q_txt"] = transcript
            if row.get("emotion"):
                extra["q_emotion"] = label_tag(row["emotion"])
            if caption_tag(row.get("events")) is not None:
                extra["caption"] = caption_tag(row.get("events"))
            if spec.reasons:
                if not transcript:
                    skip("reasoning needs the user's words (their tag-form loader reads extra.q_txt)")
                    continue
                body, _ = split_think(row.get("think_text") or "")
                if not body:
                    skip("no natural-language reasoning (think_text) for extra.think_str")
                    continue
                extra["think_str"] = body
        elif tag == "<TEXT2TOKEN>":
            txt = reply
        elif spec.aligns:
            txt = align_text(row.get("words") or [], lang)
        else:
            txt = (transcript if spec.transcribes else "") + "".join(label_text(label, row.get(label)) for label in spec.labels)
        if spec.speaks or tag == "<HISTORY>":
            extra["speech_token"] = [int(t) for t in row["reply_speech_tokens"]]
        if _SELF_NAME.search(txt):
            skip("the text names an assistant (OSUM's self-introduction filter drops it)")
            continue
        extra["echat_id"] = rid
        out.append(Entry(
            key=f"{rid}__{slug(tag)}", task=OSUM_TASK.get(tag, tag), txt=txt, audio=audio, extra=extra, lang=lang,
            speaker=row.get("speaker"), emotion=label_tag(row.get("emotion")), gender=label_tag(row.get("gender")),
            duration=row.get("duration") if audio == "audio" else None,
            history=pairs if tag == "<HISTORY>" else [], ours=tag,
        ))
    return out


# ---------------------------------------------------------------------------------------------
# audio


def wav_bytes(flac: bytes) -> tuple[bytes, float]:
    """16 kHz mono 16-bit PCM WAV of encoded audio, and its duration in seconds."""
    import soundfile as sf

    from echat.schemas.audio import load_audio

    decoded = load_audio(flac, target_sample_rate=SAMPLE_RATE)
    buf = io.BytesIO()
    sf.write(buf, decoded.waveform, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue(), len(decoded.waveform) / SAMPLE_RATE


def waveform_wav(waveform) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, waveform, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return buf.getvalue()


class HistorySpeech:
    """Speech for earlier user turns (our records keep their text only): espeak-ng, the offline TTS."""

    def __init__(self, mode: str):
        self.mode = mode
        self.tts = None

    def speak(self, text: str, language: str | None) -> bytes:
        if self.tts is None:
            from echat.synth.espeak_tts import EspeakTTS

            self.tts = EspeakTTS(variant="m3")
            self.tts.setup()
        return waveform_wav(self.tts.speak(text, language if language in ("en", "zh") else ("zh" if has_cjk(text) else "en"), None))


# ---------------------------------------------------------------------------------------------
# writers


def _iter_rows(out: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    files = sorted((out / "data").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out}: no shards under data/ (expected the --output folder of `echat build`)")
    for path in files:
        pf = pq.ParquetFile(path)
        columns = [c for c in COLUMNS if c in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


@dataclass
class ExportSummary:
    format: str
    rows: int = 0
    entries: Counter = field(default_factory=Counter)  # our task tag -> entries written
    skipped: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "rows": self.rows, "entries": sum(self.entries.values()),
                "entries_by_task": dict(self.entries.most_common()), "osum_task": {t: OSUM_TASK.get(t, t) for t in self.entries},
                "skipped": dict(self.skipped.most_common()), "files": self.files}


def export_osum_raw(out: str | os.PathLike, dest: str | os.PathLike, *, min_label_score: float = 0.0,
                    tasks: set[str] | None = None) -> ExportSummary:
    out, dest = Path(out), Path(dest)
    wav_dir = dest / WAV_DIR
    wav_dir.mkdir(parents=True, exist_ok=True)
    summary = ExportSummary(OSUM_RAW)
    list_path = dest / RAW_LIST
    with open(list_path, "w", encoding="utf-8") as fh:
        for row in _iter_rows(out):
            summary.rows += 1
            entries = entries_of(row, fmt=OSUM_RAW, min_label_score=min_label_score, tasks=tasks, skipped=summary.skipped)
            if not entries:
                continue
            paths = {}
            need = {e.audio for e in entries} | ({"reply_audio"} if any(_wants(e) for e in entries) else set())
            for column, suffix in (("audio", ""), ("reply_audio", "-reply")):
                data = (row.get(column) or {}).get("bytes")
                if column in need and data:
                    path = (wav_dir / f"{row['id']}{suffix}.wav").resolve()
                    path.write_bytes(wav_bytes(data)[0])
                    paths[column] = str(path)
            for e in entries:
                if e.audio not in paths:
                    summary.skipped[f"{e.ours}: no {e.audio} for the wav"] += 1
                    continue
                extra = dict(e.extra)
                if e.duration is not None:
                    extra["duration"] = round(float(e.duration), 3)
                if "reply_audio" in paths and "a_wav_path" in _wants(e):
                    extra["a_wav_path"] = paths["reply_audio"]
                obj = {"key": e.key, "txt": e.txt, "wav": paths[e.audio], "task": e.task}
                for name in ("lang", "speaker", "emotion", "gender"):
                    if getattr(e, name):
                        obj[name] = getattr(e, name)
                obj["extra"] = extra
                fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
                summary.entries[e.ours] += 1
    summary.files = [RAW_LIST, f"{WAV_DIR}/"]
    (dest / "export.json").write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def _wants(entry: Entry) -> set[str]:
    """The extra fields beyond `extra` an entry takes: the reply's speech path for spoken dialogue that speaks."""
    spec = task_table.TASKS[entry.ours]
    return {"a_wav_path"} if spec.replies and spec.input == task_table.SPEECH_INPUT and (spec.speaks or spec.history) else set()


class _TarShards:
    """Writes entries into tars of `per_shard` entries, their members in OSUM's naming."""

    def __init__(self, dest: Path, per_shard: int):
        self.dest, self.per_shard = dest, per_shard
        self.paths: list[Path] = []
        self.tar: tarfile.TarFile | None = None
        self.count = 0

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, e: Entry, wav: bytes, history_wavs: list[bytes]) -> None:
        if self.tar is None or self.count >= self.per_shard:
            self.close()
            path = self.dest / SHARD_NAME.format(len(self.paths))
            self.paths.append(path)
            self.tar = tarfile.open(path, "w")
            self.count = 0
        extra = {k: v for k, v in e.extra.items() if k != "duration"}
        members = [
            ("txt", e.txt), ("wav", wav), ("task", e.task), ("lang", e.lang or NONE), ("speaker", e.speaker or NONE),
            ("emotion", e.emotion or NONE), ("gender", e.gender or NONE),
            ("duration", f"{e.duration:.3f}" if e.duration is not None else NONE),
            ("extra", json.dumps(extra, ensure_ascii=False)),
        ]
        for n, ((_user, assistant), hwav) in enumerate(zip(e.history, history_wavs), start=1):
            members += [(f"txt_{n}", assistant), (f"wav_{n}", hwav)]
        for suffix, data in members:
            self._add(f"{e.key}.{suffix}", data if isinstance(data, bytes) else str(data).encode("utf-8"))
        self.count += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def export_wenet_shards(out: str | os.PathLike, dest: str | os.PathLike, *, per_shard: int = PER_SHARD,
                        min_label_score: float = 0.0, tasks: set[str] | None = None,
                        history_speech: str = "espeak") -> ExportSummary:
    out, dest = Path(out), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("shards_*.tar"):
        old.unlink()
    summary = ExportSummary(WENET_SHARDS)
    writer = _TarShards(dest, per_shard)
    speech = HistorySpeech(history_speech)
    try:
        for row in _iter_rows(out):
            summary.rows += 1
            entries = entries_of(row, fmt=WENET_SHARDS, min_label_score=min_label_score, tasks=tasks, skipped=summary.skipped)
            if history_speech == "skip":
                for e in [e for e in entries if e.history]:
                    summary.skipped[f"{e.ours}: --history-speech skip"] += 1
                entries = [e for e in entries if not e.history]
            if not entries:
                continue
            wavs = {}
            for column in {e.audio for e in entries}:
                data = (row.get(column) or {}).get("bytes")
                if data:
                    wavs[column] = wav_bytes(data)
            for e in entries:
                if e.audio not in wavs:
                    summary.skipped[f"{e.ours}: no {e.audio} for the wav"] += 1
                    continue
                wav, seconds = wavs[e.audio]
                history_wavs = [speech.speak(user, e.lang) for user, _ in e.history]
                if e.duration is None:
                    e.duration = seconds
                writer.write(e, wav, history_wavs)
                summary.entries[e.ours] += 1
    finally:
        writer.close()
    with open(dest / SHARD_LIST, "w", encoding="utf-8") as fh:
        for path in writer.paths:
            fh.write(str(path.resolve()) + "\n")
    summary.files = [SHARD_LIST, *(p.name for p in writer.paths)]
    (dest / "export.json").write_text(json.dumps(summary.to_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("format", choices=[OSUM_RAW, WENET_SHARDS],
                        help="osum-raw: data.list (jsonl) + wav/; wenet-shards: tar shards + shards_list.txt")
    parser.add_argument("out", help="a build folder (the --output of `echat build`)")
    parser.add_argument("dest", help="folder to write the export into")
    parser.add_argument("--per-shard", type=int, default=PER_SHARD, help=f"entries per tar (wenet-shards; default {PER_SHARD})")
    parser.add_argument("--min-label-score", type=float, default=0.0,
                        help="a label task is written only when its labels' scores reach this (default 0: all)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated task tags of schemas/tasks.py to export (default: every task a row supports)")
    parser.add_argument("--history-speech", choices=["espeak", "skip"], default="espeak",
                        help="earlier user turns of multi-turn rows: speak them with espeak-ng, or skip those rows")


def run(args: argparse.Namespace) -> int:
    tasks = None
    if args.tasks:
        tasks = {task_table.normalize(t) for t in args.tasks.split(",") if t.strip()}
        unknown = sorted(t for t in tasks if t not in task_table.TASKS)
        if unknown:
            print(f"echat export: unknown task(s) {', '.join(unknown)}; known: {', '.join(task_table.TASKS)}", file=sys.stderr)
            return 2
    try:
        if args.format == OSUM_RAW:
            summary = export_osum_raw(args.out, args.dest, min_label_score=args.min_label_score, tasks=tasks)
        else:
            summary = export_wenet_shards(args.out, args.dest, per_shard=args.per_shard, min_label_score=args.min_label_score,
                                          tasks=tasks, history_speech=args.history_speech)
    except FileNotFoundError as exc:
        print(f"echat export: {exc}", file=sys.stderr)
        return 2
    print(f"echat export {summary.format}: {summary.rows} rows -> {sum(summary.entries.values())} entries in {args.dest}")
    for tag, n in summary.entries.most_common():
        print(f"  {n:>7}  {OSUM_TASK.get(tag, tag)}" + (f"  (ours: {tag})" if tag in OSUM_TASK else ""))
    for reason, n in summary.skipped.most_common():
        print(f"  skipped {n:>5}  {reason}")
    return 0
