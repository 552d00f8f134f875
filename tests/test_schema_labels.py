"""schemas/labels.py: one alias table per closed field, used by the manifest reader and the model's loader."""

import json

import pytest

from echat.model.data_sources import record_from_osum
from echat.pipelines.sources import list_sources
from echat.schemas import labels, vocab
from echat.schemas.record import FIELDS


def test_every_closed_field_of_the_record_has_a_table():
    closed = {f.name for f in FIELDS if f.allowed is not None}
    assert set(labels.LABEL_FIELDS) == closed
    assert {"gender", "age", "emotion", "events", "style", "language", "reply_emotion"} <= closed
    assert labels.LIST_FIELDS == ("events",)


@pytest.mark.parametrize("field", sorted({f.name for f in FIELDS if f.allowed is not None}))
def test_each_allowed_value_maps_to_itself(field):
    allowed = labels.VOCABULARIES[field]
    assert allowed == next(f.allowed for f in FIELDS if f.name == field)
    for value in allowed:
        assert labels.normalise(field, value) == value
        assert labels.normalise(field, f"  {value} ") == value


@pytest.mark.parametrize(
    "field, given, expected",
    [
        ("gender", "F", "female"), ("gender", "man", "male"),
        ("age", "elderly", "old"), ("age", "kid", "child"), ("age", "MIDDLE_AGE", "adult"), ("age", "youth", "adult"),
        ("emotion", "Angry", "anger"), ("emotion", "sadness", "sad"), ("emotion", "SURPRISED", "surprise"),
        ("events", "Laughter", "laugh"), ("events", "throat clearing", "throat_clearing"),
        ("events", "Throat-Clearing", "throat_clearing"),
        ("style", "News/Science", "news/science"), ("style", "DAILY CONVERSATION", "daily conversation"),
        ("style", "童话故事", "fairy tale"), ("style", "客服", "customer service"),
        ("language", "English", "en"), ("language", "en-US", "en"), ("language", "Mandarin", "zh"), ("language", "zh_CN", "zh"),
        ("reply_emotion", "worried", "WORRIED"), ("reply_emotion", "angry", "ANGER"), ("reply_emotion", "Sorry", "SORRY"),
        ("task", "<TRANSCRIBE><AGE>  <GENDER>", "<TRANSCRIBE> <AGE> <GENDER>"),
    ],
)
def test_aliases_map(field, given, expected):
    assert labels.normalise(field, given) == expected


def test_every_alias_maps_into_its_vocabulary():
    for field, table in labels.ALIASES.items():
        for alias, canonical in table.items():
            assert canonical in labels.VOCABULARIES[field]
            assert labels.normalise(field, alias) == canonical


@pytest.mark.parametrize(
    "field, tag, expected",
    [("age", "<ADULT>", "adult"), ("gender", "<FEMALE>", "female"), ("emotion", "<SAD>", "sad"),
     ("events", "<THROAT_CLEARING>", "throat_clearing"), ("age", "<MIDDLE_AGE>", "adult"),
     ("reply_emotion", "<WORRIED>", "WORRIED"), ("style", "<新闻科普>", "news/science")],
)
def test_osum_bracket_forms(field, tag, expected):
    assert labels.normalise(field, tag) == expected


@pytest.mark.parametrize(
    "field, value",
    [("emotion", "furious"), ("gender", "<&&>"), ("age", "teen"), ("events", "applause"), ("style", "rap"),
     ("language", "fr"), ("reply_emotion", "ELATED"), ("task", "<TRANSLATE>"), ("emotion", ""), ("gender", "<>")],
)
def test_off_vocabulary_raises_naming_field_value_and_allowed_set(field, value):
    with pytest.raises(labels.LabelError) as caught:
        labels.normalise(field, value)
    err = caught.value
    assert isinstance(err, ValueError)
    assert (err.field, err.value) == (field, value)
    assert str(err).startswith(f"{field} {value!r} ")
    assert all(a in str(err) for a in labels.VOCABULARIES[field])


def test_non_strings_and_unknown_fields():
    with pytest.raises(labels.LabelError, match="gender 1 is a int"):
        labels.normalise("gender", 1)
    with pytest.raises(KeyError, match="speaker"):
        labels.normalise("speaker", "s1")


def test_events_are_normalised_each_once_in_order():
    assert labels.normalise_events(["Cough", "laughter", "cough", "<LAUGH>", "sigh"]) == ["cough", "laugh", "sigh"]
    assert labels.normalise_events([]) == []
    with pytest.raises(labels.LabelError, match="events 'applause'"):
        labels.normalise_events(["cough", "applause"])
    with pytest.raises(labels.LabelError, match="must be a list"):
        labels.normalise_events("cough")


def test_normalise_record_and_check_record_labels():
    record = {"id": "r1", "gender": "F", "age": None, "events": ["Cough", "cough"], "reply_emotion": "worried",
              "language": "English", "task": "<S2TCHAT><TEXT2TOKEN><THINK>", "speaker": "Bob", "transcript": "Angry"}
    out = labels.normalise_record(record)
    assert out is not record and record["gender"] == "F"  # a copy; the input is left alone
    assert out == {**record, "gender": "female", "events": ["cough"], "reply_emotion": "WORRIED", "language": "en",
                   "task": "<S2TCHAT> <TEXT2TOKEN> <THINK>"}
    assert labels.check_record_labels(record) == []
    bad = {**record, "emotion": "furious", "events": ["cough", "applause"], "style": 3}
    problems = labels.check_record_labels(bad)
    assert [(p.field, p.value) for p in problems] == [("emotion", "furious"), ("events", "applause"), ("style", 3)]
    with pytest.raises(labels.LabelError, match="emotion 'furious'"):
        labels.normalise_record(bad)


def test_manifest_and_model_loader_share_the_table(tmp_path):
    """The same spellings give the same labels through the manifest reader and the OSUM raw-list loader."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.wav", "age": "middle_age", "gender": "<FEMALE>", "emotion": "Angry",
                                    "style": "童话故事", "events": ["Laughter", "laugh"], "language": "Mandarin"}) + "\n")
    (from_manifest,) = list_sources(str(manifest), dataset_name="d", license=None).records
    entry = {"key": "k", "wav": "a.wav", "task": "<CAPTION>", "txt": "<Laughter><LAUGH>", "lang": "Mandarin",
             "extra": {"age": "<MIDDLE_AGE>", "gender": "<FEMALE>", "emotion": "<ANGRY>", "style": "<童话故事>"}}
    from_osum = record_from_osum(entry, str(tmp_path))
    for field in ("age", "gender", "emotion", "style", "events", "language"):
        assert from_manifest[field] == from_osum[field], field
    assert (from_osum["age"], from_osum["gender"], from_osum["events"]) == ("adult", "female", ["laugh"])
    # off the vocabulary: a reject in the build, an unknown label (None) in the model's loader
    manifest.write_text(json.dumps({"path": "a.wav", "age": "teen"}) + "\n")
    (reject,) = list_sources(str(manifest), dataset_name="d", license=None).rejects
    assert reject.reason == "invalid_label" and "age 'teen'" in reject.detail and all(a in reject.detail for a in vocab.AGES)
    assert record_from_osum({**entry, "extra": {"age": "<TEEN>"}}, str(tmp_path))["age"] is None
