"""Emotion stage: emotion2vec(+) through FunASR's AutoModel, its classes mapped to the OSUM set.

emotion2vec+ (emotion2vec_plus_seed / _base / _large) classifies an utterance into nine classes,
named in its tokens.txt as "<Chinese>/<English>" ("生气/angry") with "<unk>" for unknown. Mapping
(`osum_emotion`, through the alias table of schemas/labels.py):
  angry -> anger, disgusted -> disgust, fearful -> fear, happy -> happy, neutral -> neutral,
  other -> other, sad -> sad, surprised -> surprise; unknown (or <unk>) -> no label.
The record gets the most probable class: `emotion` its OSUM name and `emotion_score` its
probability (funasr's softmax over the classes). When the most probable class is unknown, or one
the mapping does not know, `emotion` stays empty and the record is flagged `emotion_unknown`.
An emotion a better source holds (the manifest's) is kept: the stage runner skips the record.

The model comes from `model` (a local directory, a hub id or funasr's name; default
"emotion2vec_plus_large"), with `hub`, `cache_dir`, `revision`, `local_files_only`, `device` and
`ncpu` as labelers/funasr_models.py describes. The plain emotion2vec (`emotion2vec_base`) is a
feature extractor without the classifier: setup() refuses it. funasr runs emotion2vec one
waveform at a time inside a `generate()` call (`batch_size` records per call).
"""

from __future__ import annotations

from typing import Any, ClassVar

from echat.schemas.labels import LabelError, normalise
from echat.schemas.stage import MODEL

from .flags import add_flag
from .funasr_models import FunASRStage, ModelSource

BACKEND = "emotion2vec"
DEFAULT_MODEL = "emotion2vec_plus_large"
EMOTION2VEC_CLASSES = ("angry", "disgusted", "fearful", "happy", "neutral", "other", "sad", "surprised", "unknown")
UNKNOWN_CLASSES = frozenset({"unknown", "<unk>", "unk"})
EMOTION_UNKNOWN_FLAG = "emotion_unknown"


def class_name(label: str) -> str:
    """The English class name of an emotion2vec label ("生气/angry" -> "angry", "<unk>" -> "unknown")."""
    name = str(label).split("/")[-1].strip().lower()
    return "unknown" if name in UNKNOWN_CLASSES else name


def osum_emotion(label: str) -> str | None:
    """The OSUM emotion (schemas.vocab.EMOTIONS) of an emotion2vec label; None for unknown."""
    name = class_name(label)
    if name == "unknown":
        return None
    try:
        return normalise("emotion", name)
    except LabelError:
        return None


class Emotion2vecEmotion(FunASRStage):
    name: ClassVar[str] = "emotion"
    backend: ClassVar[str] = BACKEND
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate")
    writes: ClassVar[tuple[str, ...]] = ("emotion", "emotion_score", "emotion_model", "quality_flags")
    origin: ClassVar[str] = MODEL
    batch_size: ClassVar[int] = 8

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        hub: str = "ms",
        cache_dir: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
        ncpu: int = 1,
    ):
        super().__init__(ModelSource(model, hub, cache_dir, revision, bool(local_files_only), device, int(ncpu)))

    def setup(self) -> None:
        super().setup()
        if not self._model.automodel.kwargs.get("token_list"):
            raise ValueError(f"{self.source.model!r} has no emotion classes (no tokens.txt): the plain emotion2vec "
                             "is a feature extractor; use emotion2vec_plus_seed, _base or _large")

    def generate_options(self) -> dict[str, Any]:
        return {"granularity": "utterance", "extract_embedding": False}

    def label(self, record: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        labels, scores = list(result.get("labels") or []), list(result.get("scores") or [])
        if not labels or len(labels) != len(scores):
            raise ValueError(f"emotion2vec gave {len(labels)} labels and {len(scores)} scores")
        best = max(range(len(labels)), key=lambda i: scores[i])
        out = dict(record)
        emotion = osum_emotion(labels[best])
        if emotion is None:
            add_flag(out, EMOTION_UNKNOWN_FLAG)
            return out
        out["emotion"] = emotion
        out["emotion_score"] = float(min(1.0, max(0.0, scores[best])))
        return out
