"""The prompts of the LLM reply backend, as versioned data: one YAML file per language.

`synth/prompts/reply_<language>.yaml` holds a prompt set: its `version` (written into every
record's `prompt_version`), the system prompt, the user template, the phrases that describe each
label with its score and origin (and say when it is unknown or weak), the single-label /
multi-label emphasis, the feedback sent back with an unusable answer, and few-shot examples. This
module loads and checks a set and renders the chat messages for one record; it calls no endpoint.

Emphasis (EChat-200K has both kinds): a turn in which at most one cue from the voice is reliable
and salient gets single-label emphasis (that cue dominates the answer, or the words when there is
none); a turn with several gets multi-label emphasis (the cues are answered together). Salient:
an emotion other than neutral/other, vocal events, a child's or an older person's voice, a
speaking style other than daily conversation/other; reliable: a score of at least
`min_label_score`, or no score at all.

Templates use `{name}` placeholders; only the names each template takes are replaced and any other
brace is left as written (JSON in the text needs no escaping); an unknown placeholder is an error
at load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from echat.schemas import vocab
from echat.schemas.stage import MANIFEST

from . import reasoning

PROMPT_FILE = "reply_{language}.yaml"
LABEL_ORDER = ("emotion", "age", "gender", "events", "style")
ANSWER_KEYS = ("think", "reply_emotion", "reply")
HISTORY_KEY = "history"
SINGLE, MULTI, WORDS = "single", "multi", "words"

# What each template may name.
PLACEHOLDERS: dict[str, set[str]] = {
    "system": {"reply_emotions", "history_rule"},
    "history_rule": {"n_exchanges"},
    "user_template": {"transcript", "transcript_note", "labels", "emphasis"},
    "transcript_notes": {"confidence"},
    "labels.known": {"name", "value", "score", "model"},
    "labels.known_no_score": {"name", "value", "model"},
    "labels.weak": {"name", "value", "score", "model"},
    "labels.unknown": {"name"},
    "labels.speaking_rate": {"rate", "pace"},
    "emphasis.single": {"cue"},
    "emphasis.multi": {"cues"},
    "emphasis.words": set(),
    "emphasis.cue_names": {"value", "value_article"},
    "feedback": {"error", "keys"},
}
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


class PromptError(ValueError):
    """A prompt file that does not have the shape the backend needs; names the file and key."""


def fill(template: str, **values: Any) -> str:
    """Replace `{name}` for the names given; every other brace stays as written."""
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]) if m.group(1) in values else m.group(0), template)


@dataclass(frozen=True)
class PromptSet:
    language: str
    version: str
    system: str
    history_rule: str
    user_template: str
    transcript_notes: dict[str, str]
    labels: dict[str, Any]
    emphasis: dict[str, Any]
    feedback: str
    examples: tuple[dict[str, Any], ...]
    source: str  # the file it came from, for error messages


def _check_placeholders(where: str, key: str, text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"{where}: {key} must be a non-empty string")
    allowed = PLACEHOLDERS.get(key, set())
    unknown = sorted(set(_PLACEHOLDER.findall(text)) - allowed)
    if unknown:
        raise PromptError(f"{where}: {key} has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                          f"it takes {', '.join(sorted(allowed)) or 'none'}")
    return text


def _check_example(where: str, i: int, example: Any) -> dict[str, Any]:
    spot = f"{where}: examples[{i}]"
    if not isinstance(example, dict) or not isinstance(example.get("cues"), dict) or not isinstance(example.get("answer"), dict):
        raise PromptError(f"{spot} needs a `cues` mapping (a record's fields) and an `answer` mapping")
    cues, answer = example["cues"], example["answer"]
    if not str(cues.get("transcript") or "").strip():
        raise PromptError(f"{spot}.cues needs a transcript")
    missing = [k for k in ANSWER_KEYS if not str(answer.get(k) or "").strip()]
    if missing:
        raise PromptError(f"{spot}.answer lacks {', '.join(missing)}")
    if answer["reply_emotion"] not in vocab.REPLY_EMOTIONS:
        raise PromptError(f"{spot}.answer.reply_emotion {answer['reply_emotion']!r} is not one of {', '.join(vocab.REPLY_EMOTIONS)}")
    for name in LABEL_ORDER:
        value = cues.get(name)
        allowed = {"emotion": vocab.EMOTIONS, "age": vocab.AGES, "gender": vocab.GENDERS,
                   "events": vocab.EVENTS, "style": vocab.STYLES}[name]
        values = value if isinstance(value, list) else ([] if value is None else [value])
        bad = [v for v in values if v not in allowed]
        if bad:
            raise PromptError(f"{spot}.cues.{name}: {bad} not in {', '.join(allowed)}")
    for j, turn in enumerate(answer.get(HISTORY_KEY) or []):
        if not (isinstance(turn, dict) and str(turn.get("user") or "").strip() and str(turn.get("assistant") or "").strip()):
            raise PromptError(f"{spot}.answer.history[{j}] needs non-empty `user` and `assistant`")
    return example


def load_prompt_set(language: str, folder: str | Path | None = None) -> PromptSet:
    """The prompt set of `language` from `folder` (default: the packaged synth/prompts/), checked."""
    root = Path(folder) if folder else resources.files("echat.synth").joinpath("prompts")
    name = PROMPT_FILE.format(language=language)
    path = root.joinpath(name)
    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except FileNotFoundError:
        raise PromptError(f"prompt file {name} not found in {root}") from None
    where = str(path)
    if not isinstance(data, dict):
        raise PromptError(f"{where}: expected a mapping at the top level")
    for key in ("version", "system", "history_rule", "user_template", "transcript_notes", "labels", "emphasis", "feedback"):
        if key not in data:
            raise PromptError(f"{where}: missing key {key!r}")
    if data.get("language", language) != language:
        raise PromptError(f"{where}: language {data.get('language')!r} in a file named for {language!r}")
    for key in ("system", "history_rule", "user_template", "feedback"):
        _check_placeholders(where, key, data[key])
    notes = data["transcript_notes"]
    if not isinstance(notes, dict) or set(notes) != {"manifest", "model", "unsure"}:
        raise PromptError(f"{where}: transcript_notes needs exactly manifest, model and unsure")
    for key, text in notes.items():
        if not isinstance(text, str):
            raise PromptError(f"{where}: transcript_notes.{key} must be a string")
        _check_placeholders(where, "transcript_notes", text or "-")
    labels = data["labels"]
    for key in ("known", "known_no_score", "weak", "unknown", "speaking_rate"):
        _check_placeholders(where, f"labels.{key}", labels.get(key) if isinstance(labels, dict) else None)
    missing_names = [n for n in (*LABEL_ORDER, "speaking_rate") if n not in (labels.get("names") or {})]
    if missing_names or not labels.get("no_events") or not labels.get("manifest") or set(labels.get("pace") or {}) != {"fast", "slow", "normal"}:
        raise PromptError(f"{where}: labels needs names for {', '.join((*LABEL_ORDER, 'speaking_rate'))}, "
                          "no_events, manifest and pace (fast, slow, normal)")
    emphasis = data["emphasis"]
    for key in (SINGLE, MULTI, WORDS):
        _check_placeholders(where, f"emphasis.{key}", emphasis.get(key) if isinstance(emphasis, dict) else None)
    for key in ("emotion", "events", "age", "style"):
        _check_placeholders(where, "emphasis.cue_names", (emphasis.get("cue_names") or {}).get(key))
    if set(emphasis.get("age_words") or {}) != set(vocab.AGES):
        raise PromptError(f"{where}: emphasis.age_words needs {', '.join(vocab.AGES)}")
    examples = tuple(_check_example(where, i, e) for i, e in enumerate(data.get("examples") or []))
    return PromptSet(
        language=language, version=str(data["version"]), system=data["system"].rstrip(),
        history_rule=data["history_rule"].rstrip(), user_template=data["user_template"].rstrip(),
        transcript_notes=dict(notes), labels=labels, emphasis=emphasis, feedback=data["feedback"].strip(),
        examples=examples, source=where,
    )


# ---------------------------------------------------------------------------------------------
# what the voice says: labels and emphasis


def _reliable(value: Any, score: float | None, min_score: float) -> bool:
    return bool(value) and (score is None or score >= min_score)


def salient_cues(cues: reasoning.Cues, min_score: float) -> list[tuple[str, str]]:
    """(label, value) of the reliable cues worth answering, most telling first."""
    found = []
    if _reliable(cues.events.values, cues.events.score, min_score):
        found.append(("events", ", ".join(cues.events.values or ())))
    if cues.emotion.value not in (None, "neutral", "other") and _reliable(cues.emotion.value, cues.emotion.score, min_score):
        found.append(("emotion", cues.emotion.value))
    if cues.age.value in ("child", "old") and _reliable(cues.age.value, cues.age.score, min_score):
        found.append(("age", cues.age.value))
    if cues.style.value not in (None, "daily conversation", "other") and _reliable(cues.style.value, cues.style.score, min_score):
        found.append(("style", cues.style.value))
    return found


def emphasis_kind(cues: reasoning.Cues, min_score: float) -> str:
    """SINGLE (one cue dominates), MULTI (several together) or WORDS (no reliable cue)."""
    n = len(salient_cues(cues, min_score))
    return MULTI if n >= 2 else SINGLE if n == 1 else WORDS


def _score(score: float | None) -> str:
    return f"{score:.2f}"


def label_lines(ps: PromptSet, cues: reasoning.Cues, min_score: float) -> list[str]:
    """One line per label: its value, score and origin; unknown and weak labels said to be so."""
    phrases = ps.labels
    lines = []
    for name in LABEL_ORDER:
        label = getattr(cues, name)
        shown = phrases["names"][name]
        if name == "events":
            value = None if label.values is None else (", ".join(label.values) if label.values else phrases["no_events"])
        else:
            value = label.value
        if value is None:
            lines.append(fill(phrases["unknown"], name=shown))
            continue
        model = phrases["manifest"] if label.model == MANIFEST else (label.model or "?")
        if label.score is None:
            lines.append(fill(phrases["known_no_score"], name=shown, value=value, model=model))
        elif label.score < min_score:
            lines.append(fill(phrases["weak"], name=shown, value=value, score=_score(label.score), model=model))
        else:
            lines.append(fill(phrases["known"], name=shown, value=value, score=_score(label.score), model=model))
    if cues.speaking_rate is not None and cues.speaking_rate > 0:
        slow, fast = reasoning.PACE_BOUNDS.get(ps.language, reasoning.PACE_BOUNDS["en"])
        pace = "fast" if cues.speaking_rate > fast else "slow" if cues.speaking_rate < slow else "normal"
        lines.append(fill(phrases["speaking_rate"], rate=f"{cues.speaking_rate:.1f}", pace=phrases["pace"][pace]))
    return lines


def emphasis_text(ps: PromptSet, cues: reasoning.Cues, min_score: float) -> str:
    found = salient_cues(cues, min_score)
    names = ps.emphasis["cue_names"]
    ages = ps.emphasis["age_words"]
    described = [fill(names[label], value=value, value_article=ages.get(value, value)) for label, value in found]
    if len(described) >= 2:
        return fill(ps.emphasis[MULTI], cues=("；" if ps.language == "zh" else "; ").join(described))
    if described:
        return fill(ps.emphasis[SINGLE], cue=described[0])
    return ps.emphasis[WORDS]


def transcript_note(ps: PromptSet, record: dict[str, Any]) -> str:
    confidence = record.get("transcript_confidence")
    origin = record.get("transcript_origin")
    if confidence is None or origin == MANIFEST:
        return ps.transcript_notes["manifest"]
    key = "unsure" if confidence < reasoning.LIKELY_SCORE else "model"
    return fill(ps.transcript_notes[key], confidence=_score(confidence))


def user_message(ps: PromptSet, record: dict[str, Any], min_score: float) -> str:
    """The user turn of one record, rendered from the user template."""
    cues = reasoning.Cues.from_record(record)
    return fill(
        ps.user_template,
        transcript=" ".join(str(record.get("transcript") or "").split()),
        transcript_note=transcript_note(ps, record),
        labels="\n".join(label_lines(ps, cues, min_score)),
        emphasis=emphasis_text(ps, cues, min_score),
    )


# ---------------------------------------------------------------------------------------------
# the request


def answer_keys(turns: int) -> tuple[str, ...]:
    return (*ANSWER_KEYS, HISTORY_KEY) if turns > 1 else ANSWER_KEYS


def system_message(ps: PromptSet, turns: int) -> str:
    rule = fill(ps.history_rule, n_exchanges=turns - 1) if turns > 1 else ""
    return fill(ps.system, reply_emotions=", ".join(vocab.REPLY_EMOTIONS), history_rule=rule)


_SPACE_BY_WIDE = re.compile(r"(?<=[^\x00-\x7f])\s+|\s+(?=[^\x00-\x7f])")


def squash(text: str, language: str) -> str:
    """One line; in Chinese no space next to a Chinese character or mark (YAML folding adds them)."""
    text = " ".join(str(text).split())
    return _SPACE_BY_WIDE.sub("", text) if language == "zh" else text


def example_answer(example: dict[str, Any], turns: int, language: str = "en") -> dict[str, Any] | None:
    """An example's answer as the model is asked to give it; None when it holds too few exchanges."""
    answer = {k: squash(example["answer"][k], language) for k in ANSWER_KEYS}
    if turns > 1:
        history = example["answer"].get(HISTORY_KEY) or []
        if len(history) < turns - 1:
            return None
        answer[HISTORY_KEY] = [{"user": t["user"], "assistant": t["assistant"]} for t in history[-(turns - 1):]]
    return answer


