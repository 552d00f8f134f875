"""The offline reply engine: deterministic empathetic replies from templates (no language model).

It writes what an LLM backend writes (both reasoning forms, the reply emotion and the reply) so a
corpus can be built end to end on a machine with no network, and labels its output
`llm_model="template-v1"` so nobody mistakes it for a model's. The reply follows the cues: the
reply emotion comes from the user's emotion (or, when the voice gives none, from the words), a
heard cough or sigh gets its own sentence, a child gets simpler words, and the topic of what was
said (a keyword table) picks the closing sentence, else a short paraphrase of the user's words.
The sentences are data: synth/templates/reply_rules.yaml, reply_en.yaml, reply_zh.yaml.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from echat.labelers.text_match import count_phrases
from echat.schemas import vocab
from echat.schemas.stage import Reject, Stage

from . import reasoning

MODEL_NAME = "template-v1"
LANGUAGE_FILES = {"en": "reply_en.yaml", "zh": "reply_zh.yaml"}
RULES_FILE = "reply_rules.yaml"
VALENCES = ("negative", "positive", "neutral")
AGE_VARIANTS = ("child", "old")
PLACEHOLDERS = re.compile(r"\{(\w*)\}")


class TemplateError(ValueError):
    """A template file that does not have the shape the engine needs."""


# ---------------------------------------------------------------------------------------------
# loading and checking the templates


@dataclass(frozen=True)
class LanguageTemplates:
    language: str
    openers: dict[str, dict[str, list[str]]]
    events: dict[str, dict[str, list[str]]]
    topics: dict[str, dict[str, Any]]  # name -> {name, keywords, negative/positive/neutral slots}
    fallback: dict[str, dict[str, list[str]]]
    reflections: dict[str, str]
    second_person: tuple[str, ...]
    dangling_words: tuple[str, ...]
    valence_words: dict[str, list[str]]


@dataclass(frozen=True)
class ReplyTemplates:
    version: str
    rules: dict[str, Any]
    languages: dict[str, LanguageTemplates]


def _read_yaml(folder: Path | Any, name: str) -> dict[str, Any]:
    try:
        text = folder.joinpath(name).read_text("utf-8")
    except FileNotFoundError:
        raise TemplateError(f"template file {name} not found in {folder}") from None
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise TemplateError(f"{name}: expected a mapping at the top level")
    return data


def _check_slot(where: str, slot: Any, allow_quote: bool) -> dict[str, list[str]]:
    """A slot is {default: [...], child: [...]?, old: [...]?} of non-empty sentences."""
    if not isinstance(slot, dict) or "default" not in slot:
        raise TemplateError(f"{where}: expected a mapping with a `default` list")
    for key, sentences in slot.items():
        if key not in ("default", *AGE_VARIANTS):
            raise TemplateError(f"{where}.{key}: unknown variant (use default, child or old)")
        if not isinstance(sentences, list) or not sentences:
            raise TemplateError(f"{where}.{key}: expected a non-empty list of sentences")
        for sentence in sentences:
            if not isinstance(sentence, str) or not sentence.strip():
                raise TemplateError(f"{where}.{key}: every sentence must be a non-empty string")
            bad = [p for p in PLACEHOLDERS.findall(sentence) if not (allow_quote and p == "quote")]
            if bad:
                raise TemplateError(f"{where}.{key}: unknown placeholder {{{bad[0]}}} in {sentence!r}")
    return slot


def _check_valenced(where: str, block: Any, allow_quote: bool) -> dict[str, dict[str, list[str]]]:
    if not isinstance(block, dict) or "neutral" not in block:
        raise TemplateError(f"{where}: expected negative / positive / neutral sentence sets (neutral at least)")
    return {v: _check_slot(f"{where}.{v}", block[v], allow_quote) for v in VALENCES if v in block}


def _reachable_reply_emotions(rules: dict[str, Any]) -> set[str]:
    found: set[str] = set()
    for choices in rules["reply_emotion"].values():
        found.update(choices)
    for choices in rules["reply_emotion_by_valence"].values():
        found.update(choices)
    found.update(rules.get("event_reply_emotion", {}).values())
    return found


def load_templates(folder: str | Path | None = None) -> ReplyTemplates:
    """Read and check the rules and every language's sentences; errors name file and key."""
    root = Path(folder) if folder else resources.files("echat.synth").joinpath("templates")
    rules = _read_yaml(root, RULES_FILE)
    for key in ("version", "reply_emotion", "reply_emotion_by_valence", "emotion_valence"):
        if key not in rules:
            raise TemplateError(f"{RULES_FILE}: missing key {key!r}")
    missing = [e for e in vocab.EMOTIONS if e not in rules["reply_emotion"]]
    if missing:
        raise TemplateError(f"{RULES_FILE}: reply_emotion lacks the user emotion(s) {missing}")
    if set(rules["reply_emotion_by_valence"]) != set(VALENCES):
        raise TemplateError(f"{RULES_FILE}: reply_emotion_by_valence must have exactly {VALENCES}")
    reachable = _reachable_reply_emotions(rules)
    unknown = sorted(reachable - set(vocab.REPLY_EMOTIONS))
    if unknown:
        raise TemplateError(f"{RULES_FILE}: {unknown} not in the reply emotions {vocab.REPLY_EMOTIONS}")
    bad_events = [e for e in rules.get("event_reply_emotion", {}) if e not in vocab.EVENTS]
    if bad_events:
        raise TemplateError(f"{RULES_FILE}: event_reply_emotion names unknown event(s) {bad_events}")

    languages: dict[str, LanguageTemplates] = {}
    for language, name in LANGUAGE_FILES.items():
        data = _read_yaml(root, name)
        openers = data.get("openers") or {}
        lacking = sorted(reachable - set(openers))
        if lacking:
            raise TemplateError(f"{name}: openers lack the reply emotion(s) {lacking}")
        for key in openers:
            emotion, _, valence = key.partition("/")
            if emotion not in vocab.REPLY_EMOTIONS or (valence and valence not in VALENCES):
                raise TemplateError(f"{name}: openers.{key} is not a reply emotion (optionally /negative, /positive, /neutral)")
        topics = {}
        for topic, spec in (data.get("topics") or {}).items():
            if not isinstance(spec, dict) or not spec.get("keywords"):
                raise TemplateError(f"{name}: topics.{topic} needs a non-empty `keywords` list")
            topics[topic] = {
                "name": str(spec.get("name", topic)),
                "keywords": [str(k).lower() for k in spec["keywords"]],
                **_check_valenced(f"{name}: topics.{topic}", {v: spec[v] for v in VALENCES if v in spec}, False),
            }
        events = {}
        for event, slot in (data.get("events") or {}).items():
            if event not in vocab.EVENTS:
                raise TemplateError(f"{name}: events.{event} is not a vocal event ({', '.join(vocab.EVENTS)})")
            events[event] = _check_slot(f"{name}: events.{event}", slot, False)
        valence_words = data.get("valence_words") or {}
        languages[language] = LanguageTemplates(
            language=language,
            openers={e: _check_slot(f"{name}: openers.{e}", s, False) for e, s in openers.items()},
            events=events,
            topics=topics,
            fallback=_check_valenced(f"{name}: fallback", data.get("fallback"), True),
            reflections={str(k).lower(): str(v) for k, v in (data.get("reflections") or {}).items()},
            second_person=tuple(str(w).lower() for w in data.get("second_person") or ()),
            dangling_words=tuple(str(w).lower() for w in data.get("dangling_words") or ()),
            valence_words={v: [str(w).lower() for w in valence_words.get(v, [])] for v in ("negative", "positive")},
        )
    return ReplyTemplates(version=str(rules["version"]), rules=rules, languages=languages)


