"""One corpus record -> the training samples it supports, as token ids with their loss mask.

A record is a dict with the fields of schemas/record.py. The reader adds two working keys:
`_audio` (an `AudioRef` to the user's speech, undecoded) and `_num_samples` (its length at 16 kHz).

Tasks and what a record needs for each (a record emits only the tasks it supports; the needs are
data in the task table, schemas/tasks.py, checked here as training needs them):

    <TRANSCRIBE>                      speech, transcript              -> transcript
    <TRANSCRIBE> <ALIGN>              speech, transcript, words       -> `<0.0>so<0.3> <0.3>tired<0.8>`
    <EMOTION> <GENDER> <AGE> <STYLE>  speech, the label (known, score -> `<SAD>`
    <CAPTION>                         >= min_label_score); events     -> `<COUGH>` (every event heard)
    <AGE> <GENDER> ...                speech, each label              -> `<ADULT><FEMALE>`
    <TRANSCRIBE> <X> [<Y> ...]        speech, transcript, each label  -> `I am so tired<SAD>`
    <S2TCHAT>                         speech, reply                   -> reply
    <S2TCHAT> <THINK>                 speech, reply, a reasoning form -> `<think>...<think end>reply`
    <S2TCHAT> <TEXT2TOKEN> [<THINK>]  the above + reply speech tokens -> (reasoning +) reply, then speech
    <TEXT2TOKEN>                      reply, reply speech tokens      -> speech only (text in the user turn)
    <TEXT2TEXT>                       transcript, reply               -> reply (transcript in the user turn)
    <HISTORY>                         speech, reply, earlier turns    -> reply (+ speech when tokens exist)

Target spelling follows OSUM: labels upper case in angle brackets right after the transcript with no
space (OSUM's `process_text` deletes the spaces around `<` and `>`), `vocab.osum_label`. Word
timestamps follow the instructions OSUM trains `<TRANSCRIBE> <ALIGN>` with ("add a timestamp before
and after each word, in <>, to 0.1 s"): start and end of each word, in seconds with one decimal.

Prompt profiles (model/prompts.py): the layout above is the `echat` profile; under `osum` the same
targets are laid out and normalised as OSUM-EChat's own code does (model/osum_prompts.py), with the
`osum` instruction files. The profile is the tokenizer's (`prompts.tokenizer_profile`) unless given.

Each task's weight is the expected number of samples it yields per supporting record per epoch
(1.0: every record once; 0.25: a quarter of them; 2.0: twice, with different instructions). All
random choices (which records, which instruction, which reasoning form) come from a generator
seeded by (seed, epoch, record id, task, copy), so a record yields the same samples whichever worker
reads it and in whatever order: the basis of exact resumption.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from echat.model import osum_prompts, prompts
from echat.model.features import AudioRef, num_frames
from echat.model.prompts import LABEL_VOCAB, Segment
from echat.schemas import tasks as task_table
from echat.schemas import vocab
from echat.schemas.reasoning import THINK_START, wrap_think

log = logging.getLogger(__name__)

SPEECH_CODES = 4096  # CosyVoice 25 Hz codes are 0..4095
# Mel frames (100 Hz) per LLM position: the Whisper conv halves them, the adapter's strides 2 and 2
# quarter them again (12.5 Hz), DESIGN.md "The model package".
FRAMES_PER_POSITION = 8
# Positions the model adds around the spliced speech (model/osum.py `assemble`): the <|audio|>
# token (1) gives way to [begin vector, speech frames, end vector]: 2 more than the frames.
SPEECH_BOUNDS = 2
# The speech-target input is [marker, codes...] (assemble): one position more than the codes.
SPEECH_TARGET_MARKERS = 1


def speech_positions(frames: int) -> int:
    """LLM positions of `frames` mel frames: each stride-2 conv (Whisper's conv2, the adapter's two)
    keeps ceil(L / 2) frames (padded convolutions), so ceil(frames / 8) in all."""
    return -(-int(frames) // FRAMES_PER_POSITION) if frames > 0 else 0


@dataclass
class Sample:
    """One training sample before collation: the model's inputs and targets for one task."""

    key: str  # record id
    task: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where not trained
    audio: AudioRef | None  # None: no speech input (then input_ids hold no <|audio|>)
    num_frames: int  # mel frames of the audio, 0 without
    speech_tokens: list[int] = field(default_factory=list)  # target speech codes, empty for text output

    @property
    def seq_len(self) -> int:
        """The LLM's sequence length for this sample, exactly as model/osum.py `assemble` lays it out:
        the tokens, the <|audio|> token replaced by [begin, speech frames, end], then [marker,
        codes...] for a speech target."""
        n = len(self.input_ids)
        if self.audio is not None and self.num_frames > 0:
            n += speech_positions(self.num_frames) + SPEECH_BOUNDS - 1
        if self.speech_tokens:
            n += len(self.speech_tokens) + SPEECH_TARGET_MARKERS
        return n


