"""Sources: folders and manifests become records; bad manifest rows become rejects."""

import json

import pytest

from echat.pipelines.sources import list_sources


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"RIFF")
    return path


def test_folder_is_searched_recursively_for_audio(tmp_path):
    _touch(tmp_path / "a.wav"), _touch(tmp_path / "x" / "b.FLAC"), _touch(tmp_path / "x" / "y" / "c.mp3")
    (tmp_path / "notes.txt").write_text("hi")
    listing = list_sources(str(tmp_path), dataset_name="d", license="cc-by-4.0")
    uris = [r["source_uri"] for r in listing.records]
    assert uris == ["a.wav", "x/b.FLAC", "x/y/c.mp3"]  # relative to the input root
    assert [r["_source_path"] for r in listing.records] == [str(tmp_path / u) for u in uris]
    assert listing.skipped_files == 1
    assert all(r["source_dataset"] == "d" and r["license"] == "cc-by-4.0" for r in listing.records)


def test_jsonl_manifest_fields_and_relative_paths(tmp_path):
    _touch(tmp_path / "audio" / "one.wav")
    rows = [
        {"path": "audio/one.wav", "text": "I lost my keys", "language": "English", "speaker": "s1",
         "gender": "F", "emotion": "sad", "events": ["cough"]},
        {"wav": "/abs/two.wav"},
        {"path": "four.wav", "events": []},  # nothing heard: a label, not a missing one
        {"audio": "three.wav", "emotion": "furious"},  # not in the vocabulary
        {"text": "no path here"},
    ]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n")
    listing = list_sources(str(manifest), dataset_name="d", license=None)
    first, second, fourth = listing.records
    assert fourth["events"] == [] and fourth["events_model"] == "manifest"
    assert first["source_uri"] == "audio/one.wav" and first["_source_path"] == str(tmp_path / "audio" / "one.wav")
    assert first["transcript"] == "I lost my keys" and first["transcript_origin"] == "manifest"
    assert first["language"] == "en" and first["language_origin"] == "manifest"
    assert (first["gender"], first["gender_model"], first["gender_score"]) == ("female", "manifest", 1.0)
    assert first["emotion"] == "sad" and first["events"] == ["cough"]
    # outside the manifest's folder: a stable name that carries no path of this machine
    assert second["source_uri"].startswith("external/") and second["source_uri"].endswith("/two.wav")
    assert "abs" not in second["source_uri"] and second["_source_path"] == "/abs/two.wav"
    assert "transcript" not in second and "events" not in second
    reasons = sorted(r.reason for r in listing.rejects)
    assert reasons == ["invalid_label", "manifest_row_invalid", "manifest_row_invalid"]
    bad_label = next(r for r in listing.rejects if r.reason == "invalid_label")
    assert "furious" in bad_label.detail and bad_label.source_uri == "three.wav"
    assert {r.source_uri for r in listing.rejects if r.reason == "manifest_row_invalid"} == {"manifest.jsonl:5", "manifest.jsonl:6"}


