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


def test_arrow_schema_and_features_agree_field_by_field():
    import datasets

    schema = record.arrow_schema()
    features = record.hf_features()
    assert schema.names == list(features) == [f.name for f in record.FIELDS]
    feature_types = features.arrow_schema
    for f in record.FIELDS:
        arrow = schema.field(f.name)
        assert arrow.type == feature_types.field(f.name).type, f.name  # the same storage type in both
        assert arrow.nullable  # `datasets` drops embedded features whose nullability differs
        feature = features[f.name]
        assert isinstance(feature, datasets.Audio) == (f.kind == record.AUDIO), f.name
        if f.kind == record.AUDIO:
            assert feature.sampling_rate == record.SAMPLE_RATE
    # the writer's schema carries the features: `datasets` reads them back as they were made
    assert datasets.Features.from_arrow_schema(schema) == features


def test_field_declarations_are_consistent():
    assert len(set(record.FIELD_NAMES)) == len(record.FIELDS)  # no field declared twice
    for f in record.FIELDS:
        if f.min is not None and f.max is not None:
            assert f.min <= f.max, f.name
        if f.allowed is not None:
            assert f.kind in (record.STRING, record.STRINGS) and len(set(f.allowed)) == len(f.allowed), f.name
    assert record.FIELDS_BY_NAME["sampling_rate"].min == record.FIELDS_BY_NAME["sampling_rate"].max == record.SAMPLE_RATE


def _value(f: record.Field):
    """A value of the right kind for every field (the first allowed one for closed fields)."""
    if f.allowed:
        return [f.allowed[0]] if f.kind == record.STRINGS else f.allowed[0]
    lo = f.min if f.min is not None else 0.0
    return {
        record.STRING: f"{f.name}-value",
        record.FLOAT: float(np.float32(lo + 0.25)) if f.max is None or f.max >= lo + 0.25 else float(lo),
        record.DOUBLE: lo + 0.125,
        record.INT: int(f.max if f.max is not None else 7),
        record.BOOL: True,
        record.AUDIO: {"bytes": _flac(0.25), "path": f"{f.name}.flac"},
        record.STRINGS: ["a", "b"],
        record.INTS: [1, 2, 4096],
        record.WORDS: [{"word": "hi", "start": 0.0, "end": 0.25, "score": 0.5}],
        record.TURNS: [{"role": "user", "text": "earlier"}],
    }[f.kind]


def test_every_field_round_trips_through_parquet_and_datasets(tmp_path):
    """A record with every field filled comes back unchanged: add a field once, the writer follows."""
    import datasets

    full = {f.name: _value(f) for f in record.FIELDS}
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist([record.to_row(full)], schema=record.arrow_schema()), path)
    (back,) = pq.read_table(path).to_pylist()
    assert back == full
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert ds.features == record.hf_features()
    row = ds.with_format(None).cast_column("audio", datasets.Audio(decode=False))[0]
    assert row["audio"]["bytes"] == full["audio"]["bytes"] and row["history"] == full["history"]


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


def test_to_row_names_every_missing_required_field_and_only_those():
    required = [f.name for f in record.FIELDS if not f.nullable]
    assert "id" in required and "audio" in required
    bad = {k: v for k, v in _minimal(transcript="hi").items() if k not in ("source_uri", "duration")}
    bad["segment_end"] = None  # present but None is missing too
    with pytest.raises(ValueError) as caught:
        record.to_row(bad)
    message = str(caught.value)
    assert "'x1'" in message  # the record's id
    assert message.endswith("lacks required field(s): source_uri, duration, segment_end")  # in schema order
    # every required field but one present: exactly that one is named
    for name in required:
        partial = {k: v for k, v in _minimal().items() if k != name}
        with pytest.raises(ValueError, match=rf"lacks required field\(s\): {name}$"):
            record.to_row(partial)


def test_to_row_keeps_schema_order_fills_nullable_fields_and_drops_working_keys():
    row = record.to_row(_minimal(_waveform=np.zeros(3), transcript="hi", unknown_key=1))
    assert list(row) == list(record.FIELD_NAMES)
    assert row["transcript"] == "hi" and row["gender"] is None and row["events"] is None
    assert "_waveform" not in row and "unknown_key" not in row


def test_record_id_is_stable_and_bound_sensitive():
    # stable across runs and versions: a hash of the text, not Python's per-process hash()
    assert record.record_id("a.wav", 0.0, 1.5) == "cb19ece4815a48d4231f"
    same = record.record_id("a.wav", 0.0, 1.5)
    assert len(same) == 20 and int(same, 16) >= 0
    assert record.record_id("a.wav", 0.0, 1.5000004) == same  # below the millisecond resolution
    others = {
        record.record_id("a.wav", 0.0, 1.501), record.record_id("a.wav", 0.001, 1.5),
        record.record_id("b.wav", 0.0, 1.5), record.record_id("a.wav", 1.5, 0.0), record.record_id("a.wav|0.000", 0.0, 1.5),
    }
    assert same not in others and len(others) == 5


def test_osum_label_form():
    assert vocab.osum_label("adult") == "<ADULT>" and vocab.osum_label("throat_clearing") == "<THROAT_CLEARING>"
    assert vocab.osum_label(None) == vocab.osum_label("") == vocab.UNKNOWN_PLACEHOLDER == "<&&>"
    assert vocab.DEFAULT_RECORD_TASK in record.FIELDS_BY_NAME["task"].allowed
