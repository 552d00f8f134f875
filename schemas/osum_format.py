"""OSUM-EChat's own data formats, read as their loader reads them: raw lists, WeNet tar shards, shard lists.

Defined once, torch-free and Beam-free, for the two readers that meet over it: the model's training
loader (model/data_sources.py) and the corpus pipeline's sources (pipelines/source_osum.py). The
rules are those of ASLP-lab/OSUM `OSUM-EChat/wenet/dataset/process/processor.py` (`parse_raw`,
`tar_file_and_group_full_data`, `tokenize`) and `common_utils/fake_data/` (DESIGN.md "What OSUM's
own code does"):

- Raw list: one JSON object per line with `key`, `wav`, `txt` (their `parse_raw` requires all
  three), `task`, optional `lang`, `speaker`, `emotion`, `gender`, `start`/`end` (a span of the
  wav, seconds) and `extra` (a dict, or a JSON string of one). Earlier turns of a dialogue are
  `txt_N`/`wav_N` keys (what their raw-to-shard script turns into history members).
- Tar shard: the members of one utterance are consecutive and share the name up to the last `.`
  (the key); the suffix says what a member is: `txt`, `task`, `lang`, `speaker`, `emotion`,
  `gender`, `duration`, `extra` (JSON), an audio suffix (`wav`, `flac`...) for the user's speech,
  `txt_N`/`wav_N` for earlier turn N (1-based: the assistant's reply and the user's speech of that
  turn). Their shard writer stores an unknown value as `none`; it reads as missing here.
- Shard list: one tar per line; `-|path` (the form their `url_opener` reads, with no combine file)
  is accepted too. `combine|path` lines (their combined format) are not.

What their `tokenize` does with a sample, and so `record_fields` here:
- task names: `TEXT2TOKEN` is `<TEXT2TOKEN>`; `<Speech2TEXTandTOKEN>` and `<S2TCHAT> <TEXT2TOKEN>
  <EMOTION>` are `<S2TCHAT> <TEXT2TOKEN>`, which becomes the multi-turn task when the sample has
  history (`<S2TCHAT> <TEXT2TOKEN> <HISTORY>`, our `<HISTORY>`); `<S2TCHAT> <THINKER>` is our
  `<S2TCHAT> <THINK>`; `<TRANSCRIBE> <S2TCHAT>` holds `transcript<开始回答>reply`.
- `txt` is the reply for the dialogue and TTS tasks, with `extra.question` (or the tag-form's
  `extra.q_txt`) the user's words; for understanding tasks `txt` is the transcript with label tags
  after it, the tags alone, or the timestamped transcript of `<TRANSCRIBE> <ALIGN>`.
- A reply's leading tag (`<安慰鼓励>`, `<SAD>`) is stripped from the text (`process_tagged_string_
  and_delete_tag_from_txt`); here it becomes `reply_emotion` when it names one. Their code strips
  a leading tag from every task's text; only replies are stripped here, since a label task's
  answer (`<SAD>`) or an aligned transcript (`<0.0>so<0.3>`) starts with a tag that is the target.
- Newlines in `txt` are spaces; `extra.think_str` is the natural-language reasoning;
  `extra.speech_token` the reply's speech tokens.
"""

from __future__ import annotations

import json
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

from echat.schemas import labels, vocab
from echat.schemas import tasks as task_table

RAW_LIST, SHARD_LIST = "osum_raw_list", "osum_shard_list"
NONE = "none"  # their shard writer's value for an unknown member
AUDIO_SUFFIXES = frozenset({"flac", "mp3", "m4a", "ogg", "opus", "wav", "wma"})  # their AUDIO_FORMAT_SETS
TEXT_MEMBERS = ("txt", "task", "lang", "speaker", "emotion", "gender", "duration")
ANSWER_MARK = "<开始回答>"  # `<TRANSCRIBE> <S2TCHAT>`: transcript, this mark, then the reply
# Values that say "unknown": their writer's `none`, their tokenizer's `none_tags`, our placeholder.
_UNKNOWN_VALUES = frozenset({"", "none", "null", "<none>", "<null>", vocab.UNKNOWN_PLACEHOLDER.lower()})

