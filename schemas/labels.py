"""Label normalisation: one alias table per closed-vocabulary field of the record.

Every field of `record.FIELDS` with `allowed` set (language, gender, age, emotion, events, style,
reply_emotion, task) is normalised here and nowhere else: the manifest reader (pipelines/sources.py),
the stage wrapper (every record a stage outputs) and the model's loader of OSUM raw lists
(model/data_sources.py) all go through `normalise`, so a spelling accepted in one place is accepted
in all of them.

Matching is forgiving about form, strict about meaning:
  - case, surrounding spaces, runs of spaces, `_` and `-` do not matter (`Throat-Clearing`,
    `throat clearing` and `THROAT_CLEARING` are all `throat_clearing`; `News/Science` is
    `news/science`);
  - one pair of angle brackets around a label is dropped first, so OSUM's `<ADULT>`/`<FEMALE>`
    forms map like `adult`/`female`;
  - then the value must be a canonical value or one of the field's aliases below; anything else
    raises `LabelError` naming the field, the value and the allowed set.
The canonical spelling is the vocabulary's own: lower case for the user-turn labels, upper case for
`reply_emotion`, `<TAG> <TAG>` (one space between tags) for `task`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .record import FIELDS, STRINGS

# The closed vocabulary of each field, as the record declares it.
VOCABULARIES: dict[str, tuple[str, ...]] = {f.name: f.allowed for f in FIELDS if f.allowed is not None}
LABEL_FIELDS: tuple[str, ...] = tuple(VOCABULARIES)
LIST_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.allowed is not None and f.kind == STRINGS)  # events

# Other spellings of a canonical value (any case, `_`/`-`/space alike), per field.
ALIASES: dict[str, dict[str, str]] = {
    "gender": {"m": "male", "man": "male", "f": "female", "woman": "female"},
    "age": {
        "elderly": "old", "senior": "old", "kid": "child",
        # OSUM's finer age groups
        "youth": "adult", "middle_age": "adult", "middle": "adult",
    },
    "emotion": {
        "angry": "anger", "sadness": "sad", "happiness": "happy", "fearful": "fear",
        "surprised": "surprise", "disgusted": "disgust", "worried": "fear",
    },
    "events": {
        "laughter": "laugh", "laughing": "laugh", "coughing": "cough", "crying": "cry", "scream": "screaming",
        "sighing": "sigh", "sneezing": "sneeze",
    },
    "style": {
        # OSUM's Chinese style names
        "新闻科普": "news/science", "恐怖故事": "horror story", "童话故事": "fairy tale", "客服": "customer service",
        "诗歌散文": "poetry/prose", "有声书": "audiobook", "日常口语": "daily conversation", "其他": "other",
    },
    "language": {
        "english": "en", "en-us": "en", "en-gb": "en", "eng": "en",
        "chinese": "zh", "mandarin": "zh", "zh-cn": "zh", "cmn": "zh",
    },
    "reply_emotion": {
        "angry": "ANGER", "sadness": "SAD", "happiness": "HAPPY", "fearful": "FEAR",
        "surprised": "SURPRISE", "disgusted": "DISGUST",
    },
    "task": {},
    "source_kind": {"recorded": "real", "tts": "synthetic", "synthesized": "synthetic", "synthesised": "synthetic"},
}


class LabelError(ValueError):
    """A value outside its field's vocabulary (after aliases); names the field, the value and the allowed set."""

    def __init__(self, field: str, value: Any, allowed: Iterable[str] | None = None, why: str | None = None):
        self.field = field
        self.value = value
        self.allowed = tuple(allowed if allowed is not None else VOCABULARIES.get(field, ()))
        problem = why or f"is not one of {', '.join(self.allowed)}"
        super().__init__(f"{field} {value!r} {problem}")


def _key(text: str) -> str:
    """The form a label is looked up in: lower case, `_`/`-` as spaces, single spaces."""
    return " ".join(text.casefold().replace("_", " ").replace("-", " ").split())


def _lookup_tables() -> dict[str, dict[str, str]]:
    unknown = sorted(set(ALIASES) ^ set(VOCABULARIES))
    if unknown:
        raise RuntimeError(f"ALIASES and the record's closed fields differ: {unknown}")
    tables: dict[str, dict[str, str]] = {}
    for field, allowed in VOCABULARIES.items():
        table = {_key(value): value for value in allowed}
        for alias, canonical in ALIASES[field].items():
            if canonical not in allowed:
                raise RuntimeError(f"alias {alias!r} of {field} maps to {canonical!r}, not one of {allowed}")
            table[_key(alias)] = canonical
        tables[field] = table
    return tables


_TABLES = _lookup_tables()


def normalise(field: str, value: Any) -> str:
    """The canonical spelling of `value` for `field`; raises LabelError when it has none.

    For `events` this normalises one event name; a record's list goes through `normalise_events`.
    """
    if field not in VOCABULARIES:
        raise KeyError(f"{field!r} has no closed vocabulary (the closed fields are {', '.join(LABEL_FIELDS)})")
    if not isinstance(value, str):
        raise LabelError(field, value, why=f"is a {type(value).__name__}, not a label string")
    if field == "task":
        return _normalise_task(value)
    text = value.strip()
    if len(text) > 2 and text.startswith("<") and text.endswith(">"):  # OSUM's `<ADULT>` form
        text = text[1:-1]
    canonical = _TABLES[field].get(_key(text))
    if canonical is None:
        raise LabelError(field, value)
    return canonical


def _normalise_task(value: str) -> str:
    tags = value.replace(">", "> ").split()
    task = " ".join(t.upper() for t in tags)
    if task not in VOCABULARIES["task"]:
        raise LabelError("task", value)
    return task


def normalise_events(values: Iterable[Any], field: str = "events") -> list[str]:
    """Each event of `values` normalised, each once, in first-seen order; raises LabelError naming a bad one."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise LabelError(field, values, why="must be a list of event names")
    return list(dict.fromkeys(normalise(field, v) for v in values))


def _normalised_value(field: str, value: Any) -> Any:
    if value is None:
        return None
    return normalise_events(value, field) if field in LIST_FIELDS else normalise(field, value)


def normalise_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `record` with every closed-vocabulary field normalised (None stays None).

    Raises LabelError for the first field whose value is outside its vocabulary.
    """
    out = dict(record)
    for field in LABEL_FIELDS:
        if field in out:
            out[field] = _normalised_value(field, out[field])
    return out


def check_record_labels(record: Mapping[str, Any]) -> list[LabelError]:
    """Every closed-vocabulary field of `record` that is neither None nor normalisable, as LabelErrors."""
    problems = []
    for field in LABEL_FIELDS:
        try:
            _normalised_value(field, record.get(field))
        except LabelError as err:
            problems.append(err)
    return problems