def prefix_messages(ps: PromptSet, *, turns: int = 1, min_score: float = 0.5) -> list[dict[str, str]]:
    """What every request of a language starts with: the system prompt, then the few-shot examples
    as earlier user / assistant turns."""
    out = [{"role": "system", "content": system_message(ps, turns)}]
    for example in ps.examples:
        answer = example_answer(example, turns, ps.language)
        if answer is None:
            continue
        out.append({"role": "user", "content": user_message(ps, {"language": ps.language, **example["cues"]}, min_score)})
        out.append({"role": "assistant", "content": json.dumps(answer, ensure_ascii=False)})
    return out


def messages(
    ps: PromptSet, record: dict[str, Any], *, turns: int = 1, min_score: float = 0.5,
    prefix: list[dict[str, str]] | None = None,
) -> list[dict[str, str]]:
    """`prefix_messages` (or the `prefix` given, made by it), then this record's user turn."""
    if prefix is None:
        prefix = prefix_messages(ps, turns=turns, min_score=min_score)
    return [*prefix, {"role": "user", "content": user_message(ps, record, min_score)}]


def feedback_message(ps: PromptSet, error: str, turns: int) -> str:
    return fill(ps.feedback, error=error, keys=", ".join(answer_keys(turns)))


def answer_schema(turns: int) -> dict[str, Any]:
    """The JSON schema of an answer (OpenAI structured outputs, strict: every key required)."""
    properties: dict[str, Any] = {
        "think": {"type": "string"},
        "reply_emotion": {"type": "string", "enum": list(vocab.REPLY_EMOTIONS)},
        "reply": {"type": "string"},
    }
    if turns > 1:
        properties[HISTORY_KEY] = {
            "type": "array",
            "minItems": turns - 1,
            "maxItems": turns - 1,
            "items": {
                "type": "object",
                "properties": {"user": {"type": "string"}, "assistant": {"type": "string"}},
                "required": ["user", "assistant"],
                "additionalProperties": False,
            },
        }
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}
