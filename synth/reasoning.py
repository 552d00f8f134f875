"""The two forms of the reasoning trace that precedes a reply (OSUM-EChat "dual thinking").

Pure functions over the cues of a user turn: the template engine writes both forms, and the
OpenAI-compatible LLM backend reuses them to build prompts and `parse_tag_form` to read a model's
output back.

Tag form. What the OSUM-EChat repository (ASLP-lab/OSUM, folder OSUM-EChat) shows of it:
- `wenet/dataset/process/processor.py` (tokenize) builds the target of the tasks
  `<S2TCHAT> <TEXT2TOKEN> <THINK>` and `<S2TCHAT> <THINKER>` as
  `f'<think>{think_str}<think end>{txt}'`, with `think_str` taken from the sample's `extra`;
  the unknown label is `unk_tag = "<&&>"`; answer emotions are upper case in angle brackets
  (`answer_emotion_tags = {"<ANGER>", ..., "<WORRIED>", ..., "<NEUTRAL>"}`); and
  `process_text2` deletes the spaces around `<` and `>` before tokenising (so `Age: <adult>` is
  trained as `Age:<adult>`; the parser below accepts both).
- Its README ("Label-Based CoT") says the model "first outputs the transcription text ... then
  sequentially outputs predefined paralinguistic labels such as age, gender, speech events, and
  emotion". The published sample data (`common_utils/fake_data/raw/data.list`) only carries the
  natural-language form, so the exact field spelling is not public. The field names and their
  order are DESIGN.md's, the project's spec: "User's words", "Age", "Gender", "Emotion",
  "Sound event", "Reply emotion" (DESIGN puts emotion before the sound event, where the README's
  sentence lists events first; every trace we write follows DESIGN, and `parse_tag_form` accepts
  the fields in any order, so a model or LLM that writes the README's order is still read).
A turn the event labeler heard nothing in has `Sound event: <none>` (the lower-case `<none>` is
among the `none_tags` that processor.py recognises); an events label nobody produced is `<&&>`.

Natural-language form: a short paragraph in the user's language over what was said and how; a
label with a low score is hedged ("seems", "might") rather than stated as fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from echat.labelers.text_match import has_cjk
from echat.schemas import vocab

THINK_START = "<think>"
THINK_END = "<think end>"
UNKNOWN = vocab.UNKNOWN_PLACEHOLDER  # "<&&>"
NO_EVENT = "none"  # `Sound event: <none>`: the event labeler ran and heard nothing

# (field name in the trace, attribute of TagThink), in the order they are written.
TAG_FIELDS: tuple[tuple[str, str], ...] = (
    ("Age", "age"),
    ("Gender", "gender"),
    ("Emotion", "emotion"),
    ("Sound event", "events"),
    ("Reply emotion", "reply_emotion"),
)
WORDS_FIELD = "User's words"

# Confidence levels of a label, by score. A label from the manifest with no score is taken as sure;
# any other label without a score is "likely" (stated with "seems"), never a plain fact.
SURE_SCORE = 0.8
LIKELY_SCORE = 0.5

# Speaking-rate bounds for "speaks quickly / slowly": words per second (en), characters (zh).
PACE_BOUNDS = {"en": (1.7, 3.4), "zh": (2.5, 5.5)}


class ThinkParseError(ValueError):
    """A reasoning trace that is not in the tag form."""


@dataclass(frozen=True)
class Label:
    """One paralinguistic label with its confidence and the model that produced it."""

    value: str | None = None
    score: float | None = None
    model: str | None = None


@dataclass(frozen=True)
class EventsLabel:
    """Vocal events: `values` None means unknown (no labeler ran), () means none heard."""

    values: tuple[str, ...] | None = None
    score: float | None = None
    model: str | None = None


@dataclass(frozen=True)
class Cues:
    """What the reasoning is about: the words and how they were said."""

    transcript: str
    language: str = "en"
    transcript_confidence: float | None = None
    age: Label = field(default_factory=Label)
    gender: Label = field(default_factory=Label)
    emotion: Label = field(default_factory=Label)
    events: EventsLabel = field(default_factory=EventsLabel)
    style: Label = field(default_factory=Label)
    speaking_rate: float | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Cues":
        def label(name: str) -> Label:
            return Label(record.get(name), record.get(f"{name}_score"), record.get(f"{name}_model"))

        events = record.get("events")
        if events is None or (not events and not record.get("events_model")):
            # An empty list that no labeler vouched for is as good as unknown.
            events_label = EventsLabel(None, record.get("events_score"), record.get("events_model"))
        else:
            events_label = EventsLabel(tuple(events), record.get("events_score"), record.get("events_model"))
        transcript = record.get("transcript") or ""
        return cls(
            transcript=transcript,
            language=record.get("language") or guess_language(transcript),
            transcript_confidence=record.get("transcript_confidence"),
            age=label("age"),
            gender=label("gender"),
            emotion=label("emotion"),
            events=events_label,
            style=label("style"),
            speaking_rate=record.get("speaking_rate"),
        )


@dataclass(frozen=True)
class TagThink:
    """A parsed tag-form trace. None is an unknown label (`<&&>`); events () is `<none>`."""

    words: str
    age: str | None
    gender: str | None
    events: tuple[str, ...] | None
    emotion: str | None
    reply_emotion: str | None
    reply: str = ""  # text after `<think end>`, when the parsed string had any


def guess_language(text: str) -> str:
    """'zh' when the text holds Chinese characters, else 'en' (the only two languages we speak)."""
    return "zh" if has_cjk(text) else "en"


def clean_words(text: str) -> str:
    """The transcript as written into a trace: one line, no angle brackets (they delimit labels)."""
    text = re.sub(r"[<>]", " ", text or "")
    return re.sub(r"\s+", " ", text).strip()


# ---------------------------------------------------------------------------------------------
# tag form


def _tag(value: str | None, upper: bool = False) -> str:
    if not value:
        return UNKNOWN
    return f"<{value.upper() if upper else value}>"


def _events_tag(events: tuple[str, ...] | None) -> str:
    if events is None:
        return UNKNOWN
    if not events:
        return f"<{NO_EVENT}>"
    return "".join(f"<{e}>" for e in events)


def tag_form(cues: Cues, reply_emotion: str | None) -> str:
    """`<think>User's words: ...; Age: <adult>; Gender: <female>; Emotion: <sad>;
    Sound event: <cough>; Reply emotion: <WORRIED><think end>`, unknown labels as `<&&>`."""
    values = {
        "age": _tag(cues.age.value),
        "gender": _tag(cues.gender.value),
        "events": _events_tag(cues.events.values),
        "emotion": _tag(cues.emotion.value),
        "reply_emotion": _tag(reply_emotion, upper=True),
    }
    parts = [f"{WORDS_FIELD}: {clean_words(cues.transcript)}"]
    parts += [f"{name}: {values[attr]}" for name, attr in TAG_FIELDS]
    return f"{THINK_START}{'; '.join(parts)}{THINK_END}"


_FIELD_NAMES = {name.lower(): attr for name, attr in TAG_FIELDS}
# A field starts at "; Name:" followed by a tag; requiring the "<" keeps a transcript that merely
# contains "; age:" from being cut.
_FIELD_START = re.compile(
    r";\s*(" + "|".join(re.escape(name) for name, _ in TAG_FIELDS) + r")\s*:\s*(?=<)", re.IGNORECASE
)
_WORDS_START = re.compile(r"^\s*User'?s\s+words\s*:\s*", re.IGNORECASE)
_TAGS_ONLY = re.compile(r"^(\s*<[^<>]*>\s*)+$")


def split_think(text: str) -> tuple[str | None, str]:
    """(`<think>...<think end>` body or None, the reply after it) of a model's output."""
    start = text.find(THINK_START)
    end = text.find(THINK_END, start + len(THINK_START)) if start >= 0 else -1
    if start < 0 or end < 0:
        return None, text.strip()
    return text[start + len(THINK_START) : end], text[end + len(THINK_END) :].strip()