# OSUM task names that only their format has; their plain renames of our tasks (`<S2TCHAT>
# <THINKER>`, `<Speech2TEXTandTOKEN>`...) are schemas/tasks.py ALIASES. A bare `TEXT2TOKEN` is no
# tag string at all; `<TRANSCRIBE> <S2TCHAT>` holds the transcript and the reply in one `txt`.
OSUM_TASK_NAMES: dict[str, str] = {
    "TEXT2TOKEN": "<TEXT2TOKEN>",
    "<TRANSCRIBE> <S2TCHAT>": "<S2TCHAT>",
}
# Their tag-form reply emotions (processor_tag_think.py), as ours. Several of ours share one of
# theirs on export (pipelines/export_osum.py); reading back takes the closest single meaning.
REPLY_EMOTION_TAGS: dict[str, str] = {
    "愉悦": "HAPPY", "开心": "HAPPY", "抱歉": "SORRY", "愤怒": "ANGER", "惊讶": "SURPRISE", "厌恶": "DISGUST",
    "悲伤": "SAD", "哭腔": "SAD", "害怕": "FEAR", "安慰鼓励": "WORRIED", "中立": "NEUTRAL",
}

_LEADING_TAG = re.compile(r"^\s*<([^<>]+)>(.*)$", re.S)
_TRAILING_TAGS = re.compile(r"^(.*?)((?:\s*<[^<>]+>)*)\s*$", re.S)
_TAG = re.compile(r"<([^<>]+)>")
_ALIGNED_WORD = re.compile(r"<(\d+(?:\.\d+)?)>([^<>]+?)<(\d+(?:\.\d+)?)>")
_HISTORY_MEMBER = re.compile(r"^(txt|wav)_(\d+)$")
# Tag words that make a task a dialogue or TTS task: `txt` is then the reply.
_REPLY_WORDS = frozenset({"<S2TCHAT>", "<TEXT2TOKEN>", "<TEXT2TEXT>", "<HISTORY>"})


class OsumFormatError(ValueError):
    """Input that is not in OSUM's format; the message names the thing and what is wrong."""


@dataclass
class HistoryTurn:
    """Earlier turn N of a dialogue: the assistant's reply and the user's speech (bytes or a path)."""

    txt: str | None = None
    wav: bytes | None = None
    wav_path: str | None = None


@dataclass
class OsumSample:
    """One utterance as OSUM stores it, before mapping onto our record.

    From a tar `wav` holds the audio member's bytes; from a raw list `wav_path` the path as written
    (`start`/`end` a span of it). `problems` names members that could not be read (their loader
    drops such a sample).
    """

    key: str
    txt: str | None = None
    task: str | None = None
    lang: str | None = None
    speaker: str | None = None
    emotion: str | None = None
    gender: str | None = None
    duration: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    wav: bytes | None = None
    wav_path: str | None = None
    start: float | None = None
    end: float | None = None
    history: list[HistoryTurn] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def known(value: Any) -> Any:
    """`value`, or None when it is one of the forms OSUM writes for "unknown" (`none`, `<&&>`, empty)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        return None if text.casefold() in _UNKNOWN_VALUES else text
    return value


# ----------------------------------------------------------------------------- lists


def list_kind(first_line: str, where: str = "list") -> str:
    """RAW_LIST or SHARD_LIST from a list's first non-empty line: `{` starts a raw list, a path
    ending `.tar` (optionally `-|path`) a shard list. OsumFormatError naming `where` otherwise."""
    line = first_line.strip()
    if line.startswith("{"):
        return RAW_LIST
    if line and _shard_path(line) is not None:
        return SHARD_LIST
    raise OsumFormatError(
        f"{where}: not an OSUM list: its first line {line[:120]!r} is neither a JSON object (a raw list) "
        "nor a path ending .tar (a shard list)"
    )


def first_line(lines) -> str:
    """The first non-empty line of an iterable of lines ('' when there is none)."""
    for line in lines:
        if line.strip():
            return line
    return ""


def _shard_path(line: str) -> str | None:
    text = line.strip()
    if text.startswith("-|"):
        text = text[2:].strip()
    return text if text.endswith(".tar") and "|" not in text else None


def shard_list_paths(text: str, where: str = "shard list") -> list[str]:
    """The tars a shard list names, one per non-empty line, as written (relative ones unresolved).

    OsumFormatError naming the line for one that is not a tar path (a `combine|tar` line included).
    """
    paths = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        path = _shard_path(line)
        if path is None:
            why = "combined shard lists (`<jsonl>|<tar>`) are not read" if "|" in line else "not a path ending .tar"
            raise OsumFormatError(f"{where}:{number}: {line.strip()[:120]!r}: {why}")
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- raw lists


def parse_raw_line(line: str) -> OsumSample:
    """One raw-list line as a sample; OsumFormatError for a line that is not an OSUM raw entry."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise OsumFormatError(f"not JSON ({err})") from None
    return parse_raw_entry(obj)


