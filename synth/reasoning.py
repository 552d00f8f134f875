"""The reasoning trace that precedes a reply (OSUM-EChat "dual thinking"), written from a turn's cues.

Pure functions over the cues of a user turn: the template engine writes both forms of the trace.
The format itself (the `<think>` markers, the tag form's fields, `<&&>` for an unknown label, the
parsers) is defined once in schemas/reasoning.py; this module turns `Cues` into it:

- tag form: `tag_form(cues, reply_emotion)`, the labels of the cues through
  `schemas.reasoning.build_tag_form`;
- natural-language form: a short paragraph in the user's language over what was said and how; a
  label with a low score is hedged ("seems", "might") rather than stated as fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

from echat.schemas.reasoning import build_tag_form, clean_words, wrap_think
from echat.schemas.text import has_cjk

# Confidence levels of a label, by score. A label from the manifest with no score is taken as sure;
# any other label without a score is "likely" (stated with "seems"), never a plain fact.
SURE_SCORE = 0.8
LIKELY_SCORE = 0.5

# Speaking-rate bounds for "speaks quickly / slowly": words per second (en), characters (zh).
PACE_BOUNDS = {"en": (1.7, 3.4), "zh": (2.5, 5.5)}


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


def guess_language(text: str) -> str:
    """'zh' when the text holds Chinese characters, else 'en' (the only two languages we speak)."""
    return "zh" if has_cjk(text) else "en"


# ---------------------------------------------------------------------------------------------
# tag form


def tag_form(cues: Cues, reply_emotion: str | None) -> str:
    """`<think>User's words: ...; Age: <adult>; Gender: <female>; Emotion: <sad>;
    Sound event: <cough>; Reply emotion: <WORRIED><think end>`, unknown labels as `<&&>`."""
    return build_tag_form(
        cues.transcript,
        age=cues.age.value,
        gender=cues.gender.value,
        emotion=cues.emotion.value,
        events=cues.events.values,
        reply_emotion=reply_emotion,
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
    return wrap_think(joiner.join(sentences))
