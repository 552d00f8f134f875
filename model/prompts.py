"""ChatML prompts of OSUM-EChat: a system prompt per output type, instructions per task tag.

Layout of one sample (OSUM-EChat's `llmasr_model_instruct_version.py`, forward):

    <|im_start|>system\n{system prompt for the output type}<|im_end|>\n
    [<|im_start|>user\n{earlier user turn}<|im_end|>\n<|im_start|>assistant\n{earlier reply}<|im_end|>\n ...]
    <|im_start|>user\n{instruction}<|audio|><|im_end|>\n<|im_start|>assistant\n
    {target}<|im_end|>

The instruction comes before the speech, as OSUM puts its prompt embeddings before the speech
embeddings. The dialogue tasks carry no instruction there (OSUM-EChat feeds the speech alone and
names the mode in the system prompt); text-to-speech puts the text to speak in the user turn and
text chat the user's words, on a line of their own after the instruction when there is one
(`{instruction}\n{text}`). Everything before the target is masked from the loss, and so is each
`<&&>` placeholder inside the target (an unknown label in the tag-form reasoning).

The task tags' paraphrased instructions are data: `model/instructions/*.yaml`, each a mapping
task tag -> list of instructions, the layout of OSUM's own `prompt_config.yaml`. System prompts
and instructions name the reasoning markers in words ("think tags"), never as `<think>`: the
tokenizer would read that as the control token itself.

Prompt profiles: this layout is the `echat` profile (the default). The `osum` profile
(model/osum_prompts.py) lays samples out as OSUM-EChat's own code does, so a released checkpoint
fine-tuned here sees what it was trained on. The model config names the profile
(`prompt_profile`); `tokenizer.load_tokenizer` builds the profile's tokenizer and marks it with the
profile's name, and everything that encodes with that tokenizer (ChatEncoder, SampleBuilder) follows
the mark, so the vocabulary and the layout cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from echat.schemas import tasks, vocab
from echat.schemas.reasoning import UNKNOWN
# The prompt kinds and label tags of the task table (schemas/tasks.py), by the names this module offers.
from echat.schemas.tasks import LABEL_TAGS, S2S, S2S_THINK, S2T_CHAT, S2T_THINK, T2T, TTS, UNDERSTAND  # noqa: F401
from echat.schemas.tasks import normalize as normalize_task

# Special tokens, by string: the tokenizer maps each to one id (model/tokenizer.py builds them).
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"
AUDIO = "<|audio|>"  # the one placeholder the model replaces with the speech embeddings
INSTRUCTION_SEPARATOR = "\n"  # between an instruction and the user's text in one user turn

# Prompt profiles (see the module docstring).
ECHAT = "echat"
OSUM = "osum"
PROFILES: tuple[str, ...] = (ECHAT, OSUM)
DEFAULT_PROFILE = ECHAT
# The attribute a tokenizer built for a profile carries (tokenizer.load_tokenizer sets it).
PROFILE_ATTRIBUTE = "echat_prompt_profile"


def check_profile(name: Any) -> str:
    """`name` if it is a known prompt profile; ValueError naming it and the choices otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown prompt profile {name!r}; choices: {', '.join(PROFILES)}")
    return name


def tokenizer_profile(tokenizer: Any) -> str:
    """The prompt profile a tokenizer was built for (unmarked: the default, `echat`)."""
    return check_profile(getattr(tokenizer, PROFILE_ATTRIBUTE, None) or DEFAULT_PROFILE)

# Output types: each has its own system prompt, keyed by the prompt kinds of the task table
# (schemas/tasks.py). The wording follows the roles of OSUM-EChat's system prompts
# (understanding, speech-to-text chat, thinking, speech-to-speech, TTS, text chat).
SYSTEM_PROMPTS: dict[str, str] = {
    UNDERSTAND: (
        "You are an audio understanding assistant. You transcribe speech accurately and analyse its "
        "paralinguistic cues, such as the speaker's age, gender and emotion, vocal events and speaking "
        "style, to give precise text answers."
    ),
    S2T_CHAT: (
        "You are a speech-to-text dialogue assistant. You understand both what is said and how it is "
        "said, and you reply with appropriate text only."
    ),
    S2T_THINK: (
        "You are a thinking speech-to-text dialogue assistant. You understand both what is said and how "
        "it is said. Before replying, you reason between think tags about the user's words and "
        "vocal cues, then you reply with appropriate text only."
    ),
    S2S: (
        "You are a speech-to-speech dialogue assistant. You understand both the meaning and the "
        "paralinguistic cues of speech, and you reply with appropriate text and emotionally matching "
        "synthetic speech."
    ),
    S2S_THINK: (
        "You are a speech-to-speech dialogue assistant. You understand both the meaning and the "
        "paralinguistic cues of speech. Before replying, you reason between think tags about "
        "the user's words and vocal cues, then you reply with appropriate text and emotionally matching "
        "synthetic speech."
    ),
    TTS: "You are a speech synthesis assistant. You turn the text you are given into natural, fluent speech.",
    T2T: "You are a text dialogue assistant. You understand the user's text and reply with appropriate text only.",
}

