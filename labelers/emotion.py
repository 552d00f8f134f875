"""Emotion stage: a low-confidence heuristic from transcript keywords and prosody.

Evidence:
  words    keywords per emotion from `emotion_lexicon.yaml` (English words, Chinese substrings),
           a keyword right after a negation ("not happy", "不开心") not counting;
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
"heuristic-v1" lets a reader tell it from a model's label. A manifest's emotion is left as it is.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache
from importlib import resources
from typing import Any, ClassVar

import numpy as np
from echat.schemas.stage import Reject, Stage
from echat.schemas.vocab import EMOTIONS

from .metrics import loudness_dbfs, speaking_rate
from .pitch import SAMPLE_RATE, f0_of, warm_up

MODEL_NAME = "heuristic-v1"
LEXICON_FILE = "emotion_lexicon.yaml"
HIGH_AROUSAL = frozenset({"anger", "happy", "surprise", "fear"})
LOW_AROUSAL = frozenset({"sad"})
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")
_EN_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")

# Typical values of neutral read speech and the spread that maps to arousal +/-1.
PITCH_CV_NEUTRAL, PITCH_CV_SPREAD = 0.18, 0.10
RATE_EN_NEUTRAL, RATE_EN_SPREAD = 2.7, 1.2
RATE_ZH_NEUTRAL, RATE_ZH_SPREAD = 4.5, 2.0
LOUDNESS_NEUTRAL, LOUDNESS_SPREAD = -25.0, 10.0
AROUSAL_WEIGHTS = {"pitch": 0.5, "rate": 0.3, "loudness": 0.2}


@lru_cache(maxsize=4)
def load_lexicon(path: str | None = None) -> dict[str, Any]:
    """The lexicon as {"negations": {lang: [...]}, "emotions": {emotion: {lang: [...]}}}."""
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
    text = transcript.lower()
    tokens = _EN_WORD.findall(text)
    en_negations = set(lexicon["negations"]["en"])
    zh_negations = sorted(lexicon["negations"]["zh"], key=len, reverse=True)
    for emotion, words in lexicon["emotions"].items():
        en_words = set(words.get("en") or [])
        for i, token in enumerate(tokens):
            if token in en_words and not en_negations.intersection(tokens[max(0, i - 2) : i]):
                hits[emotion] += 1
        if _CJK.search(text):
            for keyword in words.get("zh") or []:
                for match in re.finditer(re.escape(keyword), text):
                    before = text[: match.start()]
                    if not any(before.endswith(neg) for neg in zh_negations):
                        hits[emotion] += 1
    return hits


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
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "_f0", "_speech_spans", "transcript", "language", "emotion")
    writes: ClassVar[tuple[str, ...]] = ("emotion", "emotion_score", "emotion_model", "_f0")

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
        if record.get("emotion") is not None:  # the manifest's label wins
            yield record
            return
        if self._lexicon is None:
            self.setup()
        out = dict(record)
        transcript = record.get("transcript") or ""
        chinese = record.get("language") == "zh" or bool(_CJK.search(transcript))
        spans = record.get("_speech_spans")
        waveform = record["_waveform"]
        speech_s = sum(b - a for a, b in spans) if spans else len(waveform) / SAMPLE_RATE
        value = arousal(f0_of(out), speaking_rate(transcript, speech_s), loudness_dbfs(waveform), chinese)
        emotion, score = decide(keyword_hits(transcript, self._lexicon), value, self.max_score)
        out.update(emotion=emotion, emotion_score=score, emotion_model=MODEL_NAME)
        yield out