def align_text(words: list[dict[str, Any]], language: str | None = None) -> str:
    """`<start>word<end>` per word, seconds to 0.1 s; words joined by a space (none for Chinese)."""
    joiner = "" if language == "zh" else " "
    return joiner.join(f"<{float(w['start']):.1f}>{str(w['word']).strip()}<{float(w['end']):.1f}>" for w in words)


def _clean(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    text = text.strip()
    return text or None


class SampleBuilder:
    """Builds the samples of a record for the tasks the caller asked for.

    tasks: task tag -> weight (see the module docstring); tags as in schemas/vocab.py TASK_TAGS,
    or any `[<TRANSCRIBE>] <LABEL> [<LABEL> ...]` combination that has instructions.
    think_text_ratio: share of reasoning samples given the natural-language form rather than the tag
    form (when a record has both). min_label_score: a label below this score does not make a label
    task. chat_instruction_ratio: share of dialogue/TTS samples whose user turn also gets an
    instruction (OSUM-EChat: none). instructions: a folder of instruction YAMLs or a loaded table
    (default: the profile's own). profile: the prompt profile (default: the tokenizer's).
    """

    def __init__(
        self,
        tokenizer: Any,
        tasks: dict[str, float],
        *,
        think_text_ratio: float = 0.5,
        min_label_score: float = 0.0,
        chat_instruction_ratio: float = 0.0,
        instructions: str | Path | dict[str, tuple[str, ...]] | None = None,
        seed: int = 0,
        profile: str | None = None,
    ):
        if not tasks:
            raise ValueError("name at least one task")
        for name, value in (("think_text_ratio", think_text_ratio), ("chat_instruction_ratio", chat_instruction_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        self.profile = prompts.check_profile(profile) if profile is not None else prompts.tokenizer_profile(tokenizer)
        if self.profile == prompts.OSUM and chat_instruction_ratio > 0:
            raise ValueError("chat_instruction_ratio must be 0 under the osum prompt profile: OSUM-EChat never "
                             "puts an instruction in a dialogue or TTS user turn")
        table = instructions if isinstance(instructions, dict) else prompts.load_instructions(instructions, profile=self.profile)
        self.tasks: dict[str, float] = {}
        for raw, weight in tasks.items():
            task = task_table.task(raw).tag  # ValueError (UnknownTaskError) naming an unknown task
            if not (isinstance(weight, (int, float)) and weight > 0 and math.isfinite(weight)):
                raise ValueError(f"the weight of {raw!r} must be a positive number, not {weight!r}")
            needs_instruction = task_table.task(task).instruction or chat_instruction_ratio > 0
            if needs_instruction and task not in table:
                raise ValueError(f"no instructions for task {task!r}: add a list for it to an instructions YAML")
            if task in self.tasks:
                raise ValueError(f"task {task!r} is given twice")
            if self.profile == prompts.OSUM and task_table.task(task).history:
                raise ValueError(f"task {task!r} cannot be trained under the osum prompt profile: OSUM-EChat "
                                 "embeds earlier user turns as speech, our history turns are text")
            self.tasks[task] = float(weight)
        self.instructions = table
        self.think_text_ratio = think_text_ratio
        self.min_label_score = min_label_score
        self.chat_instruction_ratio = chat_instruction_ratio
        self.seed = seed
        self.encoder = prompts.ChatEncoder(tokenizer, profile=self.profile)
        self.osum = osum_prompts.load_interface() if self.profile == prompts.OSUM else None

    # ------------------------------------------------------------------ what a record supports

    def supported_tasks(self, record: dict[str, Any]) -> list[str]:
        return [task for task in self.tasks if self.supports(record, task)]

    def supports(self, record: dict[str, Any], task: str) -> bool:
        """Whether `record` meets every need the task table names for `task`, each checked as
        training needs it (see `_has`)."""
        spec = task_table.task(task)
        return all(any(self._has(record, name) for name in alternatives) for alternatives in spec.needs)

    def _has(self, record: dict[str, Any], name: str) -> bool:
        """Whether `record` holds field `name` in a form a training sample can use."""
        if name == "audio":  # the reader's undecoded reference to the user's speech
            return record.get("_audio") is not None and record.get("_num_samples", 0) > 0
        if name == "words":
            return self._words(record) is not None
        if name == "history":
            return bool(self._history(record))
        if name == "reply_speech_tokens":
            return self._speech_tokens(record) is not None
        if name == "reply_audio":
            return False  # the speech target is the reply's tokens; reply audio must be tokenized first
        if name in LABEL_VOCAB:
            return self._label(record, name) is not None
        return _clean(record.get(name)) is not None

    def _label(self, record: dict[str, Any], name: str) -> str | None:
        """The OSUM target of a label (`<SAD>`, `<LAUGH><COUGH>`), or None if unknown or unsure."""
        score = record.get(f"{name}_score")
        if score is not None and score < self.min_label_score:
            return None
        value = record.get(name)
        if name == "events":
            events = [e for e in (value or []) if e in LABEL_VOCAB["events"]]
            return "".join(vocab.osum_label(e) for e in events) if events else None
        if value not in LABEL_VOCAB[name]:
            return None
        return vocab.osum_label(value)

    @staticmethod
    def _words(record: dict[str, Any]) -> list[dict[str, Any]] | None:
        words = record.get("words")
        if not words:
            return None
        for w in words:
            if not _clean(w.get("word")) or w.get("start") is None or w.get("end") is None:
                return None
        return list(words)

    @staticmethod
    def _speech_tokens(record: dict[str, Any]) -> list[int] | None:
        tokens = record.get("reply_speech_tokens")
        if tokens is None or len(tokens) == 0:
            return None
        tokens = [int(t) for t in tokens]
        if min(tokens) < 0 or max(tokens) >= SPEECH_CODES:
            log.warning("record %s: reply speech tokens outside 0..%d; its speech tasks are skipped", record.get("id"), SPEECH_CODES - 1)
            return None
        return tokens

    @staticmethod
    def _history(record: dict[str, Any]) -> list[dict[str, str]]:
        turns = []
        for turn in record.get("history") or []:
            role, text = turn.get("role"), _clean(turn.get("text"))
            if role in ("user", "assistant") and text:
                turns.append({"role": role, "text": text})
        return turns

    # ------------------------------------------------------------------ building

    def build(self, record: dict[str, Any], *, epoch: int = 0) -> list[Sample]:
        """The samples this record yields in `epoch`: per supported task, 0 or more by its weight."""
        key = str(record.get("id"))
        rng = random.Random(f"{self.seed}|{epoch}|{key}")
        samples = []
        for task in self.supported_tasks(record):
            weight = self.tasks[task]
            copies = int(weight) + (1 if rng.random() < weight - int(weight) else 0)
            for copy in range(copies):
                task_rng = random.Random(f"{self.seed}|{epoch}|{key}|{task}|{copy}")
                samples.append(self.build_task(record, task, task_rng))
        return samples

    def build_task(self, record: dict[str, Any], task: str, rng: random.Random) -> Sample:
        """One sample of `task` (which the record must support)."""
        spec = task_table.task(task)
        task = spec.tag
        transcript = _clean(record.get("transcript"))
        reply = _clean(record.get("reply_text"))
        with_audio = spec.input == task_table.SPEECH_INPUT
        user_text = _clean(record.get(spec.user_text)) if spec.user_text else None
        history = self._history(record) if spec.history else None
        speech = (self._speech_tokens(record) or []) if spec.speaks or spec.speaks_optionally else []
        target: str | None
        if spec.aligns:
            target = align_text(self._words(record) or [], record.get("language"))
        elif spec.transcribes or spec.labels:
            labels = "".join(self._label(record, name) or "" for name in spec.labels)
            if not spec.transcribes:
                target = labels
            else:
                target = f"{transcript}{labels}" if transcript is not None else None
        elif spec.output == task_table.SPEECH:
            target = None  # speech alone (the text to speak is in the user turn)
        elif self.osum is not None:  # a reply, as OSUM writes it (osum_prompts)
            target = self._osum_reply(record, reply or "", rng) if spec.reasons else osum_prompts.strip_leading_tag(reply or "")
        else:  # a reply: (reasoning, then) the reply text
            target = self._think(record, rng) + (reply or "") if spec.reasons else reply
        if with_audio and target is None:
            raise ValueError(f"record {record.get('id')!r} does not support task {task!r}")

        instruction = None
        if spec.instruction or rng.random() < self.chat_instruction_ratio:
            instruction = rng.choice(self.instructions[task])
        out_type = prompts.output_type(task, speech_target=bool(speech))
        if self.osum is not None:
            segments = osum_prompts.prompt_segments(out_type, instruction=instruction, user_text=user_text,
                                                    with_audio=with_audio, interface=self.osum)
            if target is not None:
                segments += osum_prompts.target_segments(target, self.osum.osum_task(task), self.encoder, self.osum)
        else:
            segments = prompts.prompt_segments(out_type, instruction=instruction, user_text=user_text, with_audio=with_audio, history=history)
            if target is not None:
                segments += prompts.target_segments(target)
                segments.append(Segment(prompts.IM_END, train=True))
        input_ids, labels = self.encoder.encode(segments)
        frames = num_frames(record.get("_num_samples", 0)) if with_audio else 0
        return Sample(
            key=str(record.get("id")),
            task=task,
            input_ids=input_ids,
            labels=labels,
            audio=record.get("_audio") if with_audio else None,
            num_frames=frames,
            speech_tokens=speech,
        )

    def _pick_think(self, record: dict[str, Any], rng: random.Random) -> tuple[str, bool]:
        """(the reasoning trace this sample trains on, whether it is the tag form)."""
        tags, text = _clean(record.get("think_tags")), _clean(record.get("think_text"))
        draw = rng.random()  # drawn even when one form is missing, so the stream does not shift
        chosen = (text if draw < self.think_text_ratio else tags) if tags and text else (tags or text)
        if chosen is None:
            raise ValueError(f"record {record.get('id')!r} has no reasoning trace")
        return chosen, chosen is tags

    def _think(self, record: dict[str, Any], rng: random.Random) -> str:
        chosen, _ = self._pick_think(record, rng)
        if not chosen.startswith(THINK_START):
            chosen = wrap_think(chosen)
        return chosen

    def _osum_reply(self, record: dict[str, Any], reply: str, rng: random.Random) -> str:
        """`<think>{trace}<think end>{reply}` as OSUM builds it: the natural form as written; the tag
        form rebuilt as their Chinese trace, the reply opened by its reply-emotion tag."""
        assert self.osum is not None
        chosen, is_tags = self._pick_think(record, rng)
        reply = osum_prompts.strip_leading_tag(reply)
        if not is_tags:
            return osum_prompts.natural_think(chosen) + reply
        try:
            trace, emotion = osum_prompts.tag_think(chosen, self.osum.tag_think, self.osum.unknown_placeholder, rng)
        except ValueError as err:
            raise ValueError(f"record {record.get('id')!r}: its think_tags is not a tag-form trace: {err}") from None
        return trace + emotion + reply