# The vocabulary of each label field: what a training target may name and what evaluation scores.
LABEL_VOCAB: dict[str, tuple[str, ...]] = {
    "emotion": vocab.EMOTIONS, "gender": vocab.GENDERS, "age": vocab.AGES, "style": vocab.STYLES, "events": vocab.EVENTS,
}
# Tasks whose user turn carries no instruction by default (see the module docstring).
CHAT_TASKS = tasks.UNINSTRUCTED_TAGS


def output_type(task: str, *, speech_target: bool = False) -> str:
    """The output type (system prompt) of a task; `<HISTORY>` speaks when it has a speech target.

    ValueError (schemas.tasks.UnknownTaskError) for a task the table does not know.
    """
    return tasks.task(task).prompt_kind(speech_target=speech_target)


# ----------------------------------------------------------------------------- instructions


class InstructionError(ValueError):
    pass


def default_instructions_dir() -> Path:
    return Path(str(resources.files("echat.model").joinpath("instructions")))


def load_instructions(folder: str | Path | None = None, profile: str = DEFAULT_PROFILE) -> dict[str, tuple[str, ...]]:
    """Task tag -> paraphrased instructions, from every `*.yaml` in `folder` (default: ours).

    Raises InstructionError naming the file and key for a malformed entry or a tag defined twice.
    profile `osum`: the osum profile's files (model/instructions/osum/instructions_{zh,en}.yaml,
    or those in `folder`), see osum_prompts.load_instructions.
    """
    if check_profile(profile) == OSUM:
        from echat.model import osum_prompts

        return osum_prompts.load_instructions(folder)
    folder = Path(folder) if folder is not None else default_instructions_dir()
    if folder == default_instructions_dir():
        return _default_instructions()
    return _read_instructions(folder)


@lru_cache(maxsize=1)
def _default_instructions() -> dict[str, tuple[str, ...]]:
    return _read_instructions(default_instructions_dir())


def _read_instructions(folder: Path) -> dict[str, tuple[str, ...]]:
    files = sorted(folder.glob("*.yaml"))
    if not files:
        raise InstructionError(f"no instruction files (*.yaml) in {folder}")
    table: dict[str, tuple[str, ...]] = {}
    origin: dict[str, str] = {}
    for path in files:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise InstructionError(f"{path}: expected a mapping task tag -> list of instructions")
        for key, items in data.items():
            try:
                task = normalize_task(str(key))
            except ValueError as err:
                raise InstructionError(f"{path}: {err}") from None
            if not isinstance(items, list) or not items or not all(isinstance(s, str) and s.strip() for s in items):
                raise InstructionError(f"{path}: {key!r} must be a non-empty list of non-empty strings")
            if task in table:
                raise InstructionError(f"{path}: {task!r} is already defined in {origin[task]}")
            table[task] = tuple(s.strip() for s in items)
            origin[task] = path.name
    return table


# ----------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Segment:
    """A piece of text, whether its tokens are trained on (labels) or masked, and whether its ids
    are worth caching (fixed pieces and instructions: few distinct texts, met again and again)."""

    text: str
    train: bool = False
    cache: bool = False
    # Token ids inside a trained segment that are masked from the loss anyway and fed to the model
    # as `hide_as` (the osum profile's `<&&>` rule, osum_prompts).
    hide: frozenset[int] = frozenset()
    hide_as: int = 0


def target_segments(target: str) -> list[Segment]:
    """The target as trained segments, each `<&&>` placeholder a masked segment of its own."""
    segments: list[Segment] = []
    pieces = target.split(UNKNOWN)
    for i, piece in enumerate(pieces):
        if piece:
            segments.append(Segment(piece, train=True))
        if i < len(pieces) - 1:
            segments.append(Segment(UNKNOWN, train=False, cache=True))
    return segments