# ---------------------------------------------------------------------------------------------
# reading the user's words


# Phrases are counted with `labelers.text_match.count_phrases`: longest first, each stretch of
# text once (so "not happy" is not also "happy", and "不开心" is not also "开心"); English phrases
# match whole words with their common inflections (exam -> exams, fail -> failed).


def words_valence(text: str, templates: LanguageTemplates) -> str:
    """'negative', 'positive' or 'neutral' from the valence word lists."""
    words = {v: templates.valence_words[v] for v in ("negative", "positive")}
    counts = count_phrases(text, words["negative"] + words["positive"], templates.language)
    negative = sum(n for p, n in counts.items() if p in words["negative"])
    positive = sum(n for p, n in counts.items() if p in words["positive"])
    if negative > positive:
        return "negative"
    if positive > negative:
        return "positive"
    return "neutral"


def find_topic(text: str, templates: LanguageTemplates) -> str | None:
    """The topic whose keywords occur most often; ties go to the topic listed first."""
    best, best_hits = None, 0
    for topic, spec in templates.topics.items():
        hits = sum(count_phrases(text, spec["keywords"], templates.language).values())
        if hits > best_hits:
            best, best_hits = topic, hits
    return best


_CLAUSE_SPLIT = {"en": re.compile(r"[.!?;:,\n]+"), "zh": re.compile(r"[，。！？；：、,.!?;:…\n]+")}


