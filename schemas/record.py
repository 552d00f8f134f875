"""The record: one row per sample, defined once.

`FIELDS` is the single source of truth. The parquet writer's pyarrow schema, the Hugging Face
`datasets.Features`, the validation suite and the dataset card's field table are all derived from
it, so adding a field here is the whole change.

In the pipeline a record is a plain dict keyed by these names. Working data that is not a column
(the decoded waveform, say) travels under keys that start with `_` and is dropped by `to_row`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import pyarrow as pa

from . import vocab

SCHEMA_VERSION = "1.0"
SAMPLE_RATE = 16_000  # Hz: every audio column (user turn and reply) is stored at this rate.
SOURCE_KINDS = ("real", "synthetic")

# Kinds of column. Each maps to one pyarrow type and one datasets feature.
STRING, FLOAT, DOUBLE, INT, BOOL = "string", "float32", "float64", "int32", "bool"
AUDIO, STRINGS, INTS, WORDS, TURNS = "audio", "list<string>", "list<int32>", "words", "turns"


@dataclass(frozen=True)
class Field:
    name: str
    kind: str
    description: str
    nullable: bool = True
    allowed: tuple[str, ...] | None = None  # closed vocabulary (for list kinds: of each item)
    min: float | None = None
    max: float | None = None


FIELDS: tuple[Field, ...] = (
    # identity and provenance
    Field("id", STRING, "Stable id: hash of source_uri (relative to the input root) and segment bounds, so a moved corpus keeps its ids.", nullable=False),
    Field("source_uri", STRING, "The input's location relative to the input root (a folder or bucket prefix, or a manifest's or list's folder): a file's path; <tar path>/<key> for a WeNet tar member; <dataset>/<data file>/<row> for a Hugging Face dataset row; a file outside the root is external/<hash of its folder>/<name>.", nullable=False),
    Field("source_dataset", STRING, "Name of the source corpus or manifest."),
    Field("source_kind", STRING, "real: recorded speech; synthetic: a query written and spoken for chosen cues.", allowed=SOURCE_KINDS),
    Field("license", STRING, "License of the source audio, when known."),
    # the user's turn
    Field("audio", AUDIO, "The user's speech: FLAC bytes at 16 kHz mono (HF audio struct).", nullable=False),
    Field("sampling_rate", INT, "Sampling rate of `audio` in Hz.", nullable=False, min=SAMPLE_RATE, max=SAMPLE_RATE),
    Field("duration", FLOAT, "Duration of `audio` in seconds.", nullable=False, min=0.0, max=3600.0),
    Field("segment_start", DOUBLE, "Start of the segment in the source file, seconds.", nullable=False, min=0.0),
    Field("segment_end", DOUBLE, "End of the segment in the source file, seconds.", nullable=False, min=0.0),
    Field("language", STRING, "Language code of the user's speech.", allowed=vocab.LANGUAGES),
    Field("language_origin", STRING, "Where the language came from (manifest, lid model...)."),
    Field("transcript", STRING, "What the user said."),
    Field("transcript_origin", STRING, "Where the transcript came from (manifest, pocketsphinx, ...)."),
    Field("transcript_confidence", FLOAT, "Confidence of the transcript, 0-1.", min=0.0, max=1.0),
    Field("words", WORDS, "Word timestamps (seconds from the segment start), when known."),
    Field("speaker", STRING, "Speaker id, when known."),
    # paraphrase labels: value, score, producing model
    Field("gender", STRING, "Speaker gender.", allowed=vocab.GENDERS),
    Field("gender_score", FLOAT, "Confidence of `gender`, 0-1.", min=0.0, max=1.0),
    Field("gender_model", STRING, "What produced `gender`."),
    Field("age", STRING, "Speaker age group.", allowed=vocab.AGES),
    Field("age_score", FLOAT, "Confidence of `age`, 0-1.", min=0.0, max=1.0),
    Field("age_model", STRING, "What produced `age`."),
    Field("emotion", STRING, "Emotion of the user's speech.", allowed=vocab.EMOTIONS),
    Field("emotion_score", FLOAT, "Confidence of `emotion`, 0-1.", min=0.0, max=1.0),
    Field("emotion_model", STRING, "What produced `emotion`."),
    Field("events", STRINGS, "Vocal events heard in the segment.", allowed=vocab.EVENTS),
    Field("events_score", FLOAT, "Confidence of `events`, 0-1.", min=0.0, max=1.0),
    Field("events_model", STRING, "What produced `events`."),
    Field("style", STRING, "Speaking style.", allowed=vocab.STYLES),
    Field("style_score", FLOAT, "Confidence of `style`, 0-1.", min=0.0, max=1.0),
    Field("style_model", STRING, "What produced `style`."),
    # acoustic metrics
    Field("snr_db", FLOAT, "Estimated signal-to-noise ratio, dB.", min=-20.0, max=100.0),
    Field("speech_ratio", FLOAT, "Fraction of the segment that is speech, 0-1.", min=0.0, max=1.0),
    Field("pitch_mean_hz", FLOAT, "Mean F0 over voiced frames, Hz.", min=0.0, max=1000.0),
    Field("pitch_std_hz", FLOAT, "Standard deviation of F0 over voiced frames, Hz.", min=0.0, max=1000.0),
    Field("speaking_rate", FLOAT, "Words (en) or characters (zh) per second of speech.", min=0.0, max=30.0),
    Field("clipping_ratio", FLOAT, "Fraction of samples at full scale, 0-1.", min=0.0, max=1.0),
    Field("loudness_dbfs", FLOAT, "RMS level, dB relative to full scale.", min=-120.0, max=0.0),
    # the assistant's turn
    Field("think_tags", STRING, "Reasoning trace, tag form: <think>User's words: ...; Age: <adult>; ...<think end>."),
    Field("think_text", STRING, "Reasoning trace, natural-language form: <think>...<think end>."),
    Field("reply_emotion", STRING, "Emotion the reply is spoken with.", allowed=vocab.REPLY_EMOTIONS),
    Field("reply_text", STRING, "The empathetic reply."),
    Field("reply_audio", AUDIO, "The reply spoken by TTS: FLAC bytes at 16 kHz mono (HF audio struct)."),
    Field("reply_duration", FLOAT, "Duration of `reply_audio` in seconds.", min=0.0, max=600.0),
    Field("reply_speech_tokens", INTS, "Speech tokens of the reply (CosyVoice 25 Hz, 4096 codes), when made."),
    Field("llm_model", STRING, "What wrote the reply and reasoning."),
    Field("tts_model", STRING, "What spoke the reply."),
    Field("reply_check_error", FLOAT, "Error rate of an ASR transcript of `reply_audio` against `reply_text` (WER; CER for Chinese), when back-checked.", min=0.0, max=10.0),
    Field("reply_check_model", STRING, "The ASR that back-checked `reply_audio`."),
    Field("speech_tokenizer_model", STRING, "What made `reply_speech_tokens`."),
    Field("prompt_version", STRING, "Version of the reply prompt or template."),
    # training metadata
    Field("task", STRING, "OSUM task tag the record serves.", allowed=vocab.TASK_TAGS),
    Field("history", TURNS, "Earlier turns of the dialogue, oldest first."),
    Field("quality_flags", STRINGS, "Warnings raised by the labelers and filters."),
    Field("schema_version", STRING, "Version of this schema.", nullable=False),
    Field("pipeline_version", STRING, "Version of echat-forge that built the record.", nullable=False),
)

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
FIELDS_BY_NAME: dict[str, Field] = {f.name: f for f in FIELDS}
AUDIO_FIELDS: tuple[str, ...] = tuple(f.name for f in FIELDS if f.kind == AUDIO)

# Fields that several sources may fill (the manifest, a model, a heuristic), each with the fields
# that travel with its value. Which source wins is the profile's precedence rule
# (schemas/stage_runner.py); a group is kept or replaced whole.
LABEL_GROUPS: dict[str, tuple[str, ...]] = {
    "transcript": ("transcript", "transcript_origin", "transcript_confidence", "words"),
    "language": ("language", "language_origin"),
    **{label: (label, f"{label}_score", f"{label}_model") for label in ("gender", "age", "emotion", "events", "style")},
}

# Where each produced value records what produced it. The stage runner stamps the provenance
# field from the stage's `describe()` whenever a stage writes the value (`_reply_waveform` is the
# reply speech before encoding).
PROVENANCE: dict[str, str] = {
    "transcript": "transcript_origin",
    "language": "language_origin",
    **{label: f"{label}_model" for label in ("gender", "age", "emotion", "events", "style")},
    "reply_text": "llm_model",
    "think_tags": "llm_model",
    "think_text": "llm_model",
    "reply_emotion": "llm_model",
    "_reply_waveform": "tts_model",
    "reply_speech_tokens": "speech_tokenizer_model",
}

_WORD = pa.struct([("word", pa.string()), ("start", pa.float32()), ("end", pa.float32()), ("score", pa.float32())])
_TURN = pa.struct([("role", pa.string()), ("text", pa.string())])
_AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

_ARROW_TYPES = {
    STRING: pa.string(),
    FLOAT: pa.float32(),
    DOUBLE: pa.float64(),
    INT: pa.int32(),
    BOOL: pa.bool_(),
    AUDIO: _AUDIO,
    STRINGS: pa.list_(pa.string()),
    INTS: pa.list_(pa.int32()),
    WORDS: pa.list_(_WORD),
    TURNS: pa.list_(_TURN),
}


@lru_cache(maxsize=1)
def arrow_schema() -> pa.Schema:
    """The pyarrow schema of a shard; `datasets` reads its Features from the metadata."""
    # Every arrow field stays nullable: `datasets` ignores the embedded features of a column whose
    # nullability differs from its own schema. `to_row` enforces the required fields instead.
    schema = pa.schema([pa.field(f.name, _ARROW_TYPES[f.kind]) for f in FIELDS])
    features = hf_features()
    # Embedding the features lets `datasets.load_dataset("parquet")` return Audio columns as is.
    return schema.with_metadata({"huggingface": _json_dumps({"info": {"features": features.to_dict()}})})


def hf_features():
    """The Hugging Face `datasets.Features` of a record, with `Audio` columns at 16 kHz."""
    import datasets  # imported here: `datasets` takes most of a second to import

    def feature(f: Field):
        if f.kind == AUDIO:
            return datasets.Audio(sampling_rate=SAMPLE_RATE)
        if f.kind == WORDS:
            return datasets.List(
                {
                    "word": datasets.Value("string"),
                    "start": datasets.Value("float32"),
                    "end": datasets.Value("float32"),
                    "score": datasets.Value("float32"),
                }
            )
        if f.kind == TURNS:
            return datasets.List({"role": datasets.Value("string"), "text": datasets.Value("string")})
        if f.kind == STRINGS:
            return datasets.List(datasets.Value("string"))
        if f.kind == INTS:
            return datasets.List(datasets.Value("int32"))
        return datasets.Value(f.kind)

    return datasets.Features({f.name: feature(f) for f in FIELDS})


def record_id(source_uri: str, start: float, end: float) -> str:
    """Stable id of a segment: the same source and bounds give the same id on every run."""
    key = f"{source_uri}|{start:.3f}|{end:.3f}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:20]


def to_row(record: dict[str, Any]) -> dict[str, Any]:
    """The columns of `record` in schema order; missing columns are None, working keys dropped.

    Raises ValueError naming the field when a required column is missing.
    """
    row = {name: record.get(name) for name in FIELD_NAMES}
    missing = [f.name for f in FIELDS if not f.nullable and row[f.name] is None]
    if missing:
        raise ValueError(f"record {record.get('id')!r} lacks required field(s): {', '.join(missing)}")
    return row


def _json_dumps(obj: Any) -> str:
    import json

    return json.dumps(obj, ensure_ascii=False)
