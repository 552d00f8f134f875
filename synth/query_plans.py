"""Cue plans for synthetic queries (synth/query_plans.yaml) and the allocation of N queries to them.

A plan names the cues its queries are made for (age, gender, emotion, events) and its share; the
file also gives the share of each language, the espeak-ng voices per age and gender, how each age
changes the prosody, and where each vocal event goes. `allocate` turns N into a list of planned
queries, deterministic for a seed: each plan gets its share of N by largest remainder, each plan's
queries get the languages by their shares (dealt over the queries grouped by plan, so the corpus
gets its shares and each plan its own, within one query), the plans are interleaved so that any
stretch of the list covers many of them, genders alternate where a plan leaves them open, and the
voice variants of each (age, gender) are taken in turn.
"""

from __future__ import annotations

import random
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from echat.schemas import vocab
from echat.schemas.labels import normalise, normalise_events

PLANS_FILE = "query_plans.yaml"
POSITIONS = ("start", "end", "pause")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Cues(_Strict):
    age: str | None = None
    gender: str | None = None
    emotion: str | None = None
    events: list[str] = Field(default_factory=list)

    @field_validator("age", "gender", "emotion")
    @classmethod
    def _vocabulary(cls, value, info):
        return None if value is None else normalise(info.field_name, value)

    @field_validator("events")
    @classmethod
    def _events(cls, value):
        return normalise_events(value)

    def names(self) -> list[str]:
        """The cues set, as `age:child`, `emotion:sad`, `event:cough`..."""
        named = [f"{k}:{getattr(self, k)}" for k in ("age", "gender", "emotion") if getattr(self, k)]
        return named + [f"event:{e}" for e in self.events]


class Plan(_Strict):
    name: str
    share: float = Field(gt=0)
    cues: Cues
    languages: dict[str, float] | None = None  # this plan's own language shares


class AgeStyle(_Strict):
    pitch: int = 0
    speed: float = Field(1.0, gt=0.2, le=3.0)
    range: float = Field(1.0, gt=0.0, le=3.0)
    formant_shift: float = Field(1.0, ge=0.7, le=1.5)
    tremolo_hz: float = Field(0.0, ge=0.0, le=20.0)
    tremolo_depth: float = Field(0.0, ge=0.0, le=0.8)


class EventPlacement(_Strict):
    positions: dict[str, float]
    level: tuple[float, float] = (0.5, 0.8)

    @field_validator("positions")
    @classmethod
    def _known(cls, value):
        unknown = sorted(set(value) - set(POSITIONS))
        if unknown or not value or any(w < 0 for w in value.values()) or not sum(value.values()):
            raise ValueError(f"positions weigh some of {', '.join(POSITIONS)} (non-negative, not all 0); got {value}")
        return value


class Voices(_Strict):
    base: dict[str, list[str]]
    adult: dict[str, list[str]]
    child: dict[str, list[str]]
    old: dict[str, list[str]]

    @model_validator(mode="after")
    def _complete(self):
        for language in vocab.LANGUAGES:
            if not self.base.get(language):
                raise ValueError(f"voices.base needs a voice for {language}")
        for age in vocab.AGES:
            for gender in vocab.GENDERS:
                if not getattr(self, age).get(gender):
                    raise ValueError(f"voices.{age}.{gender} needs at least one variant")
        return self


class PlanFile(_Strict):
    version: str
    style: str = "daily conversation"
    languages: dict[str, float]
    single: list[Plan] = Field(default_factory=list)
    multi: list[Plan] = Field(default_factory=list)
    voices: Voices
    ages: dict[str, AgeStyle]
    prosody: dict[str, dict[str, int]] = Field(default_factory=dict)
    events: dict[str, EventPlacement]

    @field_validator("style")
    @classmethod
    def _style(cls, value):
        return normalise("style", value)

    @field_validator("languages")
    @classmethod
    def _languages(cls, value):
        return _language_shares(value, "languages")

    @model_validator(mode="after")
    def _check(self):
        if not self.single and not self.multi:
            raise ValueError("no plans: give `single` and/or `multi` plans")
        names = Counter(p.name for p in self.single + self.multi)
        twice = sorted(n for n, c in names.items() if c > 1)
        if twice:
            raise ValueError(f"plan name(s) {twice} appear twice")
        for plan in self.single:
            if len(plan.cues.names()) != 1:
                raise ValueError(f"single-label plan {plan.name!r} must set exactly one cue, it sets {plan.cues.names() or 'none'}")
        for plan in self.multi:
            if len(plan.cues.names()) < 2:
                raise ValueError(f"multi-label plan {plan.name!r} must set two cues or more, it sets {plan.cues.names() or 'none'}")
        for plan in self.single + self.multi:
            if plan.languages is not None:
                plan.languages = _language_shares(plan.languages, f"plan {plan.name}.languages")
            missing = [e for e in plan.cues.events if e not in self.events]
            if missing:
                raise ValueError(f"plan {plan.name!r}: no placement under `events` for {missing}")
        missing_ages = [a for a in vocab.AGES if a not in self.ages]
        if missing_ages:
            raise ValueError(f"`ages` needs an entry for {missing_ages}")
        return self

    def plans(self) -> list[tuple[str, Plan]]:
        """(kind, plan) for every plan, single-label ones first."""
        return [("single", p) for p in self.single] + [("multi", p) for p in self.multi]


