"""Emotion stage: a low-confidence heuristic from transcript keywords and prosody.

Evidence:
  words    keywords per emotion from `emotion_lexicon.yaml` (English words, Chinese substrings),
           matched longest first with no stretch of text counted twice (`text_match`), so
           "讨厌死了" counts once, for disgust, and not also as the anger of "讨厌". A keyword
           does not count when a negation comes shortly before it in the same clause: among the
           two English words before it ("not happy", "not very happy"), or ending at most two
           Chinese characters before it ("不开心", "不太开心", "不是很开心"). Words that merely
           start with a negating character ("别人", "未来", "不错") are listed in the lexicon so
           they are not read as negations;
  prosody  an arousal estimate in [-1, 1]: pitch variability (coefficient of variation of the voiced
           F0; neutral read speech sits near 0.18), speaking rate (about 2.7 words/s in English,
           4.5 characters/s in Chinese) and loudness (about -25 dBFS), weighted 0.5/0.3/0.2. Loudness
           depends on the recording gain, hence its small weight.
Decision:
  - keywords found: the emotion with most keyword hits (ties broken by which fits the arousal);
    score 0.35, +0.08 per further hit, +/-0.07 when prosody agrees/disagrees (high arousal fits
    anger, happy, surprise, fear; low arousal fits sad), capped at `max_score`;
  - no keywords and clearly low arousal (< -0.5): "sad" at 0.3-0.4;
  - otherwise: "neutral" at 0.3, less the more aroused the speech sounds (down to 0.2).
The score never exceeds `max_score` (0.6): this is a heuristic, and the `emotion_model` name
"heuristic-v1" lets a reader tell it from a model's label. Measured against the intended emotion of
the 480-file demo corpus (benchmarks/bench_label_accuracy.py): 56.5% right (English 50%, Mandarin
76%; always "neutral" would be 16.5%), mean score 0.31; recall from 23% (happy) to 100% (neutral).
The demo's lines carry their emotion in their words, which real speech often does not. An emotion already there (the
manifest's, a model's) is kept: the stage runner's precedence skips the record.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar

import numpy as np
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import HEURISTIC, Reject, Stage
from echat.schemas.text import CJK_CHAR, has_cjk
from echat.schemas.vocab import EMOTIONS

from .metrics import loudness_dbfs, speaking_rate
from .pitch import f0_of, warm_up
from .text_match import find_phrases, mask

MODEL_NAME = "heuristic-v1"
LEXICON_FILE = "emotion_lexicon.yaml"
HIGH_AROUSAL = frozenset({"anger", "happy", "surprise", "fear"})
LOW_AROUSAL = frozenset({"sad"})
_EN_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_EN_CLAUSE_END = re.compile(r"[.,;:!?]")  # "no, I am happy" is not a negated "happy"
NEGATION_WINDOW_EN_WORDS = 2  # the negation is one of the two words before the keyword
NEGATION_WINDOW_ZH_CHARS = 2  # at most two characters between the negation and the keyword

# Typical values of neutral read speech and the spread that maps to arousal +/-1.
PITCH_CV_NEUTRAL, PITCH_CV_SPREAD = 0.18, 0.10
RATE_EN_NEUTRAL, RATE_EN_SPREAD = 2.7, 1.2
RATE_ZH_NEUTRAL, RATE_ZH_SPREAD = 4.5, 2.0
LOUDNESS_NEUTRAL, LOUDNESS_SPREAD = -25.0, 10.0
AROUSAL_WEIGHTS = {"pitch": 0.5, "rate": 0.3, "loudness": 0.2}


@lru_cache(maxsize=4)
def load_lexicon(path: str | None = None) -> dict[str, Any]:
    """The lexicon as {"negations": {lang: [...]}, "negation_lookalikes": {lang: [...]},
    "emotions": {emotion: {lang: [...]}}} (lookalikes optional)."""
    import yaml

    if path is None:
        text = resources.files("echat.labelers").joinpath(LEXICON_FILE).read_text(encoding="utf-8")
    else:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lexicon = yaml.safe_load(text)
    unknown = set(lexicon.get("emotions", {})) - set(EMOTIONS)
    if unknown:
        raise ValueError(f"emotion lexicon {path or LEXICON_FILE} names emotions outside the vocabulary: {sorted(unknown)}")
    return lexicon


def keyword_hits(transcript: str, lexicon: dict[str, Any]) -> Counter:
    """Count of non-negated keyword hits per emotion in `transcript` (English and Chinese)."""
    hits: Counter = Counter()
    text = (transcript or "").lower()
    for language in ("en", "zh"):
        emotions_of: dict[str, list[str]] = {}
        for emotion, words in lexicon["emotions"].items():
            for word in words.get(language) or []:
                emotions_of.setdefault(str(word).lower(), []).append(emotion)
        lookalikes = [str(w).lower() for w in (lexicon.get("negation_lookalikes") or {}).get(language) or []]
        matches = find_phrases(text, [*emotions_of, *lookalikes], language, inflections=False)
        negations = [str(w).lower() for w in lexicon["negations"].get(language) or []]
        # Negations are looked for outside what matched as a keyword or a lookalike ("不安" is a
        # fear keyword, not a negated "安"; "别人" is "other people", not "don't").
        masked = mask(text, [(m.start, m.end) for m in matches])
        for match in matches:
            if match.phrase not in emotions_of:
                continue  # a lookalike: it only keeps its characters from reading as a negation
            if language == "en":
                negated = _negated_en(text, match.start, negations)
            else:
                negated = _negated_zh(masked, match.start, negations)
            if not negated:
                for emotion in emotions_of[match.phrase]:
                    hits[emotion] += 1
    return hits


def _negated_en(text: str, start: int, negations: list[str]) -> bool:
    clause = _EN_CLAUSE_END.split(text[:start])[-1]
    return bool(set(negations).intersection(_EN_WORD.findall(clause)[-NEGATION_WINDOW_EN_WORDS:]))


def _negated_zh(masked: str, start: int, negations: list[str]) -> bool:
    for negation in negations:
        lo = max(0, start - NEGATION_WINDOW_ZH_CHARS - len(negation))
        for found in re.finditer(re.escape(negation), masked[lo:start]):
            gap = masked[lo + found.end() : start]
            # Only Chinese characters between: punctuation ends the clause ("不，我很开心" is happy).
            if len(gap) <= NEGATION_WINDOW_ZH_CHARS and all(CJK_CHAR.match(c) for c in gap):
                return True
    return False


def arousal(f0: np.ndarray, rate: float | None, loudness: float | None, chinese: bool) -> float | None:
    """Arousal in [-1, 1] from whatever prosodic evidence there is; None when there is none."""
    cues: dict[str, float] = {}
    if len(f0) >= 10 and float(np.mean(f0)) > 0:
        cues["pitch"] = (float(np.std(f0) / np.mean(f0)) - PITCH_CV_NEUTRAL) / PITCH_CV_SPREAD
    if rate is not None:
        neutral, spread = (RATE_ZH_NEUTRAL, RATE_ZH_SPREAD) if chinese else (RATE_EN_NEUTRAL, RATE_EN_SPREAD)
        cues["rate"] = (rate - neutral) / spread
    if loudness is not None and loudness > -100:
        cues["loudness"] = (loudness - LOUDNESS_NEUTRAL) / LOUDNESS_SPREAD
    if not cues:
        return None
    total = sum(AROUSAL_WEIGHTS[k] for k in cues)
    value = sum(AROUSAL_WEIGHTS[k] * float(np.clip(v, -1.0, 1.0)) for k, v in cues.items()) / total
    return float(value)


def decide(hits: Counter, arousal_value: float | None, max_score: float) -> tuple[str, float]:
    """(emotion, score) from keyword hits and arousal, as the module docstring describes."""
    a = arousal_value or 0.0
    if hits:
        def fit(emotion: str) -> int:
            if abs(a) < 0.3:
                return 0
            if emotion in HIGH_AROUSAL:
                return 1 if a > 0 else -1
            if emotion in LOW_AROUSAL:
                return 1 if a < 0 else -1
            return 0

        emotion = max(hits, key=lambda e: (hits[e], fit(e)))
        score = 0.35 + 0.08 * (hits[emotion] - 1) + 0.07 * fit(emotion)
        return emotion, float(min(max_score, score))
    if a < -0.5:
        return "sad", float(min(max_score, 0.3 + 0.2 * (-a - 0.5)))
    return "neutral", float(min(max_score, 0.3 - 0.1 * abs(a)))


class HeuristicEmotion(Stage):
    name: ClassVar[str] = "emotion"
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "_f0", "_speech_spans", "transcript", "language")
    # emotion_model is stamped by the runner from describe(); an emotion already held by a better
    # source (the manifest, a model) is the runner's to keep: it skips the record.
    writes: ClassVar[tuple[str, ...]] = ("emotion", "emotion_score", "emotion_model", "_f0")
    origin: ClassVar[str] = HEURISTIC

    def __init__(self, lexicon_path: str | None = None, max_score: float = 0.6):
        if not 0.0 < max_score <= 0.6:
            raise ValueError(f"max_score of a heuristic must be in (0, 0.6], got {max_score}")
        self.lexicon_path = lexicon_path
        self.max_score = float(max_score)
        self._lexicon: dict[str, Any] | None = None

    def setup(self) -> None:
        self._lexicon = load_lexicon(self.lexicon_path)
        warm_up()

    def describe(self) -> str:
        return MODEL_NAME

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        if self._lexicon is None:
            self.setup()
        out = dict(record)
        transcript = record.get("transcript") or ""
        chinese = record.get("language") == "zh" or has_cjk(transcript)
        spans = record.get("_speech_spans")
        waveform = record["_waveform"]
        speech_s = sum(b - a for a, b in spans) if spans else len(waveform) / SAMPLE_RATE
        value = arousal(f0_of(out), speaking_rate(transcript, speech_s), loudness_dbfs(waveform), chinese)
        emotion, score = decide(keyword_hits(transcript, self._lexicon), value, self.max_score)
        out.update(emotion=emotion, emotion_score=score)
        yield out