def short_quote(text: str, templates: LanguageTemplates, max_words: int = 12, max_chars: int = 16) -> str:
    """A short span of the user's words, turned to the second person ("I lost my keys" ->
    "you lost your keys"); a span that already speaks to "you" is quoted as it was said."""
    language = templates.language
    clauses = [c.strip() for c in _CLAUSE_SPLIT[language].split(text) if c.strip()]
    if not clauses:
        return text.strip()
    min_size = 3 if language == "en" else 4
    size = (lambda c: len(c.split())) if language == "en" else len
    clause = next((c for c in clauses if size(c) >= min_size), clauses[0])
    if language == "en":
        tokens = clause.split()
        if len(tokens) > max_words:
            tokens = tokens[:max_words]
            # "you heard a noise in the middle of the" reads broken: end on a content word
            while len(tokens) > 1 and tokens[-1].lower() in templates.dangling_words:
                tokens.pop()
        if any(t.lower().strip("\"'") in templates.second_person for t in tokens):
            return f'"{" ".join(tokens)}"'
        out = []
        for i, token in enumerate(tokens):
            bare = token.lower().strip("\"'")
            if bare in templates.reflections:
                out.append(templates.reflections[bare])
            elif i == 0 and not token.isupper():
                out.append(token[:1].lower() + token[1:])
            else:
                out.append(token)
        return " ".join(out)
    span = clause[:max_chars]
    if any(w in span for w in templates.second_person):
        return f"“{span}”"
    if templates.reflections:
        pattern = re.compile("|".join(re.escape(k) for k in sorted(templates.reflections, key=len, reverse=True)))
        span = pattern.sub(lambda m: templates.reflections[m.group(0)], span)
    return span


# ---------------------------------------------------------------------------------------------
# the stage


def seeded_choice(options: list[str], seed: str, slot: str) -> str:
    """The same option for the same (seed, slot) on every run and machine (no global RNG)."""
    digest = hashlib.sha256(f"{seed}|{slot}".encode("utf-8")).digest()
    return options[int.from_bytes(digest[:8], "big") % len(options)]


@dataclass(frozen=True)
class ReplyPlan:
    reply_emotion: str
    because: str  # what set the reply emotion: "event", "emotion" or "words"
    valence: str
    topic: str | None
    event: str | None
    age_variant: str