def _language_shares(value: dict[str, float], where: str) -> dict[str, float]:
    shares = {normalise("language", k): float(v) for k, v in value.items()}
    if any(v < 0 for v in shares.values()) or not sum(shares.values()):
        raise ValueError(f"{where}: shares must be non-negative and not all 0, got {value}")
    return {k: v for k, v in shares.items() if v > 0}


def load_plans(path: str | Path | None = None) -> PlanFile:
    """The plan file at `path`, or the packaged synth/query_plans.yaml; ValueError naming the problem."""
    if path:
        text, where = Path(path).read_text("utf-8"), str(path)
    else:
        text, where = resources.files("echat.synth").joinpath(PLANS_FILE).read_text("utf-8"), f"synth/{PLANS_FILE}"
    try:
        return PlanFile(**(yaml.safe_load(text) or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{where}: {problems}") from None
    except TypeError as exc:
        raise ValueError(f"{where}: {exc}") from None


def largest_remainder(total: int, shares: dict[str, float]) -> dict[str, int]:
    """`total` split over the keys in proportion to `shares`, whole numbers adding up to `total`."""
    weight = sum(shares.values())
    exact = {k: total * v / weight for k, v in shares.items()}
    counts = {k: int(x) for k, x in exact.items()}
    left = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(shares).index(k)))[:left]:
        counts[k] += 1
    return counts


def deal(total: int, shares: dict[str, float]) -> list[str]:
    """`total` keys in proportion to `shares`, evenly along the list: each step takes the key
    furthest behind its share so far (so any prefix is as close to the shares as it can be)."""
    weight = sum(shares.values())
    given: Counter = Counter()
    out = []
    for i in range(total):
        key = max(shares, key=lambda k: (shares[k] / weight * (i + 1) - given[k], shares[k]))
        given[key] += 1
        out.append(key)
    return out


def _spread(counts: dict[str, int], rng: random.Random) -> list[str]:
    """Each key `count` times, spread evenly along the list (a key's i-th item near its i/count mark)."""
    slots = []
    for key, n in counts.items():
        offset = rng.random()
        slots += [((i + offset) / n, rng.random(), key) for i in range(n)]
    return [key for _, _, key in sorted(slots)]


def allocate(spec: PlanFile, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The planned queries: index, plan, kind, cues (filled in), language, voice choice."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    rng = random.Random(seed)
    plans = {plan.name: (kind, plan) for kind, plan in spec.plans()}
    per_plan = largest_remainder(n, {name: plan.share for name, (_, plan) in plans.items()})
    # Languages are dealt over the queries grouped plan by plan, so the corpus gets its shares
    # exactly and each plan its own (within one query), however few queries a plan has.
    languages: dict[str, list[str]] = {name: [] for name in per_plan}
    shared = [name for name in per_plan for _ in range(per_plan[name]) if plans[name][1].languages is None]
    for name, language in zip(shared, deal(len(shared), spec.languages)):
        languages[name].append(language)
    for name, count in per_plan.items():
        own = plans[name][1].languages
        if own is not None:
            languages[name] = deal(count, own)
    for name, dealt in languages.items():
        random.Random(f"{seed}:{name}").shuffle(dealt)
    order = _spread({name: c for name, c in per_plan.items() if c}, rng)
    taken: Counter = Counter()
    gender_turn: Counter = Counter()
    variant_turn: Counter = Counter()
    base_turn: Counter = Counter()
    queries = []
    for index, name in enumerate(order):
        kind, plan = plans[name]
        k = taken[name]
        taken[name] += 1
        language = languages[name][k]
        cues = plan.cues
        age = cues.age or "adult"
        if cues.gender:
            gender = cues.gender
        else:
            gender = vocab.GENDERS[(gender_turn[(name, language)] + (index % 2)) % 2]
            gender_turn[(name, language)] += 1
        variants = getattr(spec.voices, age)[gender]
        variant = variants[variant_turn[(age, gender, language)] % len(variants)]
        variant_turn[(age, gender, language)] += 1
        bases = spec.voices.base[language]
        base = bases[base_turn[language] % len(bases)]
        base_turn[language] += 1
        queries.append({
            "index": index, "plan": name, "plan_kind": kind, "plan_index": k, "cues": cues.names(),
            "language": language, "age": age, "gender": gender, "emotion": cues.emotion or "neutral",
            "events": list(cues.events), "style": spec.style, "voice": f"{base}+{variant}",
            "path": f"audio/q{index:05d}_{language}_{name}.wav",
        })
    return queries