class ChatEncoder:
    """Turns segments into token ids and labels with one tokenizer (any PreTrainedTokenizerFast).

    Segments are tokenized one by one, so the label mask follows segment bounds exactly, and the
    ids of segments marked `cache` (system prompts, turn markers, instructions) are kept; user
    texts, history turns and targets are not, so the cache stays as small as the fixed pieces.
    """

    def __init__(self, tokenizer: Any, profile: str | None = None):
        from echat.model.batch import IGNORE_INDEX  # here: this module stays free of torch

        self.ignore_index = IGNORE_INDEX
        self.tokenizer = tokenizer
        # The profile decides the prompt layout; by default the one the tokenizer was built for.
        self.profile = check_profile(profile) if profile is not None else tokenizer_profile(tokenizer)
        missing = [t for t in (IM_START, IM_END, AUDIO) if _single_token_id(tokenizer, t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the special token(s) {', '.join(missing)} as single tokens")
        self.audio_id = _single_token_id(tokenizer, AUDIO)
        self.im_end_id = _single_token_id(tokenizer, IM_END)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = _single_token_id(tokenizer, PAD)
        if pad is None:
            raise ValueError(f"the tokenizer has no pad token and no {PAD} token")
        self.pad_id = int(pad)
        self._cache: dict[str, list[int]] = {}

    _CACHE_SIZE = 4096  # a safety bound: fixed pieces and instructions are a few hundred texts

    def ids(self, text: str, cache: bool = False) -> list[int]:
        hit = self._cache.get(text) if cache else None
        if hit is not None:
            return hit
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if cache and len(self._cache) < self._CACHE_SIZE:
            self._cache[text] = ids
        return ids

    def encode(self, segments: Iterable[Segment]) -> tuple[list[int], list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        for seg in segments:
            ids = self.ids(seg.text, cache=seg.cache)
            if seg.hide:
                input_ids.extend(seg.hide_as if i in seg.hide else i for i in ids)
            else:
                input_ids.extend(ids)
            if not seg.train:
                labels.extend([self.ignore_index] * len(ids))
            elif seg.hide:
                labels.extend(self.ignore_index if i in seg.hide else i for i in ids)
            else:
                labels.extend(ids)
        return input_ids, labels

    def prompt_ids(
        self,
        out_type: str,
        *,
        instruction: str | None = None,
        user_text: str | None = None,
        with_audio: bool = True,
        history: list[dict[str, str]] | None = None,
    ) -> list[int]:
        """The prompt up to and including `<|im_start|>assistant\\n`: what inference feeds the model,
        in the layout of this encoder's profile."""
        if self.profile == OSUM:
            from echat.model import osum_prompts

            segments = osum_prompts.prompt_segments(out_type, instruction=instruction, user_text=user_text,
                                                    with_audio=with_audio, history=history)
        else:
            segments = prompt_segments(out_type, instruction=instruction, user_text=user_text, with_audio=with_audio, history=history)
        ids, _ = self.encode(segments)
        return ids


def prompt_segments(
    out_type: str,
    *,
    instruction: str | None = None,
    user_text: str | None = None,
    with_audio: bool = True,
    history: list[dict[str, str]] | None = None,
) -> list[Segment]:
    """System prompt, earlier turns, then the user turn: [instruction][\n user_text][<|audio|>].

    An instruction and a user text are two lines ("Read the following text aloud.\nHello."), so
    the model sees where the instruction ends; the speech follows the instruction directly, as
    OSUM puts its prompt embeddings right before the speech embeddings.
    """
    if out_type not in SYSTEM_PROMPTS:
        raise ValueError(f"unknown output type {out_type!r}; known: {', '.join(SYSTEM_PROMPTS)}")
    segs = [Segment(f"{IM_START}system\n{SYSTEM_PROMPTS[out_type]}{IM_END}\n", cache=True)]
    for turn in history or []:
        role = turn.get("role")
        if role not in ("user", "assistant"):
            raise ValueError(f"history turn role must be 'user' or 'assistant', not {role!r}")
        segs.append(Segment(f"{IM_START}{role}\n", cache=True))
        segs.append(Segment(turn.get("text") or ""))
        segs.append(Segment(f"{IM_END}\n", cache=True))
    segs.append(Segment(f"{IM_START}user\n", cache=True))
    if instruction:
        segs.append(Segment(f"{instruction}{INSTRUCTION_SEPARATOR}" if user_text else instruction, cache=True))
    if user_text:
        segs.append(Segment(user_text))
    if with_audio:
        segs.append(Segment(AUDIO, cache=True))
    segs.append(Segment(f"{IM_END}\n{IM_START}assistant\n", cache=True))
    return [s for s in segs if s.text]


def _single_token_id(tokenizer: Any, token: str) -> int | None:
    ids = tokenizer(token, add_special_tokens=False)["input_ids"]
    return int(ids[0]) if len(ids) == 1 else None
