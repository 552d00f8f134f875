"""The reasoning-trace format of OSUM-EChat "dual thinking": markers, the tag form and its readers.

Defined once, torch-free, for both sides that meet over it: synth/ writes traces (the tag form
through `build_tag_form`, the natural-language phrasing in synth/reasoning.py), model/ trains on
them, splits a model's output into reasoning and reply and scores the labels a trace names.

Every trace is `<think>{body}<think end>` and the reply follows it. OSUM's `processor.py`
(tokenize) builds the reasoning targets as `f'<think>{think_str}<think end>{txt}'`; `<think>` and
`<think end>` are plain text to its tokenizer.

Tag form (DESIGN.md "Compatibility with OSUM / OSUM-EChat"):
`<think>User's words: ...; Age: <adult>; Gender: <female>; Emotion: <sad>; Sound event: <cough>;
Reply emotion: <WORRIED><think end>`. The field names and their order are DESIGN.md's (OSUM's
public sample data carries only the natural-language form, so its spelling is not public); the
readers accept the fields in any order and the spacing OSUM's tokenizer leaves (`process_text2`
deletes the spaces around `<` and `>`: `Age:<adult>`). An unknown label is the placeholder `<&&>`
(`unk_tag` in processor.py; the model masks it from the loss); a turn the event labeler heard
nothing in has `Sound event: <none>` (lower-case `<none>` is among processor.py's `none_tags`).
Labels are lower case, the reply emotion upper case (`answer_emotion_tags`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from echat.schemas import vocab

THINK_START = "<think>"
THINK_END = "<think end>"
UNKNOWN = vocab.UNKNOWN_PLACEHOLDER  # "<&&>"
NO_EVENT = "none"  # `Sound event: <none>`: the event labeler ran and heard nothing

WORDS_FIELD = "User's words"
# (field name in the trace, attribute of TagThink), in the order they are written.
TAG_FIELDS: tuple[tuple[str, str], ...] = (
    ("Age", "age"),
    ("Gender", "gender"),
    ("Emotion", "emotion"),
    ("Sound event", "events"),
    ("Reply emotion", "reply_emotion"),
)
# The vocabulary each labelled field takes its labels from.
FIELD_VOCABS: dict[str, tuple[str, ...]] = {
    "age": vocab.AGES,
    "gender": vocab.GENDERS,
    "emotion": vocab.EMOTIONS,
    "events": vocab.EVENTS,
    "reply_emotion": vocab.REPLY_EMOTIONS,
}


class ThinkParseError(ValueError):
    """A reasoning trace that is not in the tag form."""


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


def clean_words(text: str | None) -> str:
    """The transcript as written into a trace: one line, no angle brackets (they delimit labels)."""
    text = re.sub(r"[<>]", " ", text or "")
    return re.sub(r"\s+", " ", text).strip()


def wrap_think(body: str) -> str:
    """`<think>{body}<think end>`."""
    return f"{THINK_START}{body}{THINK_END}"


# ---------------------------------------------------------------------------------------------
# splitting a text into reasoning and reply


def _locate(text: str) -> tuple[int, int, int, bool] | None:
    """(body start, body end, reply start, closed) of the first trace, or None when there is none.

    An opened trace that never closes ends with the text, and its reply is empty (see split_think).
    """
    start = text.find(THINK_START)
    if start < 0:
        return None
    body_start = start + len(THINK_START)
    end = text.find(THINK_END, body_start)
    if end < 0:
        return body_start, len(text), len(text), False
    return body_start, end, end + len(THINK_END), True


def split_think(text: str) -> tuple[str | None, str]:
    """(the reasoning without its markers, or None; the reply after it), both stripped.

    Text with no `<think>` is all reply: (None, text). Text before `<think>` is dropped.
    An opened but unclosed trace (`<think>` with no `<think end>` after it) is ALL REASONING and the
    reply is empty: every reasoning target is written `<think>...<think end>reply`, so a model that
    has not yet written `<think end>` has not started its reply; an output cut off there (a token
    budget, a stop) would otherwise show or speak the model's reasoning as its answer.
    """
    where = _locate(text)
    if where is None:
        return None, text.strip()
    body_start, body_end, reply_start, _closed = where
    return text[body_start:body_end].strip(), text[reply_start:].strip()


# ---------------------------------------------------------------------------------------------
# tag form: writing


def label_tag(value: str | None, *, upper: bool = False) -> str:
    """`<adult>` (`<WORRIED>` with `upper`), or `<&&>` for an unknown label."""
    if not value:
        return UNKNOWN
    return f"<{value.upper() if upper else value}>"


def events_tag(events: tuple[str, ...] | list[str] | None) -> str:
    """`<cough><laugh>`; `<none>` for nothing heard (an empty list); `<&&>` for unknown (None)."""
    if events is None:
        return UNKNOWN
    if not events:
        return f"<{NO_EVENT}>"
    return "".join(f"<{e}>" for e in events)


def build_tag_form(
    words: str | None,
    *,
    age: str | None = None,
    gender: str | None = None,
    emotion: str | None = None,
    events: tuple[str, ...] | list[str] | None = None,
    reply_emotion: str | None = None,
) -> str:
    """The tag-form trace of these labels, with its markers; an unknown label (None) is `<&&>`.

    `words` is the user's transcript (cleaned by `clean_words`); `events` None is unknown and ()
    is "none heard".
    """
    values = {
        "age": label_tag(age),
        "gender": label_tag(gender),
        "emotion": label_tag(emotion),
        "events": events_tag(events),
        "reply_emotion": label_tag(reply_emotion, upper=True),
    }
    parts = [f"{WORDS_FIELD}: {clean_words(words)}"]
    parts += [f"{name}: {values[attr]}" for name, attr in TAG_FIELDS]
    return wrap_think("; ".join(parts))


# ---------------------------------------------------------------------------------------------
# tag form: reading

_FIELD_NAMES = {name.lower(): attr for name, attr in TAG_FIELDS}


def _name_pattern(name: str) -> str:
    return r"\s+".join(re.escape(word) for word in name.split())


_NAMES = "|".join(_name_pattern(name) for name, _ in TAG_FIELDS)
# A field starts at "; Name:" followed by a tag; requiring the "<" keeps a transcript that merely
# contains "; age:" from being cut.
_FIELD_START = re.compile(r";\s*(" + _NAMES + r")\s*:\s*(?=<)", re.IGNORECASE)
# Lenient: a field name anywhere, its colon, then one or more tags.
_FIELD_ANYWHERE = re.compile(r"\b(" + _NAMES + r")\s*:\s*((?:\s*<[^<>]*>)+)", re.IGNORECASE)
_WORDS_START = re.compile(r"^\s*User'?s\s+words\s*:\s*", re.IGNORECASE)
_TAGS_ONLY = re.compile(r"^(\s*<[^<>]*>\s*)+$")
_TAG = re.compile(r"<([^<>]*)>")


def _attr_of(name: str) -> str:
    return _FIELD_NAMES[" ".join(name.lower().split())]


def tag_form_labels(text: str | None) -> dict[str, tuple[str, ...]]:
    """Lenient reader: TagThink attribute -> the label(s) each field of `text` names, as written.

    The field names of TAG_FIELDS are looked for anywhere (a trace with or without its markers,
    words or not, any order, any case); the first occurrence of a field counts. Labels are the
    contents of its tags, stripped, unvalidated (`<&&>` gives "&&"). For scoring a model's answer,
    where `parse_tag_form` would refuse a trace that is only partly right.
    """
    found: dict[str, tuple[str, ...]] = {}
    # The markers are tags in shape: keep `<think end>` from reading as a label of the last field.
    text = (text or "").replace(THINK_START, "\n").replace(THINK_END, "\n")
    for name, tags in _FIELD_ANYWHERE.findall(text):
        found.setdefault(_attr_of(name), tuple(t.strip() for t in _TAG.findall(tags)))
    return found


def reply_emotion_of(trace: str | None) -> str | None:
    """The reply emotion a tag-form trace names (`Reply emotion: <WORRIED>`, any case or spacing),
    when it is one of vocab.REPLY_EMOTIONS; None for `<&&>`, another label, or a natural-language
    trace. `trace` may be the body, the marked trace or a whole output with its reply."""
    labels = tag_form_labels(trace).get("reply_emotion")
    if not labels:
        return None
    value = labels[0].upper()
    return value if value in vocab.REPLY_EMOTIONS else None


def parse_tag_form(text: str, *, strict: bool = True) -> TagThink:
    """Read a tag-form trace (alone, or followed by the reply) back into labels.

    Accepts the spacing OSUM's tokenizer leaves (`Age:<adult>`) and fields in any order. With
    `strict`, the trace must be closed and every field present once with a label from the
    vocabularies; without it, missing fields are unknown, labels are kept as written, and an
    unclosed trace (a cut-off output) is read as far as it goes (split_think's rule).
    """
    where = _locate(text)
    if where is None:
        raise ThinkParseError(f"no {THINK_START}...{THINK_END} in {text[:120]!r}")
    if strict and not where[3]:
        raise ThinkParseError(f"trace opened with {THINK_START} is never closed with {THINK_END}: {text[:120]!r}")
    body, reply = split_think(text)
    body = body or ""
    words_match = _WORDS_START.match(body)
    if not words_match:
        raise ThinkParseError(f"trace does not start with {WORDS_FIELD!r}: {body[:120]!r}")
    starts = list(_FIELD_START.finditer(body, words_match.end()))
    words_end = starts[0].start() if starts else len(body)
    words = body[words_match.end() : words_end].strip()

    found: dict[str, str] = {}
    for i, match in enumerate(starts):
        attr = _attr_of(match.group(1))
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
        return _TAG.findall(found.get(attr, UNKNOWN))

    def single(attr: str, upper: bool = False) -> str | None:
        tags = labels(attr)
        if len(tags) != 1:
            raise ThinkParseError(f"{attr} holds {len(tags)} labels, expected one: {found.get(attr)!r}")
        value = tags[0].strip()
        if f"<{value}>" == UNKNOWN:
            return None
        value = value.upper() if upper else value.lower()
        allowed = FIELD_VOCABS[attr]
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
        age=single("age"),
        gender=single("gender"),
        events=events,
        emotion=single("emotion"),
        reply_emotion=single("reply_emotion", upper=True),
        reply=reply,
    )