def test_csv_manifest(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("audio,text,language\nclip.wav,hello there,en\n")
    listing = list_sources(str(manifest), dataset_name="d", license=None)
    assert listing.records[0]["source_uri"] == "clip.wav"
    assert listing.records[0]["transcript"] == "hello there"


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_sources(str(tmp_path / "nope"), dataset_name="d", license=None)
    with pytest.raises(FileNotFoundError, match="manifest"):
        list_sources(str(tmp_path / "nope.jsonl"), dataset_name="d", license=None)


def test_odd_rows_become_rejects_not_crashes(tmp_path):
    rows = [{"path": "a.wav", "events": 5}, {"path": ["x.wav"]}, {"path": "b.wav", "events": ["Cough", "cough"]},
            {"path": "c.wav", "text": "line\u2028separator inside a string"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    listing = list_sources(str(manifest), dataset_name="d", license=None)
    assert [r.reason for r in listing.rejects] == ["invalid_label", "manifest_row_invalid"]
    assert "events must be a list" in listing.rejects[0].detail
    b, c = listing.records
    assert b["events"] == ["cough"]  # normalised, each event once
    assert c["transcript"] == "line\u2028separator inside a string"  # one row, not split at U+2028


def test_manifests_with_a_byte_order_mark(tmp_path):
    csv_manifest = tmp_path / "m.csv"
    csv_manifest.write_bytes("\ufeffpath,text\nclip.wav,hello\n".encode("utf-8"))
    jsonl_manifest = tmp_path / "m.jsonl"
    jsonl_manifest.write_bytes(("\ufeff" + json.dumps({"path": "clip.wav"}) + "\n").encode("utf-8"))
    for manifest in (csv_manifest, jsonl_manifest):
        listing = list_sources(str(manifest), dataset_name="d", license=None)
        assert not listing.rejects and listing.records[0]["source_uri"] == "clip.wav"


def test_single_audio_file_and_unknown_input_types(tmp_path):
    clip = _touch(tmp_path / "one.wav")
    listing = list_sources(str(clip), dataset_name="d", license=None)
    assert [(r["source_uri"], r["_source_path"]) for r in listing.records] == [("one.wav", str(clip))]
    other = tmp_path / "data.json"
    other.write_text("{}")
    with pytest.raises(ValueError, match="not a folder, an audio file"):
        list_sources(str(other), dataset_name="d", license=None)


def test_the_same_corpus_in_another_place_gets_the_same_ids_and_uris(tmp_path):
    from echat.schemas.record import record_id

    for place in ("here", "there/deeper"):
        _touch(tmp_path / place / "corpus" / "a" / "x.wav")
    here = list_sources(str(tmp_path / "here" / "corpus"), dataset_name="d", license=None).records
    there = list_sources(str(tmp_path / "there" / "deeper" / "corpus"), dataset_name="d", license=None).records
    assert [r["source_uri"] for r in here] == [r["source_uri"] for r in there] == ["a/x.wav"]
    assert record_id(here[0]["source_uri"], 0.0, 1.0) == record_id(there[0]["source_uri"], 0.0, 1.0)


def test_hostile_folder_entries_are_built_rejected_or_counted_and_never_stop_the_listing(tmp_path):
    import os

    _touch(tmp_path / "good.wav")
    odd = os.fsdecode(b"bad\xffname.wav")  # a name that is not UTF-8
    _touch(tmp_path / odd)
    os.mkfifo(tmp_path / "fifo.wav")
    (tmp_path / "folder.wav").mkdir()
    os.symlink("loop2", tmp_path / "loop1")
    os.symlink("loop1", tmp_path / "loop2")
    os.symlink(".", tmp_path / "self")
    listing = list_sources(str(tmp_path), dataset_name="d", license=None)
    assert [r["source_uri"] for r in listing.records] == ["bad\\xffname.wav", "good.wav"]  # escaped, lossless
    odd_record = listing.records[0]
    assert os.fsdecode(odd_record["_source_path"]) == str(tmp_path / odd)  # the bytes, to read it by
    (fifo,) = listing.rejects
    assert (fifo.source_uri, fifo.reason) == ("fifo.wav", "not_a_regular_file") and "FIFO" in fifo.detail
    assert listing.skipped == {"folders named like audio files": 1, "broken or looping links": 2,
                               "links to folders (not followed)": 1}


def test_a_folder_without_audio_is_an_error_saying_what_it_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "x.wav").mkdir()
    with pytest.raises(ValueError, match=r"no audio files .* found 1 folders named like audio files, 1 non-audio files"):
        list_sources(str(tmp_path), dataset_name="d", license=None)


def test_a_manifest_that_is_not_utf8_names_line_column_and_byte_or_reads_with_its_encoding(tmp_path):
    manifest = tmp_path / "sheet.csv"
    manifest.write_bytes("path,text\nclip.wav,caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"sheet.csv is not utf-8: line 2, column 13 holds byte 0xe9.*manifest_encoding=latin-1"):
        list_sources(str(manifest), dataset_name="d", license=None)
    (record,) = list_sources(str(manifest), dataset_name="d", license=None, manifest_encoding="latin-1").records
    assert record["transcript"] == "café au lait"