class TemplateReply(Stage):
    """Template replies with dual-thinking traces, in the user's language (en, zh).

    Args:
        templates_dir: a folder with reply_rules.yaml, reply_en.yaml and reply_zh.yaml to use
            instead of the packaged templates.
        min_label_score: labels (emotion, age, events) scored below this are not trusted to steer
            the reply; the words decide instead. The traces still show them, hedged.
        max_quote_words / max_quote_chars: length of the paraphrased span (English words /
            Chinese characters) in the fallback sentence.
    """

    name = "reply"
    # Every field `reasoning.Cues.from_record` looks at: each label with its score and the model
    # that produced it (the model decides how firmly the reasoning states a label).
    reads = (
        "id", "transcript", "transcript_confidence", "language",
        "age", "age_score", "age_model", "gender", "gender_score", "gender_model",
        "emotion", "emotion_score", "emotion_model", "events", "events_score", "events_model",
        "style", "style_score", "style_model", "speaking_rate",
    )
    writes = (
        "think_tags", "think_text", "reply_emotion", "reply_text", "llm_model", "prompt_version",
        "_reply_topic",
    )

    def __init__(
        self,
        templates_dir: str | None = None,
        min_label_score: float = 0.3,
        max_quote_words: int = 12,
        max_quote_chars: int = 16,
    ):
        if not 0.0 <= min_label_score <= 1.0:
            raise ValueError(f"min_label_score must be within 0-1, got {min_label_score}")
        self.templates_dir = templates_dir
        self.min_label_score = min_label_score
        self.max_quote_words = max_quote_words
        self.max_quote_chars = max_quote_chars
        self.templates: ReplyTemplates | None = None

    def setup(self) -> None:
        self.templates = load_templates(self.templates_dir)

    def describe(self) -> str:
        return MODEL_NAME

    def _trusted(self, value: Any, score: float | None) -> bool:
        return bool(value) and (score is None or score >= self.min_label_score)

    def plan(self, cues: reasoning.Cues, seed: str) -> ReplyPlan:
        """Decide reply emotion, valence, topic, event and age variant for one record."""
        assert self.templates is not None
        rules = self.templates.rules
        lang = self.templates.languages[cues.language]
        emotion = cues.emotion.value if self._trusted(cues.emotion.value, cues.emotion.score) else None
        from_words = words_valence(cues.transcript, lang)
        valence = (rules["emotion_valence"].get(emotion) if emotion else None) or from_words

        events = cues.events.values if self._trusted(cues.events.values, cues.events.score) else ()
        priority = rules.get("event_priority", list(vocab.EVENTS))
        rank = {e: i for i, e in enumerate(priority)}
        heard = sorted((e for e in events or () if e in lang.events), key=lambda e: rank.get(e, len(rank)))
        event = heard[0] if heard else None

        by_event = rules.get("event_reply_emotion", {})
        overriding = next((by_event[e] for e in heard if e in by_event), None)
        if emotion in (None, "neutral", "other") and overriding:
            reply_emotion, because = overriding, "event"
        elif emotion is None or (emotion in ("neutral", "other") and from_words != "neutral"):
            # A flat voice saying "I failed my exam" still deserves concern: the words decide.
            reply_emotion = seeded_choice(rules["reply_emotion_by_valence"][from_words], seed, "reply_emotion")
            because = "words"
        else:
            reply_emotion = seeded_choice(rules["reply_emotion"][emotion], seed, "reply_emotion")
            because = "emotion"

        age = cues.age.value if self._trusted(cues.age.value, cues.age.score) else None
        return ReplyPlan(
            reply_emotion=reply_emotion,
            because=because,
            valence=valence,
            topic=find_topic(cues.transcript, lang),
            event=event,
            age_variant=age if age in AGE_VARIANTS else "default",
        )

    def compose(self, plan: ReplyPlan, cues: reasoning.Cues, seed: str) -> str:
        assert self.templates is not None
        lang = self.templates.languages[cues.language]

        def pick(slot: dict[str, list[str]], name: str) -> str:
            return seeded_choice(slot.get(plan.age_variant) or slot["default"], seed, name)

        def valenced(block: dict[str, dict[str, list[str]]]) -> dict[str, list[str]]:
            return block.get(plan.valence) or block["neutral"]

        # When the event set the reply emotion, its sentence opens the reply: a generic "that
        # sounds hard" before "I heard you cough" would answer hardship nobody mentioned.
        opener = lang.openers.get(f"{plan.reply_emotion}/{plan.valence}") or lang.openers[plan.reply_emotion]
        sentences = [] if plan.because == "event" else [pick(opener, "opener")]
        if plan.event:
            sentences.append(pick(lang.events[plan.event], f"event:{plan.event}"))
        if plan.topic:
            sentences.append(pick(valenced(lang.topics[plan.topic]), f"topic:{plan.topic}"))
        else:
            quote = short_quote(cues.transcript, lang, self.max_quote_words, self.max_quote_chars)
            sentences.append(pick(valenced(lang.fallback), "fallback").replace("{quote}", quote))
        return ("" if cues.language == "zh" else " ").join(sentences)

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        if self.templates is None:
            self.setup()
        assert self.templates is not None
        transcript = (record.get("transcript") or "").strip()
        if not transcript:
            yield self.reject(record, "no_transcript", "the record has no transcript to reply to")
            return
        language = record.get("language") or reasoning.guess_language(transcript)
        if language not in self.templates.languages:
            yield self.reject(
                record, "unsupported_language",
                f"language {language!r}; templates exist for {', '.join(self.templates.languages)}",
            )
            return
        cues = reasoning.Cues.from_record({**record, "transcript": transcript, "language": language})
        seed = str(record.get("id") or hashlib.sha1(transcript.encode("utf-8")).hexdigest())
        plan = self.plan(cues, seed)
        topic_name = self.templates.languages[language].topics[plan.topic]["name"] if plan.topic else None
        yield {
            **record,
            "think_tags": reasoning.tag_form(cues, plan.reply_emotion),
            "think_text": reasoning.natural_form(cues, plan.reply_emotion, topic=topic_name),
            "reply_emotion": plan.reply_emotion,
            "reply_text": self.compose(plan, cues, seed),
            "llm_model": MODEL_NAME,
            "prompt_version": self.templates.version,
            "_reply_topic": plan.topic,
        }