def parse_raw_entry(obj: Any) -> OsumSample:
    """One parsed raw-list object as a sample (key, wav and txt are required, as their `parse_raw` asserts)."""
    if not isinstance(obj, dict):
        raise OsumFormatError(f"a raw-list entry must be a JSON object, not {type(obj).__name__}")
    missing = [k for k in ("key", "wav", "txt") if k not in obj]
    if missing:
        raise OsumFormatError(f"entry lacks {', '.join(missing)}")
    if not isinstance(obj["wav"], str) or not obj["wav"].strip():
        raise OsumFormatError(f"wav must be a path, not {obj['wav']!r}")
    sample = OsumSample(key=str(obj["key"]), wav_path=obj["wav"].strip())
    sample.txt = _text_value(obj.get("txt"))
    for name in ("task", "lang", "speaker", "emotion", "gender"):
        setattr(sample, name, known(_text_value(obj.get(name))))
    sample.extra = _extra(obj.get("extra"), sample.problems)
    sample.duration = _float(sample.extra.get("duration"))
    try:
        sample.start = float(obj["start"]) if obj.get("start") is not None else None
        sample.end = float(obj["end"]) if obj.get("end") is not None else None
    except (TypeError, ValueError):
        raise OsumFormatError(f"start/end must be seconds, not {obj.get('start')!r}/{obj.get('end')!r}") from None
    turns: dict[int, HistoryTurn] = {}
    for name, value in obj.items():
        m = _HISTORY_MEMBER.match(str(name))
        if m and isinstance(value, str):
            turn = turns.setdefault(int(m.group(2)), HistoryTurn())
            if m.group(1) == "txt":
                turn.txt = value.strip()
            else:
                turn.wav_path = value.strip()
    sample.history = _ordered_turns(turns, sample.problems)
    return sample


def _text_value(value: Any) -> str | None:
    return None if value is None else str(value)


def _extra(value: Any, problems: list[str]) -> dict[str, Any]:
    """`extra` as a dict: a JSON string is parsed; anything else that is not a dict is empty (as in
    their `tokenize`), and noted as a problem when it was meant to hold something."""
    if isinstance(value, dict):
        return value
    if isinstance(value, (str, bytes)):
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        if not text.strip() or known(text) is None:
            return {}
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(f"extra is not JSON ({err})")
            return {}
        if isinstance(parsed, dict):
            return parsed
        problems.append(f"extra is a JSON {type(parsed).__name__}, not an object")
    return {}


def _float(value: Any) -> float | None:
    try:
        return float(value) if known(value) is not None else None
    except (TypeError, ValueError):
        return None


def _ordered_turns(turns: dict[int, HistoryTurn], problems: list[str]) -> list[HistoryTurn]:
    if not turns:
        return []
    gaps = [n for n in range(1, max(turns) + 1) if n not in turns]
    if gaps:
        problems.append(f"history turn(s) {', '.join(map(str, gaps))} missing")
    return [turns.get(n, HistoryTurn()) for n in range(1, max(turns) + 1)]


# ----------------------------------------------------------------------------- tar shards


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes how the archive ended: tarfile stops quietly, as at a proper end, when a tar is cut
    short at or inside a member header; only the end-of-archive zero block is a proper end."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.osum_proper_end = True
            raise


