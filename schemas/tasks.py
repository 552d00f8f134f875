"""The OSUM task-tag table: for each tag, what it needs from a record, what it outputs, how it is asked.

One entry per tag of `vocab.TASK_TAGS` (DESIGN.md "Compatibility with OSUM / OSUM-EChat"), as data:
the corpus builder decides from it which task a row serves (`record_task`), the trainer which
samples a record yields and how their targets and prompts are laid out, inference how a task is
prompted and what it generates, evaluation how a task is scored. Besides the tags of the table,
any `[<TRANSCRIBE>] <LABEL> [<LABEL> ...]` combination of distinct label tags is a task
(`<TRANSCRIBE> <STYLE>`, `<AGE> <GENDER>`), composed by `task()` by the same rules.

Torch-free and free of the model package: the system-prompt kinds are named here, their texts
live in model/prompts.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

from echat.schemas import vocab

# System-prompt kinds (one per output type of OSUM-EChat; model/prompts.py holds their texts).
UNDERSTAND = "understand"
S2T_CHAT = "s2t_chat"
S2T_THINK = "s2t_think"
S2S = "s2s"
S2S_THINK = "s2s_think"
TTS = "tts"
T2T = "t2t"
PROMPT_KINDS = (UNDERSTAND, S2T_CHAT, S2T_THINK, S2S, S2S_THINK, TTS, T2T)

# What the user turn carries.
SPEECH_INPUT = "speech"
TEXT_INPUT = "text"

# What the answer is.
TEXT = "text"  # a transcript or a reply
LABEL = "label"  # paralinguistic labels only (`<SAD>`, `<ADULT><FEMALE>`, `<COUGH>`)
TEXT_LABEL = "text+label"  # the transcript, then labels (`I am so tired<SAD>`)
TEXT_SPEECH = "text+speech"  # a reply in text, then its speech tokens
SPEECH = "speech"  # speech tokens only (TTS)
OUTPUTS = (TEXT, LABEL, TEXT_LABEL, TEXT_SPEECH, SPEECH)

TRANSCRIBE = "<TRANSCRIBE>"
ALIGN = "<ALIGN>"
# Single tags that name a paralinguistic label, and the record field each reads.
LABEL_TAGS: dict[str, str] = {
    "<EMOTION>": "emotion",
    "<GENDER>": "gender",
    "<AGE>": "age",
    "<STYLE>": "style",
    "<CAPTION>": "events",
}
# Alternatives a requirement accepts: either reasoning form; the reply's speech as tokens or audio.
REASONING_FORMS = ("think_tags", "think_text")
REPLY_SPEECH = ("reply_speech_tokens", "reply_audio")


@dataclass(frozen=True)
class Task:
    """One task tag and what it means.

    needs: the record fields that must be non-empty, each requirement a tuple of alternatives (one
    of them suffices): `(("audio",), ("reply_text",), ("think_tags", "think_text"))`. These are the
    corpus-level needs; the trainer checks its own details on top (a label's score, speech tokens
    in range; it trains on `reply_speech_tokens`, so `reply_audio` alone must be tokenized first).
    output: one of OUTPUTS. prompt: the system-prompt kind. speech_prompt: the kind used instead
    when a task that may speak (`speaks_optionally`) has a speech target.
    input: SPEECH_INPUT or TEXT_INPUT; user_text: the record field the user turn carries as text.
    instruction: whether the user turn carries one of the tag's paraphrased instructions by default
    (the dialogue tasks carry none: OSUM-EChat names the mode in the system prompt).
    labels: the label fields the target names, in order. history: the prompt holds earlier turns.
    """

    tag: str
    needs: tuple[tuple[str, ...], ...]
    output: str
    prompt: str
    input: str = SPEECH_INPUT
    reasons: bool = False
    speaks: bool = False
    speaks_optionally: bool = False
    speech_prompt: str | None = None
    user_text: str | None = None
    instruction: bool = True
    labels: tuple[str, ...] = ()
    history: bool = False

    @property
    def words(self) -> tuple[str, ...]:
        """The tag words: `("<S2TCHAT>", "<THINK>")`."""
        return tuple(self.tag.split())

    @property
    def transcribes(self) -> bool:
        """The answer holds the transcript (every task with `<TRANSCRIBE>`)."""
        return TRANSCRIBE in self.words

    @property
    def aligns(self) -> bool:
        """The transcript is word-timestamped (`<TRANSCRIBE> <ALIGN>`)."""
        return ALIGN in self.words

    @property
    def replies(self) -> bool:
        """A dialogue task: the answer is a reply (text, speech or both) to the user's turn."""
        return any("reply_text" in alternatives for alternatives in self.needs)

    def prompt_kind(self, *, speech_target: bool = False) -> str:
        """The system-prompt kind; a task that may speak takes `speech_prompt` when it does."""
        if speech_target and self.speaks_optionally and self.speech_prompt:
            return self.speech_prompt
        return self.prompt

    def missing(self, record: Mapping[str, Any]) -> list[str]:
        """The requirements `record` does not meet ("reply_text", "think_tags|think_text")."""
        return ["|".join(alts) for alts in self.needs if not any(filled(record.get(f)) for f in alts)]

    def supported_by(self, record: Mapping[str, Any]) -> bool:
        return not self.missing(record)


