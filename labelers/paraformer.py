"""ASR stage: FunASR Paraformer, with a punctuation model when configured and word timestamps.

The model (`model`: a local directory or a hub id; default funasr's "paraformer-zh") transcribes
`batch_size` records per call (one padded batch). With `punc_model` (null, or a directory or id
such as funasr's "ct-punc"), funasr puts punctuation into the text; it comes from the same `hub`
and `cache_dir`. `hub`, `cache_dir`, `revision`, `local_files_only`, `device`, `ncpu`: see
labelers/funasr_models.py.

It writes:
  transcript             the text, punctuated when a punctuation model is set; spaces between two
                         Chinese characters removed (Paraformer spaces every token apart when it
                         gives timestamps)
  transcript_confidence  TRANSCRIPT_CONFIDENCE (0.8), a fixed value chosen rather than measured:
                         funasr's generate() returns the text without its decoder scores
  words                  [{word, start, end, score}], seconds from the segment start, when funasr
                         returns `timestamp` (`timestamps: true`, the default, and a model that
                         predicts them): one entry per token of the unpunctuated text (a Chinese
                         character, an English word); score None (funasr gives none per word).
                         When the tokens and the timestamps do not pair up, `words` stays empty and
                         the record is flagged `words_unaligned`.
A record in a language the model is not for (`languages`, default ["zh"]; ["en"] for
paraformer-en; null for any) is passed on untouched with the flag `no_asr_for_language:<lang>`;
a record with no language is transcribed. An empty text leaves the transcript empty with the flag
`asr_empty`. A transcript a better source holds (the manifest's) is the stage runner's to keep: it
skips the record.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from echat.schemas.labels import normalise
from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import MODEL
from echat.schemas.text import CJK_RANGES

from .asr import ASR_EMPTY_FLAG, NO_ASR_FLAG_PREFIX
from .flags import add_flag
from .funasr_models import FunASRStage, ModelSource
from .model_hub import model_label

BACKEND = "paraformer"
DEFAULT_MODEL = "paraformer-zh"
TRANSCRIPT_CONFIDENCE = 0.8
WORDS_UNALIGNED_FLAG = "words_unaligned"
_SPACE_BETWEEN_CJK = re.compile(f"(?<=[{CJK_RANGES}])\\s+(?=[{CJK_RANGES}])")


def tidy_text(text: str) -> str:
    """Single spaces, none between two Chinese characters."""
    return _SPACE_BETWEEN_CJK.sub("", " ".join(str(text or "").split()))


def words_of(text: str, timestamps: list | None, total_s: float) -> list[dict[str, Any]] | None:
    """Word entries from Paraformer's unpunctuated text (tokens separated by spaces when it gives
    timestamps) and its [[start_ms, end_ms], ...], inside [0, total_s] (funasr's first start is
    30 ms early, its last end may pass the end of the audio); None when they do not pair up."""
    tokens = str(text or "").split()
    if timestamps is None or len(tokens) != len(timestamps):
        return None
    words = []
    for token, stamp in zip(tokens, timestamps):
        start = min(total_s, max(0.0, float(stamp[0]) / 1000.0))
        end = min(total_s, max(0.0, float(stamp[1]) / 1000.0))
        if end < start:
            return None
        words.append({"word": token, "start": start, "end": end, "score": None})
    return words


class ParaformerASR(FunASRStage):
    name: ClassVar[str] = "asr"
    backend: ClassVar[str] = BACKEND
    reads: ClassVar[tuple[str, ...]] = ("_waveform", "sampling_rate", "language")
    writes: ClassVar[tuple[str, ...]] = (
        "transcript",
        "transcript_origin",
        "transcript_confidence",
        "words",
        "quality_flags",
    )
    origin: ClassVar[str] = MODEL
    batch_size: ClassVar[int] = 8

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        punc_model: str | None = None,
        hub: str = "ms",
        cache_dir: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        device: str = "cpu",
        ncpu: int = 1,
        timestamps: bool = True,
        languages: list[str] | None = ("zh",),
    ):
        super().__init__(ModelSource(model, hub, cache_dir, revision, bool(local_files_only), device, int(ncpu)))
        if punc_model is not None and (not isinstance(punc_model, str) or not punc_model.strip()):
            raise ValueError(f"punc_model must be null, a hub id, a funasr model name or a local path, got {punc_model!r}")
        self.punc_model = punc_model
        self.timestamps = bool(timestamps)
        # Codes of the record's vocabulary (schemas/vocab.py), spelt as the alias table allows.
        self.languages = None if languages is None else tuple(normalise("language", code) for code in languages)

    def load_options(self) -> dict[str, Any]:
        if self.punc_model is None:
            return {}
        return {"punc_model": self.source.with_model(self.punc_model).local_dir()}

    def generate_options(self) -> dict[str, Any]:
        # return_raw_text keeps the text before punctuation, whose tokens the timestamps pair with.
        return {"output_timestamp": self.timestamps, "return_raw_text": True}

    def describe(self) -> str:
        described = super().describe()
        return f"{described}+{model_label(self.punc_model)}" if self.punc_model else described

    def passthrough(self, record: dict[str, Any]) -> dict[str, Any] | None:
        language = record.get("language")
        if self.languages is not None and language is not None and language not in self.languages:
            out = dict(record)
            add_flag(out, f"{NO_ASR_FLAG_PREFIX}{language}")
            return out
        return None

    def label(self, record: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
        out = dict(record)
        raw = str(result.get("raw_text", result.get("text")) or "")
        text = tidy_text(str(result.get("text") or ""))
        if not text:
            add_flag(out, ASR_EMPTY_FLAG)
            return out
        out["transcript"] = text
        out["transcript_confidence"] = TRANSCRIPT_CONFIDENCE
        if "timestamp" in result:
            words = words_of(raw, result.get("timestamp"), len(record["_waveform"]) / SAMPLE_RATE)
            if words is None:
                add_flag(out, WORDS_UNALIGNED_FLAG)
            else:
                out["words"] = words
        return out