def parse_tag_form(text: str, *, strict: bool = True) -> TagThink:
    """Read a tag-form trace (alone, or followed by the reply) back into labels.

    Accepts the spacing OSUM's tokenizer leaves (`Age:<adult>`) and fields in any order. With
    `strict`, every field must be present once with a label from the vocabularies; without it,
    missing fields are unknown and unknown labels are kept as written.
    """
    body, reply = split_think(text)
    if body is None:
        raise ThinkParseError(f"no {THINK_START}...{THINK_END} in {text[:120]!r}")
    words_match = _WORDS_START.match(body)
    if not words_match:
        raise ThinkParseError(f"trace does not start with {WORDS_FIELD!r}: {body[:120]!r}")
    starts = list(_FIELD_START.finditer(body, words_match.end()))
    words_end = starts[0].start() if starts else len(body)
    words = body[words_match.end() : words_end].strip()

    found: dict[str, str] = {}
    for i, match in enumerate(starts):
        attr = _FIELD_NAMES[match.group(1).lower()]
        raw = body[match.end() : starts[i + 1].start() if i + 1 < len(starts) else len(body)]
        raw = raw.strip().rstrip(";").strip()
        if attr in found:
            raise ThinkParseError(f"field {match.group(1)!r} appears twice")
        if not _TAGS_ONLY.match(raw):
            if strict:
                raise ThinkParseError(f"field {match.group(1)!r} is not a <label>: {raw[:60]!r}")
            # Lenient: keep the leading tags, drop what follows (a trailing "; ..." the model added).
            leading = re.match(r"(\s*<[^<>]*>)+", raw)
            if not leading:
                continue
            raw = leading.group(0)
        found[attr] = raw
    if strict:
        missing = [name for name, attr in TAG_FIELDS if attr not in found]
        if missing:
            raise ThinkParseError(f"trace lacks field(s): {', '.join(missing)}")

    def labels(attr: str) -> list[str]:
        return re.findall(r"<([^<>]*)>", found.get(attr, UNKNOWN))

    def single(attr: str, allowed: tuple[str, ...], upper: bool = False) -> str | None:
        tags = labels(attr)
        if len(tags) != 1:
            raise ThinkParseError(f"{attr} holds {len(tags)} labels, expected one: {found.get(attr)!r}")
        value = tags[0].strip()
        if f"<{value}>" == UNKNOWN:
            return None
        value = value.upper() if upper else value.lower()
        if strict and value not in allowed:
            raise ThinkParseError(f"{attr} label {value!r} is not one of {', '.join(allowed)}")
        return value

    event_tags = [t.strip().lower() for t in labels("events")]
    events: tuple[str, ...] | None
    if not event_tags or f"<{event_tags[0]}>" == UNKNOWN:
        events = None
    elif event_tags == [NO_EVENT]:
        events = ()
    else:
        if strict:
            bad = [e for e in event_tags if e not in vocab.EVENTS]
            if bad:
                raise ThinkParseError(f"sound event label(s) {bad} not in {', '.join(vocab.EVENTS)}")
        events = tuple(event_tags)
    return TagThink(
        words=words,
        age=single("age", vocab.AGES),
        gender=single("gender", vocab.GENDERS),
        events=events,
        emotion=single("emotion", vocab.EMOTIONS),
        reply_emotion=single("reply_emotion", vocab.REPLY_EMOTIONS, upper=True),
        reply=reply,
    )