def _needs(*requirements: str | tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    return tuple((r,) if isinstance(r, str) else tuple(r) for r in requirements)


def _label_task(tag: str) -> Task:
    """`[<TRANSCRIBE>] <LABEL> [<LABEL> ...]`: speech, (the transcript,) each label."""
    words = tag.split()
    transcribes = words[0] == TRANSCRIBE
    labels = tuple(LABEL_TAGS[w] for w in words[transcribes:])
    return Task(
        tag=tag,
        needs=_needs("audio", *(("transcript",) if transcribes else ()), *labels),
        output=TEXT_LABEL if transcribes else LABEL,
        prompt=UNDERSTAND,
        labels=labels,
    )


# The table, in vocab.TASK_TAGS order.
TASKS: dict[str, Task] = {
    t.tag: t
    for t in (
        Task("<TRANSCRIBE>", _needs("audio", "transcript"), TEXT, UNDERSTAND),
        Task("<TRANSCRIBE> <ALIGN>", _needs("audio", "transcript", "words"), TEXT, UNDERSTAND),
        _label_task("<CAPTION>"),
        _label_task("<EMOTION>"),
        _label_task("<STYLE>"),
        _label_task("<GENDER>"),
        _label_task("<AGE>"),
        _label_task("<TRANSCRIBE> <AGE> <GENDER>"),
        _label_task("<TRANSCRIBE> <EMOTION>"),
        Task("<S2TCHAT>", _needs("audio", "reply_text"), TEXT, S2T_CHAT, instruction=False),
        Task("<S2TCHAT> <THINK>", _needs("audio", "reply_text", REASONING_FORMS), TEXT, S2T_THINK,
             reasons=True, instruction=False),
        Task("<S2TCHAT> <TEXT2TOKEN>", _needs("audio", "reply_text", REPLY_SPEECH), TEXT_SPEECH, S2S,
             speaks=True, instruction=False),
        Task("<S2TCHAT> <TEXT2TOKEN> <THINK>", _needs("audio", "reply_text", REASONING_FORMS, REPLY_SPEECH),
             TEXT_SPEECH, S2S_THINK, reasons=True, speaks=True, instruction=False),
        Task("<TEXT2TOKEN>", _needs("reply_text", REPLY_SPEECH), SPEECH, TTS, input=TEXT_INPUT,
             speaks=True, user_text="reply_text", instruction=False),
        Task("<TEXT2TEXT>", _needs("transcript", "reply_text"), TEXT, T2T, input=TEXT_INPUT,
             user_text="transcript", instruction=False),
        # Speaks when the record has the reply's speech (then the speech-to-speech system prompt).
        Task("<HISTORY>", _needs("audio", "reply_text", "history"), TEXT, S2T_CHAT, speaks_optionally=True,
             speech_prompt=S2S, instruction=False, history=True),
    )
}
if tuple(TASKS) != vocab.TASK_TAGS:  # the table and the vocabulary are one list
    raise AssertionError(f"schemas/tasks.py TASKS {tuple(TASKS)} != vocab.TASK_TAGS {vocab.TASK_TAGS}")

# Other names of the table's tasks -> our tag; `task()` resolves them. OSUM-EChat's names, as its
# processor.py `tokenize` renames them:
ALIASES: dict[str, str] = {
    "<S2TCHAT> <THINKER>": "<S2TCHAT> <THINK>",  # OSUM's speech-to-text reasoning task
    "<Speech2TEXTandTOKEN>": "<S2TCHAT> <TEXT2TOKEN>",  # OSUM's older name of speech-to-speech
    "<S2TCHAT> <TEXT2TOKEN> <EMOTION>": "<S2TCHAT> <TEXT2TOKEN>",
    "<S2TCHAT> <TEXT2TOKEN> <HISTORY>": "<HISTORY>",  # OSUM's name of the multi-turn task
}


def _tag_words() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for tag in vocab.TASK_TAGS:
        for word in tag.split():
            seen.setdefault(word, None)
    return tuple(seen)


# Each tag word of vocab.TASK_TAGS once, in first-seen order ("<S2TCHAT> <THINK>" -> 2 words).
TAG_WORDS: tuple[str, ...] = _tag_words()
# The tags whose user turn carries no instruction by default (the dialogue and TTS tasks).
UNINSTRUCTED_TAGS: tuple[str, ...] = tuple(tag for tag, t in TASKS.items() if not t.instruction)


class UnknownTaskError(KeyError, ValueError):
    """A task tag that is neither in the table nor a label combination; names it and the known ones."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def normalize(tag: str) -> str:
    """`"<TRANSCRIBE><AGE>  <GENDER>"` -> `"<TRANSCRIBE> <AGE> <GENDER>"` (one space between tags).

    ValueError for a string that is not tags at all.
    """
    words = tag.replace(">", "> ").split() if isinstance(tag, str) else []
    if not words or not all(w.startswith("<") and w.endswith(">") and len(w) > 2 for w in words):
        raise ValueError(f"not a task tag string: {tag!r} (expected tags such as '<TRANSCRIBE> <AGE>')")
    return " ".join(words)


def is_label_task(tag: str) -> bool:
    """Understanding tasks: an optional <TRANSCRIBE>, then one or more distinct label tags."""
    words = normalize(tag).split()
    if words[0] == TRANSCRIBE:
        words = words[1:]
    return bool(words) and all(w in LABEL_TAGS for w in words) and len(set(words)) == len(words)


def is_known(tag: str) -> bool:
    """A tag of the table or a label combination (in any spacing)."""
    tag = normalize(tag)
    return tag in TASKS or is_label_task(tag)


def task(tag: str) -> Task:
    """The table's entry for `tag` (any spacing), or the composed entry of a label combination.

    UnknownTaskError (a KeyError) naming the tag and the known ones for any other tag; ValueError
    for a string that is not tags at all.
    """
    return _task(normalize(tag))


@lru_cache(maxsize=256)
def _task(tag: str) -> Task:
    if tag in TASKS:
        return TASKS[tag]
    if tag in ALIASES:
        return TASKS[ALIASES[tag]]
    if is_label_task(tag):
        return _label_task(tag)
    raise UnknownTaskError(
        f"unknown task {tag!r}: known tags are {', '.join(vocab.TASK_TAGS)}, or an optional {TRANSCRIBE} "
        f"followed by distinct label tags ({' '.join(LABEL_TAGS)})"
    )


def chat_task(*, reasons: bool, speaks: bool, history: bool = False) -> Task:
    """The dialogue task on the user's speech with these traits: `<S2TCHAT>` [`<TEXT2TOKEN>`]
    [`<THINK>`], or with `history` the multi-turn `<HISTORY>` (which may speak, and never reasons).

    UnknownTaskError when no task of the table has them.
    """
    for t in TASKS.values():
        if not (t.replies and t.input == SPEECH_INPUT and t.history == history and t.reasons == reasons):
            continue
        if t.speaks == speaks or t.speaks_optionally:
            return t
    traits = ["reasons" if reasons else "does not reason", "speaks" if speaks else "replies in text"]
    traits.append("takes earlier turns" if history else "takes no earlier turns")
    raise UnknownTaskError(f"no dialogue task on speech that {', '.join(traits)}")


def filled(value: Any) -> bool:
    """A value that holds something: not None, not blank text, not an empty list / dict / bytes
    (a dict such as the audio struct holds something when one of its values does)."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, Mapping):
        return any(filled(v) for v in value.values())
    if hasattr(value, "__len__"):
        return len(value) > 0
    return True


def tasks_a_record_supports(record: Mapping[str, Any]) -> list[str]:
    """The tags of the table (vocab.TASK_TAGS order) whose needs `record` meets."""
    return [tag for tag, t in TASKS.items() if t.supported_by(record)]


def record_task(record: Mapping[str, Any]) -> str:
    """The task tag a built corpus row serves, from what it holds.

    A row with a reply serves the speech dialogue task that matches it: with a reasoning form it
    reasons, with the reply's speech (tokens or audio) it speaks (`<S2TCHAT> <TEXT2TOKEN> <THINK>`
    when it has both, vocab.DEFAULT_RECORD_TASK). A row with a reply and earlier turns (`history`)
    serves the multi-turn `<HISTORY>` (which never reasons). A row without a reply serves
    `<TRANSCRIBE>`.
    """
    if not filled(record.get("reply_text")):
        return TRANSCRIBE
    speaks = any(filled(record.get(f)) for f in REPLY_SPEECH)
    if filled(record.get("history")):
        return chat_task(reasons=False, speaks=speaks, history=True).tag
    reasons = any(filled(record.get(f)) for f in REASONING_FORMS)
    return chat_task(reasons=reasons, speaks=speaks).tag
