"""The `osum` prompt profile: training samples laid out exactly as OSUM-EChat's own code lays them out.

A released OSUM-EChat checkpoint fine-tuned here must see what it saw in its own training
(wenet/dataset/process/processor.py `tokenize` and wenet/osum_echat/llmasr_model_instruct_version.py
`forward`, commit f2bcfac). Their rules, as this module applies them:

    [<|im_start|>system\\n{system prompt}<|im_end|>\\n<|im_start|>user\\n]   one piece, masked
    [{instruction}]        understanding tasks only (a draw from the tag's list), masked
    [{question}]           <TEXT2TEXT> only: the user's text itself, no instruction, masked
    [<|audio|>]            the speech (begin/end vectors around it, model/osum.py)
    [{text to speak}]      <TEXT2TOKEN> only: the normalised text, masked, where the speech would be
    [<|im_end|>\\n<|im_start|>assistant\\n]                               one piece, masked
    [{target}][eos]        normalised target, trained; eos = the tokenizer's eos token
    (then the speech tokens of a speaking task, model/osum.py)

Each bracket is tokenized on its own (their code embeds each piece separately), so byte-level
merges never cross a piece boundary. The dialogue and TTS tasks carry no instruction: their forward
drops the prompt for every output type but understanding and text chat.

Target text (`process_text2`): newlines become spaces, spaces around CJK characters and around `<`
and `>` are deleted, and `<TRANSCRIBE>` targets alone are lower-cased. `<&&>` (an unknown label) is
plain text: the token(s) of its middle piece `&&` are masked from the loss and embedded as id 0,
and a target that ends with `<&&>` gets no eos (their `txt.endswith(unk_tag)`). Reasoning:
`<think>{trace}<think end>{reply}`; the tag form is their Chinese template (processor_tag_think.py)
and also opens the reply with the reply-emotion tag.

Deliberate departures, both because the literal rule cannot be what a released model learned from:
their `process_tagged_string_and_delete_tag_from_txt` strips a leading `<tag>` from every target
(it would empty a label-only target such as `<SAD>`), applied here to dialogue replies only; and
their multi-turn history embeds earlier user turns as speech, which our text-only history cannot
reproduce, so `<HISTORY>` is refused under this profile.

The strings a checkpoint depends on (system prompts, task names, the ChatML pieces, the tag-form
template, the `&&` piece) are data: model/instructions/osum/*.yaml, checked at load.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from echat.schemas import tasks as task_table
from echat.schemas import vocab
from echat.schemas.reasoning import THINK_END, THINK_START, ThinkParseError, parse_tag_form, split_think

INSTRUCTION_LANGUAGES = ("zh", "en")  # zh first: OSUM trained on Chinese, inference takes the first


class OsumProfileError(ValueError):
    """A malformed OSUM interface file; the message names the file and the key."""


def osum_dir() -> Path:
    return Path(str(resources.files("echat.model").joinpath("instructions", "osum")))


@dataclass(frozen=True)
class TagThinkSpec:
    template: str
    unknown_rate: float
    defaults: dict[str, str]
    no_event: str
    reply_emotion_default: str
    reply_emotions: dict[str, str]


@dataclass(frozen=True)
class OsumInterface:
    system_prompts: dict[str, str]  # prompt kind (schemas/tasks.py) -> text
    task_names: dict[str, str]  # our tag -> OSUM's name
    system_start: str
    system_end: str
    user_start: str
    assistant_start: str
    unknown_placeholder: str
    unknown_piece: str
    unknown_input_id: int
    tag_think: TagThinkSpec

    def osum_task(self, tag: str) -> str:
        tag = task_table.task(tag).tag
        return self.task_names.get(tag, tag)

    def system_piece(self, kind: str) -> str:
        """`<|im_start|>system\\n{prompt}<|im_end|>\\n<|im_start|>user\\n`, one piece as OSUM tokenizes it."""
        if kind not in self.system_prompts:
            raise ValueError(f"unknown output type {kind!r}; known: {', '.join(self.system_prompts)}")
        return f"{self.system_start}{self.system_prompts[kind]}{self.system_end}{self.user_start}"


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise OsumProfileError(f"missing OSUM interface file {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise OsumProfileError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise OsumProfileError(f"{path}: expected a mapping")
    return data


def _text(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise OsumProfileError(f"{where}: {key!r} must be a non-empty string")
    return value


def load_interface(folder: str | Path | None = None) -> OsumInterface:
    folder = Path(folder) if folder is not None else osum_dir()
    if folder == osum_dir():
        return _default_interface()
    return _read_interface(folder)


@lru_cache(maxsize=1)
def _default_interface() -> OsumInterface:
    return _read_interface(osum_dir())


def _read_interface(folder: Path) -> OsumInterface:
    prompts_path = folder / "system_prompts.yaml"
    prompts = _load_yaml(prompts_path)
    missing = [k for k in task_table.PROMPT_KINDS if k not in prompts]
    unknown = [k for k in prompts if k not in task_table.PROMPT_KINDS]
    if missing or unknown:
        raise OsumProfileError(
            f"{prompts_path}: needs one system prompt per output type ({', '.join(task_table.PROMPT_KINDS)}); "
            + (f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(map(str, unknown))}")
        )
    for kind in prompts:
        _text(prompts, kind, str(prompts_path))

    path = folder / "interface.yaml"
    data = _load_yaml(path)
    names = data.get("task_names") or {}
    if not isinstance(names, dict):
        raise OsumProfileError(f"{path}: 'task_names' must map our task tags to OSUM's names")
    task_names: dict[str, str] = {}
    for ours, theirs in names.items():
        try:
            tag = task_table.task(str(ours)).tag
        except ValueError as err:
            raise OsumProfileError(f"{path}: task_names: {err}") from None
        if not isinstance(theirs, str) or not theirs.strip():
            raise OsumProfileError(f"{path}: task_names[{ours!r}] must be a task name")
        task_names[tag] = task_table.normalize(theirs)

    think = data.get("tag_think")
    if not isinstance(think, dict):
        raise OsumProfileError(f"{path}: 'tag_think' must be a mapping")
    where = f"{path}: tag_think"
    template = _text(think, "template", where)
    fields = set(re.findall(r"{(\w+)}", template))
    if fields != {"words", "age", "gender", "emotion", "events", "reply_emotion"}:
        raise OsumProfileError(f"{where}.template must name words, age, gender, emotion, events, reply_emotion; has {sorted(fields)}")
    rate = think.get("unknown_rate")
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise OsumProfileError(f"{where}.unknown_rate must be between 0 and 1, not {rate!r}")
    defaults = think.get("defaults") or {}
    if not isinstance(defaults, dict) or set(defaults) != {"age", "gender", "emotion", "events"}:
        raise OsumProfileError(f"{where}.defaults must give age, gender, emotion and events")
    emotions = think.get("reply_emotions") or {}
    bad = [k for k in emotions if str(k).upper() not in vocab.REPLY_EMOTIONS]
    if not isinstance(emotions, dict) or bad:
        raise OsumProfileError(f"{where}.reply_emotions: unknown reply emotion(s) {bad}; known: {', '.join(vocab.REPLY_EMOTIONS)}")
    input_id = data.get("unknown_input_id")
    if not isinstance(input_id, int) or input_id < 0:
        raise OsumProfileError(f"{path}: 'unknown_input_id' must be a token id (int >= 0)")
    return OsumInterface(
        system_prompts={k: str(v) for k, v in prompts.items()},
        task_names=task_names,
        system_start=_text(data, "system_start", str(path)),
        system_end=_text(data, "system_end", str(path)),
        user_start=_text(data, "user_start", str(path)),
        assistant_start=_text(data, "assistant_start", str(path)),
        unknown_placeholder=_text(data, "unknown_placeholder", str(path)),
        unknown_piece=_text(data, "unknown_piece", str(path)),
        unknown_input_id=input_id,
        tag_think=TagThinkSpec(
            template=template,
            unknown_rate=float(rate),
            defaults={k: str(v) for k, v in defaults.items()},
            no_event=_text(think, "no_event", where),
            reply_emotion_default=_text(think, "reply_emotion_default", where),
            reply_emotions={str(k).upper(): str(v) for k, v in emotions.items()},
        ),
    )


# ----------------------------------------------------------------------------- instructions


# Label combinations outside the table that training and inference take (schemas/tasks.py composes
# them), each with its own instructions under this profile as under the echat one.
INSTRUCTED_COMBINATIONS = (
    "<TRANSCRIBE> <STYLE>",
    "<TRANSCRIBE> <GENDER>",
    "<TRANSCRIBE> <AGE>",
    "<TRANSCRIBE> <CAPTION>",
    "<AGE> <GENDER>",
)


def instructed_tags() -> tuple[str, ...]:
    """Our task tags that OSUM prompts with an instruction: the understanding tasks of the table,
    then the label combinations of `INSTRUCTED_COMBINATIONS`."""
    table = tuple(tag for tag, spec in task_table.TASKS.items() if spec.instruction)
    extra = tuple(task_table.task(tag).tag for tag in INSTRUCTED_COMBINATIONS)
    return table + tuple(tag for tag in extra if tag not in table)


def load_instructions(folder: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """Our task tag -> instructions (Chinese first, then English), from `instructions_{lang}.yaml`.

    Each file maps OSUM task names (or our tags) to lists. Every instructed task of the table
    (`instructed_tags`) must have a list in every language: a tag without one is an error naming
    it, as is a tag that no task knows or a tag given twice.
    """
    folder = Path(folder) if folder is not None else osum_dir()
    if folder == osum_dir():
        return _default_instructions()
    return _read_instructions(folder)


@lru_cache(maxsize=1)
def _default_instructions() -> dict[str, tuple[str, ...]]:
    return _read_instructions(osum_dir())


def _read_instructions(folder: Path) -> dict[str, tuple[str, ...]]:
    merged: dict[str, list[str]] = {}
    for lang in INSTRUCTION_LANGUAGES:
        path = folder / f"instructions_{lang}.yaml"
        data = _load_yaml(path)
        seen: set[str] = set()
        for key, items in data.items():
            try:
                tag = task_table.task(str(key)).tag
            except ValueError as err:
                raise OsumProfileError(f"{path}: {err}") from None
            if tag in seen:
                raise OsumProfileError(f"{path}: {key!r} is {tag!r}, which is already defined in this file")
            seen.add(tag)
            if not isinstance(items, list) or not items:
                raise OsumProfileError(f"{path}: {key!r} must be a non-empty list of instructions")
            for i, item in enumerate(items):
                if not isinstance(item, str) or not item.strip():  # e.g. an unquoted "a: b" read as a mapping
                    raise OsumProfileError(f"{path}: {key!r} item {i} is not a non-empty string: {item!r}")
            cleaned = [s.strip() for s in items]
            if len(set(cleaned)) != len(cleaned):
                raise OsumProfileError(f"{path}: {key!r} lists an instruction twice")
            merged.setdefault(tag, []).extend(cleaned)
        missing = [tag for tag in instructed_tags() if tag not in seen]
        if missing:
            raise OsumProfileError(f"{path}: no instructions for task(s) {', '.join(missing)}")
    return {tag: tuple(items) for tag, items in merged.items()}


# ----------------------------------------------------------------------------- text rules


_CJK_SPACES = re.compile(r"\s*([\u4e00-\u9fff])\s*")
_LT_SPACES = re.compile(r"\s*<\s*")
_GT_SPACES = re.compile(r"\s*>\s*")
_LEADING_TAG = re.compile(r"^<([^<>]+)>(.*)$", re.DOTALL)


def normalize_target(text: str, osum_task: str) -> str:
    """OSUM's `process_text2` after its newline replacement: no spaces around CJK characters,
    `<` or `>`; lower case for the `<TRANSCRIBE>` task alone (not its label combinations)."""
    text = text.replace("\n", " ")
    text = _CJK_SPACES.sub(r"\1", text)
    if osum_task == task_table.TRANSCRIBE:
        text = text.lower()
    text = _LT_SPACES.sub("<", text)
    return _GT_SPACES.sub(">", text)


def strip_leading_tag(text: str) -> str:
    """A reply without the `<tag>` that opens it (their `process_tagged_string_and_delete_tag_from_txt`)."""
    match = _LEADING_TAG.match(text)
    return match.group(2).lstrip() if match else text


def natural_think(trace: str) -> str:
    """The natural-language trace as OSUM writes it: `<think>{think_str}<think end>`."""
    body = split_think(trace)[0] if trace.lstrip().startswith(THINK_START) else trace
    return f"{THINK_START}{(body or '').strip()}{THINK_END}"


def tag_think(trace: str, spec: TagThinkSpec, placeholder: str, rng: random.Random) -> tuple[str, str]:
    """(OSUM's Chinese tag-form trace with markers, the reply-emotion tag that opens the reply),
    from our tag-form trace (schemas/reasoning.py). One draw decides whether this sample's missing
    labels are the placeholder or the defaults, as processor_tag_think.py draws once per sample."""
    parsed = parse_tag_form(trace, strict=False)
    unknown = rng.random() < spec.unknown_rate

    def label(value: str | None, field: str) -> str:
        if value:
            return vocab.osum_label(value)
        return placeholder if unknown else spec.defaults[field]

    if parsed.events is None:
        events = placeholder if unknown else spec.defaults["events"]
    elif not parsed.events:
        events = spec.no_event
    else:
        events = "".join(vocab.osum_label(e) for e in parsed.events)
    reply_emotion = spec.reply_emotions.get((parsed.reply_emotion or "").upper(), spec.reply_emotion_default)
    body = spec.template.format(
        words=parsed.words, age=label(parsed.age, "age"), gender=label(parsed.gender, "gender"),
        emotion=label(parsed.emotion, "emotion"), events=events, reply_emotion=reply_emotion,
    )
    return f"{THINK_START}{body}{THINK_END}", reply_emotion


def is_tag_form(trace: str) -> bool:
    try:
        parse_tag_form(trace, strict=False)
    except ThinkParseError:
        return False
    return True


# ----------------------------------------------------------------------------- layout


def prompt_segments(
    kind: str,
    *,
    instruction: str | None = None,
    user_text: str | None = None,
    with_audio: bool = True,
    history: list[dict[str, str]] | None = None,
    interface: OsumInterface | None = None,
) -> list["Segment"]:
    """The prompt up to `<|im_start|>assistant\\n`, in OSUM's pieces (see the module docstring).

    kind: the output type (system prompt). An instruction only for understanding; `user_text` is the
    question of text chat or the text to speak of TTS; earlier turns are refused (OSUM's history
    turns are speech). ValueError naming what does not fit.
    """
    from echat.model.prompts import AUDIO, Segment

    face = interface or load_interface()
    if history:
        raise ValueError("the osum profile cannot lay out earlier turns: OSUM-EChat embeds them as speech, ours are text")
    if instruction and kind != task_table.UNDERSTAND:
        raise ValueError(f"the osum profile gives an instruction to understanding tasks only, not to output type {kind!r}")
    segs = [Segment(face.system_piece(kind), cache=True)]
    if instruction:
        segs.append(Segment(instruction, cache=True))
    if kind == task_table.T2T:
        if not user_text:
            raise ValueError("text chat (t2t) needs the user's text")
        segs.append(Segment(user_text))  # their `prompt` is the question itself, as written
    elif kind == task_table.TTS:
        if not user_text:
            raise ValueError("text-to-speech (tts) needs the text to speak")
        # Their TTS input is the target text, normalised as a target, in place of the speech.
        segs.append(Segment(normalize_target(user_text, face.osum_task("<TEXT2TOKEN>"))))
    elif user_text:
        raise ValueError(f"the osum profile takes no user text for output type {kind!r}")
    if with_audio:
        if kind in (task_table.T2T, task_table.TTS):
            raise ValueError(f"output type {kind!r} takes no speech input")
        segs.append(Segment(AUDIO, cache=True))
    segs.append(Segment(face.assistant_start, cache=True))
    return [s for s in segs if s.text]


def target_segments(target: str, osum_task: str, encoder: Any, interface: OsumInterface | None = None) -> list["Segment"]:
    """The trained target: normalised text with its `&&` token(s) hidden, then the eos token
    (none when the raw target ends with `<&&>`, as processor.py does)."""
    from echat.model.prompts import Segment

    face = interface or load_interface()
    hide = frozenset(encoder.ids(face.unknown_piece, cache=True))
    segs = [Segment(normalize_target(target, osum_task), train=True, hide=hide, hide_as=face.unknown_input_id)]
    if not target.endswith(face.unknown_placeholder):
        eos = encoder.tokenizer.eos_token
        if not eos:
            raise ValueError("the tokenizer has no eos token; the osum profile ends each target with it")
        segs.append(Segment(eos, train=True, cache=True))
    return [s for s in segs if s.text]