# ---------------------------------------------------------------------------------------------
# natural-language form


@lru_cache(maxsize=1)
def _phrases() -> dict[str, Any]:
    text = resources.files("echat.synth").joinpath("templates/think_phrases.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def confidence_level(score: float | None, model: str | None) -> str:
    """'sure', 'likely' or 'unsure': how firmly the trace may state a label."""
    if score is None:
        return "sure" if model == "manifest" else "likely"
    if score >= SURE_SCORE:
        return "sure"
    if score >= LIKELY_SCORE:
        return "likely"
    return "unsure"


def _min_level(*levels: str) -> str:
    order = ("unsure", "likely", "sure")
    return min(levels, key=order.index)


def natural_form(cues: Cues, reply_emotion: str | None, *, topic: str | None = None) -> str:
    """`<think>` a short paragraph on what was said and how it was said `<think end>`.

    `topic` is a name for what the user talks about, in the user's language ("exams", "考试").
    """
    language = cues.language if cues.language in ("en", "zh") else guess_language(cues.transcript)
    p = _phrases()[language]
    sentences: list[str] = []

    words = clean_words(cues.transcript)
    unsure_words = cues.transcript_confidence is not None and cues.transcript_confidence < LIKELY_SCORE
    said = (p["said_unsure"] if unsure_words else p["said"]).format(words=words)
    if not re.search(r"[.!?。！？…]$", words):
        said += "。" if language == "zh" else "."
    sentences.append(said)
    if topic:
        sentences.append(p["topic"].format(topic=topic))

    emotion = cues.emotion
    if emotion.value and emotion.value in p["emotion_words"]:
        level = confidence_level(emotion.score, emotion.model)
        sentences.append(p["emotion"][level].format(emotion=p["emotion_words"][emotion.value]))
    else:
        sentences.append(p["emotion"]["unknown"])

    events = cues.events.values
    if events:
        level = confidence_level(cues.events.score, cues.events.model)
        names = p["events_joiner"].join(p["event_words"].get(e, e) for e in events)
        meaning = next((p["event_meaning"][e] for e in events if p["event_meaning"].get(e)), "")
        sentences.append(p["events"][level].format(events=names, meaning=meaning))

    age, gender = cues.age, cues.gender
    if age.value or gender.value:
        who = p["who"][age.value or "unknown"].get(gender.value or "unknown")
        if who:
            levels = [confidence_level(l.score, l.model) for l in (age, gender) if l.value]
            sentences.append(p["speaker"][_min_level(*levels)].format(who=who))

    if cues.speaking_rate is not None:
        slow, fast = PACE_BOUNDS[language]
        if cues.speaking_rate > fast:
            sentences.append(p["pace"]["fast"])
        elif 0 < cues.speaking_rate < slow:
            sentences.append(p["pace"]["slow"])

    if reply_emotion:
        sentences.append(p["plan"].format(how=p["how"].get(reply_emotion, p["how"]["NEUTRAL"])))
    if age.value == "child":
        sentences[-1] += p["child_plan"]

    joiner = "" if language == "zh" else " "
    return f"{THINK_START}{joiner.join(sentences)}{THINK_END}"