def iter_shard(fileobj: IO[bytes], where: str = "tar") -> Iterator[OsumSample]:
    """The samples of one WeNet tar shard, read front to back from `fileobj` (never seeked, so a
    remote object is read once): consecutive members with the same key make one sample, as in
    their `tar_file_and_group_full_data`. A key whose members are not consecutive makes two samples.

    OsumFormatError naming `where` when the tar is corrupt or cut short; the samples before the
    damage have been yielded by then (the one it cuts is not).
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndAwareTarInfo)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise OsumFormatError(f"{where}: not a readable tar ({err})") from None
    tar.osum_proper_end = False
    current: OsumSample | None = None
    turns: dict[int, HistoryTurn] = {}
    with tar:
        try:
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name
                dot = name.rfind(".")
                if dot <= 0 or "/" in name[dot:]:
                    raise OsumFormatError(f"{where}: member {name!r} has no `key.suffix` name")
                key, suffix = name[:dot], name[dot + 1:]
                if current is not None and key != current.key:
                    yield _finish(current, turns)
                    current, turns = None, {}
                if current is None:
                    current = OsumSample(key=key)
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {name!r} holds {len(data)} of its {info.size} bytes")
                _add_member(current, turns, suffix, data)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise OsumFormatError(f"{where}: corrupt or cut-short tar ({type(err).__name__}: {err})") from None
        if not tar.osum_proper_end:
            raise OsumFormatError(f"{where}: corrupt or cut-short tar (it ends without the end-of-archive block)")
    if current is not None:
        yield _finish(current, turns)


def _finish(sample: OsumSample, turns: dict[int, HistoryTurn]) -> OsumSample:
    sample.history = _ordered_turns(turns, sample.problems)
    return sample


def _add_member(sample: OsumSample, turns: dict[int, HistoryTurn], suffix: str, data: bytes) -> None:
    if suffix in AUDIO_SUFFIXES:
        sample.wav = data
        return
    m = _HISTORY_MEMBER.match(suffix)
    if m and m.group(1) == "wav":
        turns.setdefault(int(m.group(2)), HistoryTurn()).wav = data
        return
    if suffix != "extra" and suffix not in TEXT_MEMBERS and not m:
        return  # a member their reader ignores too
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        sample.problems.append(f"member .{suffix} is not UTF-8 ({err})")
        return
    if m:
        turns.setdefault(int(m.group(2)), HistoryTurn()).txt = text.strip()
    elif suffix == "extra":
        sample.extra = _extra(text, sample.problems)
    elif suffix == "txt":
        sample.txt = text.strip()
    elif suffix == "duration":
        sample.duration = _float(text)
    else:
        setattr(sample, suffix, known(text))


# ----------------------------------------------------------------------------- onto our record


def our_task(osum_task: str | None, *, has_history: bool = False) -> str:
    """Our task tag for an OSUM task name (their renames included; `<TRANSCRIBE>` when none is
    given, as their `tokenize` defaults). A name neither of us knows is returned with its tags
    spaced one apart; ValueError for text that is not tags at all."""
    raw = (osum_task or "").strip() or "<TRANSCRIBE>"
    tag = task_table.normalize(OSUM_TASK_NAMES.get(raw) or OSUM_TASK_NAMES.get(_spaced(raw)) or raw)
    tag = task_table.ALIASES.get(tag, tag)
    if tag == "<S2TCHAT> <TEXT2TOKEN>" and has_history:
        return "<HISTORY>"
    return tag


def _spaced(text: str) -> str:
    return " ".join(text.replace(">", "> ").split())


def is_reply_task(osum_task: str | None) -> bool:
    """Whether `txt` is a reply (dialogue and TTS tasks) rather than a transcript or labels."""
    try:
        words = our_task(osum_task).split()
    except ValueError:
        return False
    return any(w in _REPLY_WORDS for w in words)


def split_reply_tag(text: str) -> tuple[str | None, str]:
    """(our reply emotion or None, the reply without its leading tag). Any leading tag is removed,
    as their loader does; only one that names a reply emotion gives a value."""
    m = _LEADING_TAG.match(text)
    if not m or m.group(1).strip().casefold() in ("think", "think end"):
        return None, text.strip()
    tag = m.group(1).strip()
    emotion = REPLY_EMOTION_TAGS.get(tag)
    if emotion is None:
        try:
            emotion = labels.normalise("reply_emotion", tag)
        except labels.LabelError:
            emotion = None
    return emotion, m.group(2).strip()


def parse_align_text(text: str) -> list[dict[str, Any]]:
    """Words of a `<start>word<end>` transcript (the inverse of model/samples.align_text)."""
    return [
        {"word": m.group(2).strip(), "start": float(m.group(1)), "end": float(m.group(3)), "score": None}
        for m in _ALIGNED_WORD.finditer(text)
    ]


def user_labels(sample: OsumSample) -> dict[str, Any]:
    """The user turn's words and labels as OSUM states them, values as written (OSUM's unknown
    forms dropped, not yet normalised): `text`, `language`, `speaker`, `gender`, `age`, `emotion`,
    `style` (strings) and `events` (a list). A label the task's answer names (`<TRANSCRIBE>
    <EMOTION>`: `text<SAD>`) wins over the same label in `extra`, which wins over a member."""
    task = our_task(sample.task, has_history=bool(sample.history))
    words = task.split()
    txt = (sample.txt or "").replace("\n", " ")
    extra = sample.extra
    out: dict[str, Any] = {"language": sample.lang, "speaker": sample.speaker}
    out["gender"] = known(extra.get("gender")) or sample.gender
    out["age"] = known(extra.get("age"))
    out["emotion"] = known(extra.get("q_emotion")) or known(extra.get("emotion")) or sample.emotion
    out["style"] = known(extra.get("style"))
    caption = known(extra.get("caption"))
    # extra.caption: one event tag (`<COUGH>`) or several; the events task's answer replaces it below
    out["events"] = ([f"<{e}>" for e in _TAG.findall(caption)] or [caption]) if isinstance(caption, str) else None
    if is_reply_task(sample.task):
        question = known(extra.get("question")) or known(extra.get("q_txt"))
        if (sample.task or "").strip() and _spaced(sample.task.strip()) == "<TRANSCRIBE> <S2TCHAT>" and ANSWER_MARK in txt:
            question = question or txt.split(ANSWER_MARK, 1)[0].strip()
        out["text"] = question
    elif task_table.ALIGN in words:
        aligned = parse_align_text(txt)
        joiner = "" if sample.lang == "zh" else " "
        out["text"] = joiner.join(w["word"] for w in aligned) if aligned else (_TAG.sub("", txt).strip() or None)
        out["words"] = aligned or None
    else:
        body, tail = _TRAILING_TAGS.match(txt).groups()
        found = [f"<{t}>" for t in _TAG.findall(tail)]
        if task_table.TRANSCRIBE in words:
            out["text"] = body.strip() or None
        label_fields = [task_table.LABEL_TAGS[w] for w in words if w in task_table.LABEL_TAGS]
        if label_fields == ["events"]:
            out["events"] = found or out["events"]
        elif found and len(found) == len(label_fields):
            for name, value in zip(label_fields, found):
                out[name] = [value] if name == "events" else value
    if isinstance(out.get("events"), list):
        out["events"] = [e for e in out["events"] if known(e) is not None] or None
    return {k: (known(v) if isinstance(v, str) else v) for k, v in out.items()}


def lenient_label(name: str, value: Any) -> Any:
    """A label through the one alias table (schemas/labels.py), None when it is off the vocabulary
    (unknown, not an error: the model's loader keeps the rest of the sample)."""
    if value is None:
        return None
    try:
        if name == "events":
            events = []
            for item in value:
                try:
                    events.append(labels.normalise("events", item))
                except labels.LabelError:
                    continue
            return list(dict.fromkeys(events)) or None
        return labels.normalise(name, value)
    except labels.LabelError:
        return None


def record_fields(sample: OsumSample) -> dict[str, Any]:
    """The sample as our record's fields (schemas/record.py), labels normalised leniently; no audio.

    id: the key. Dialogue and TTS tasks give `reply_text` (leading reply tag stripped, into
    `reply_emotion`), `think_text` (extra.think_str), `reply_speech_tokens` (extra.speech_token)
    and, for earlier turns, `history`: per turn the user's (speech only, so its text is None) then
    the assistant's reply.
    """
    task = our_task(sample.task, has_history=bool(sample.history))
    found = user_labels(sample)
    rec: dict[str, Any] = {"id": sample.key, "source_dataset": known(sample.extra.get("dataset")), "task": task}
    for name in ("language", "gender", "age", "emotion", "style", "events"):
        rec[name] = lenient_label(name, found.get(name))
    if found.get("speaker"):
        rec["speaker"] = found["speaker"]
    if found.get("text") is not None or "text" in found:
        rec["transcript"] = found.get("text")
    if found.get("words") is not None or "words" in found:
        rec["words"] = found.get("words")
    if is_reply_task(sample.task):
        txt = (sample.txt or "").replace("\n", " ")
        if _spaced((sample.task or "").strip()) == "<TRANSCRIBE> <S2TCHAT>" and ANSWER_MARK in txt:
            txt = txt.split(ANSWER_MARK, 1)[1]
        emotion, reply = split_reply_tag(txt)
        rec["reply_text"] = reply or None
        rec["reply_emotion"] = emotion
        rec["think_text"] = (str(sample.extra.get("think_str") or "")).strip() or None
        rec["reply_speech_tokens"] = speech_tokens(sample.extra.get("speech_token"))
        if sample.history:
            turns = []
            for turn in sample.history:
                turns += [{"role": "user", "text": None}, {"role": "assistant", "text": turn.txt or None}]
            rec["history"] = turns
    return rec


def speech_tokens(value: Any) -> list[int] | None:
    """extra.speech_token as ints; None when absent, empty or not a list of integers (their loader
    skips a speech task then)."""
    if not isinstance(value, list) or not value:
        return None
    try:
        return [int(t) for t in value]
    except (TypeError, ValueError):
        return None
