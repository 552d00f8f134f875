"""The manifest as a reference: untrusted fields are labelled by the labelers and scored."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from echat.labelers.vad import SPLIT_FLAG
from echat.pipelines.accuracy import LabelAccuracyFn
from echat.pipelines.profile import ProfileError, load_profile
from echat.pipelines.sources import list_sources


def _rows():
    return [
        {"gender": "male", "emotion": "sad", "transcript": "i am so tired", "language": "en",
         "_reference": {"gender": "male", "emotion": "happy", "transcript": "I am so tired.", "events": ["cough"]},
         "events": ["cough"]},
        {"gender": None, "emotion": "sad", "transcript": "hello there", "language": "en",
         "_reference": {"gender": "female", "emotion": "sad", "transcript": "hello world", "events": []},
         "events": None},
        {"gender": "female", "transcript": None, "quality_flags": [SPLIT_FLAG],
         "_reference": {"gender": "female", "transcript": "the whole file's words"}},
        {"gender": "female"},  # no reference: not scored
    ]


def test_the_combiner_scores_labels_events_and_transcripts_across_bundles():
    fn = LabelAccuracyFn()
    halves = [fn.create_accumulator(), fn.create_accumulator()]
    for i, row in enumerate(_rows()):
        fn.add_input(halves[i % 2], row)
    table = fn.extract_output(fn.merge_accumulators(halves))
    gender = table["gender"]
    assert (gender["scored"], gender["correct"], gender["labelled"]) == (3, 2, 2)
    assert gender["accuracy_of_labelled"] == 1.0 and gender["coverage"] == pytest.approx(2 / 3)
    assert table["emotion"]["confusion"] == {"happy": {"sad": 1}, "sad": {"sad": 1}}
    assert table["events"]["scored"] == 1 and table["events"]["precision"] == 1.0 and table["events"]["unlabelled"] == 1
    wer = table["transcript_en"]  # "hello there" vs "hello world": 1 of 6 reference words
    assert wer["reference_tokens"] == 6 and wer["substitutions"] == 1 and wer["wer"] == pytest.approx(1 / 6)
    assert table["transcript_unscored_split_pieces"] == 1 and table["rows_with_reference"] == 3


def test_in_a_beam_pipeline_the_table_comes_out_whole():
    def check(tables):
        (table,) = tables
        assert table["gender"]["scored"] == 3

    with BeamTestPipeline() as p:
        assert_that(p | beam.Create(_rows()) | beam.CombineGlobally(LabelAccuracyFn()), check)


def test_trust_manifest_per_field_moves_the_rest_to_the_reference(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"path": "a.wav", "text": "hi", "language": "en", "gender": "F", "emotion": "sad"}\n')
    (record,) = list_sources(str(manifest), dataset_name="d", license=None, trust_manifest=["transcript", "language"]).records
    assert record["transcript"] == "hi" and record["language"] == "en" and record.get("gender") is None
    assert record["_reference"] == {"gender": "female", "emotion": "sad"}
    (whole,) = list_sources(str(manifest), dataset_name="d", license=None).records
    assert whole["gender"] == "female" and "_reference" not in whole


def test_the_profile_language_fills_records_that_have_none(tmp_path):
    (tmp_path / "a.wav").write_bytes(b"")
    (record,) = list_sources(str(tmp_path), dataset_name="d", license=None, language="en").records
    assert (record["language"], record["language_origin"]) == ("en", "profile")


def test_profile_checks_trust_fields_and_language():
    with pytest.raises(ProfileError, match="unknown field.*'gendr'"):
        load_profile("local", ["trust_manifest=[transcript, gendr]"])
    assert load_profile("local", ["language=English"]).language == "en"
    with pytest.raises(ProfileError, match="language"):
        load_profile("local", ["language=klingon"])
