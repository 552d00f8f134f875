"""The record schema: one definition, and the pyarrow schema and datasets Features derived from it."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from echat.schemas import record, vocab


def _flac(seconds: float = 0.5) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 220 * t)).astype("float32"), 16000, format="FLAC")
    return buf.getvalue()


def _minimal(**extra):
    base = dict(
        id="x1", source_uri="a.wav", audio={"bytes": _flac(), "path": "x1.flac"}, sampling_rate=16000,
        duration=0.5, segment_start=0.0, segment_end=0.5, schema_version=record.SCHEMA_VERSION, pipeline_version="0",
    )
    base.update(extra)
    return base


def test_every_design_field_is_present():
    names = set(record.FIELD_NAMES)
    for required in ("id", "source_uri", "license", "audio", "sampling_rate", "duration", "segment_start", "segment_end",
                     "language", "transcript", "transcript_origin", "transcript_confidence", "words", "speaker",
                     "gender", "gender_score", "gender_model", "age", "emotion", "events", "style",
                     "snr_db", "speech_ratio", "think_tags", "think_text", "reply_emotion", "reply_text",
                     "reply_audio", "reply_speech_tokens", "llm_model", "tts_model", "prompt_version", "task",
                     "history", "schema_version", "pipeline_version", "quality_flags"):
        assert required in names, required


def test_arrow_schema_and_features_follow_fields():
    schema = record.arrow_schema()
    assert schema.names == list(record.FIELD_NAMES)
    features = record.hf_features()
    assert list(features) == list(record.FIELD_NAMES)
    assert type(features["audio"]).__name__ == "Audio" and features["audio"].sampling_rate == 16000
    assert type(features["reply_audio"]).__name__ == "Audio"


def test_parquet_round_trip_decodes_audio_with_datasets(tmp_path):
    import datasets

    rows = [record.to_row(_minimal(events=["cough"], reply_audio={"bytes": _flac(1.0), "path": "r.flac"},
                                   words=[{"word": "hi", "start": 0.0, "end": 0.2, "score": 0.9}]))]
    pq.write_table(pa.Table.from_pylist(rows, schema=record.arrow_schema()), tmp_path / "train-00000-of-00001.parquet")
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "*.parquet"), split="train")
    assert isinstance(ds.features["audio"], datasets.Audio)
    samples = ds[0]["reply_audio"].get_all_samples()
    assert samples.sample_rate == 16000 and samples.data.shape[-1] == 16000
    assert ds[0]["events"] == ["cough"] and ds[0]["words"][0]["word"] == "hi"


def test_to_row_names_a_missing_required_field():
    bad = _minimal()
    del bad["source_uri"]
    with pytest.raises(ValueError, match="source_uri"):
        record.to_row(bad)


def test_to_row_drops_working_keys():
    row = record.to_row(_minimal(_waveform=np.zeros(3)))
    assert "_waveform" not in row and set(row) == set(record.FIELD_NAMES)


def test_record_id_is_stable_and_bound_sensitive():
    assert record.record_id("a.wav", 0.0, 1.5) == record.record_id("a.wav", 0.0, 1.5)
    assert record.record_id("a.wav", 0.0, 1.5) != record.record_id("a.wav", 0.0, 1.6)
    assert record.record_id("a.wav", 0.0, 1.5) != record.record_id("b.wav", 0.0, 1.5)


def test_vocabularies_match_osum_conventions():
    assert set(vocab.EMOTIONS) == {"sad", "anger", "neutral", "happy", "surprise", "fear", "disgust", "other"}
    assert len(vocab.REPLY_EMOTIONS) == 14 and "WORRIED" in vocab.REPLY_EMOTIONS
    assert vocab.osum_label("adult") == "<ADULT>" and vocab.osum_label(None) == "<&&>"
    assert vocab.DEFAULT_RECORD_TASK in vocab.TASK_TAGS
