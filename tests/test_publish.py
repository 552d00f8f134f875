"""Publishing a build: validation (Great Expectations), the quality report, the dataset card, the Hub push."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from echat.cli import main
from echat.schemas import record as rec


def copy_build(src: Path, dst: Path) -> Path:
    """The shards, rejects and summary of a build (what `echat build` writes), in a folder of its own."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("data", "rejects"):
        shutil.copytree(src / name, dst / name)
    shutil.copy(src / "summary.json", dst / "summary.json")
    return dst


@pytest.fixture(scope="module")
def build(demo_build, tmp_path_factory) -> Path:
    return copy_build(demo_build[0], tmp_path_factory.mktemp("publish") / "build")


def absolute_paths_of(build: Path) -> list[str]:
    """Paths of the machine that built the corpus: the build folder and the input corpus."""
    summary = json.loads((build / "summary.json").read_text())
    return [str(build), str(Path(summary["input"]).parent)]


# ---------------------------------------------------------------------------------------------
# validation


def test_clean_build_validates(build, capsys):
    assert main(["validate", str(build)]) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "0 failed" in out
    results = json.loads((build / "validation" / "results.json").read_text())
    assert results["success"] and results["rows"] == pq.read_table(build / "data").num_rows
    assert results["decoded_audio"] > 0 and results["expectations"] > 40
    # GX's own results and its Data Docs pages, one per shard and suite
    gx_files = sorted(p.name for p in (build / "validation" / "gx").glob("*.json"))
    assert any(n.startswith("echat-record--") for n in gx_files) and "echat-dataset--dataset.json" in gx_files
    gx_result = json.loads((build / "validation" / "gx" / gx_files[-1]).read_text())
    assert gx_result["success"] and gx_result["results"]
    docs = (build / "validation" / "index.html").read_text()
    assert "PASSED" in docs and "Data Docs" in docs
    assert all((build / "validation" / "docs").glob("*.html"))


def test_suite_is_generated_from_the_schema():
    from echat.validation.suite import record_checks

    described = " ".join(c.says for c in record_checks())
    for f in rec.FIELDS:
        if f.allowed and f.kind == rec.STRING:
            assert f"{f.name} is one of" in described, f.name
        if f.min is not None or f.max is not None:
            assert f"{f.name} in [" in described, f.name
        if not f.nullable and f.kind == rec.STRING:
            assert f"{f.name} is required" in described, f.name
    assert "every item of events is one of" in described


@pytest.fixture(scope="module")
def tampered(build, tmp_path_factory) -> tuple[Path, dict]:
    """A copy whose shard has an off-vocabulary emotion, a negative duration, a duplicate id and an
    empty reply, each in its own row; returns (folder, {problem: id of its row})."""
    out = copy_build(build, tmp_path_factory.mktemp("tampered") / "build")
    path = next((out / "data").glob("*.parquet"))
    rows = pq.read_table(path).to_pylist()
    rows[3]["emotion"] = "furious"
    rows[5]["duration"] = -1.0
    rows[7]["id"] = rows[8]["id"]
    rows[10]["reply_text"] = ""
    rows[12]["events"] = ["cough", "applause"]
    pq.write_table(pa.Table.from_pylist(rows, schema=rec.arrow_schema()), path)
    return out, {"emotion": rows[3]["id"], "duration": rows[5]["id"], "id": rows[8]["id"], "reply": rows[10]["id"]}


def test_tampered_shard_fails_naming_each_problem(tampered, capsys):
    out, ids = tampered
    assert main(["validate", str(out)]) == 1
    printed = capsys.readouterr().out
    assert "FAILED" in printed
    lines = printed.splitlines()

    def block(heading: str) -> str:
        """The failure line that contains `heading`, with its example lines."""
        start = next(i for i, line in enumerate(lines) if "FAILED" in line and heading in line)
        end = next((j for j in range(start + 1, len(lines)) if not lines[j].startswith("      e.g.")), len(lines))
        return "\n".join(lines[start:end])

    emotion = block("emotion is one of")
    assert "'furious'" in emotion and ids["emotion"] in emotion
    duration = block("duration in [0")
    assert "-1.0" in duration and ids["duration"] in duration
    assert ids["id"] in block("id is unique") and ids["id"] in block("no id in two rows")
    reply = block("what its task needs")
    assert "reply_text" in reply and ids["reply"] in reply
    assert "'applause'" in block("every item of events")
    results = json.loads((out / "validation" / "results.json").read_text())
    assert not results["success"] and len(results["failures"]) == 6


def test_validate_build_function_and_reject_bound(build, tmp_path):
    from echat.validation import validate_build

    out = copy_build(build, tmp_path / "b")
    summary = json.loads((out / "summary.json").read_text())
    summary["rejects"]["total"] = summary["outputs"]["rows"]  # one reject per row: ratio 0.5
    (out / "summary.json").write_text(json.dumps(summary))
    result = validate_build(out, max_reject_ratio=0.4, decode_sample=0, data_docs=False)
    assert not result.success and result.decoded == 0
    (failure,) = result.failures
    assert "reject ratio" in failure.says and failure.examples[0]["bound"] == 0.4
    assert validate_build(out, max_reject_ratio=0.6, decode_sample=0, write=False).success


def test_undecodable_audio_fails(build, tmp_path):
    from echat.validation import validate_build

    out = copy_build(build, tmp_path / "b")
    path = next((out / "data").glob("*.parquet"))
    rows = pq.read_table(path).to_pylist()
    rows[0]["audio"] = {"bytes": b"fLaC" + b"\0" * 64, "path": rows[0]["audio"]["path"]}
    pq.write_table(pa.Table.from_pylist(rows, schema=rec.arrow_schema()), path)
    result = validate_build(out, decode_sample=1, write=False)
    (failure,) = [f for f in result.failures if "decodes" in f.says]
    assert failure.examples[0]["id"] == rows[0]["id"] and failure.says.startswith("audio ")


# ---------------------------------------------------------------------------------------------
# report


def test_report_renders_in_headless_chromium(build):
    """The page opens from disk in Debian's chromium (DevTools protocol): no console error, every
    image loaded, every audio player's file beside it, no path of the build machine."""
    from browser import chromium_binary, open_page

    assert main(["report", str(build)]) == 0
    page = build / "report" / "index.html"
    html = page.read_text()
    for section in ("Audio", "Labels", "Label accuracy", "Acoustics", "Replies", "Most repeated replies",
                    "Reply language against query language", "LLM tokens and cost", "Rejects", "Sample rows"):
        assert f">{section}<" in html, section
    assert "distinct-2" in html and "template engine" in html
    for path in absolute_paths_of(build):
        assert path not in html
    assert chromium_binary(), "chromium is needed for this test: `apt-get install -y chromium` (scripts/setup.sh)"
    report = open_page(page.as_uri())
    assert report.console_errors == [] and report.exceptions == [] and report.failed_requests == []
    assert len(report.images) >= 7
    assert all(img["complete"] and img["naturalWidth"] > 0 for img in report.images), report.images
    assert report.audio and all((page.parent / src).stat().st_size > 0 for src in report.audio)


def test_report_diversity_and_accuracy_numbers(build, tmp_path):
    from echat.validation.report import diversity_warnings, label_accuracy
    from echat.validation.stats import Distinct, collect

    d = Distinct()
    d.add("I am here for you.")
    d.add("I am here for you.")
    assert d.distinct1 == 5 / 10 and d.distinct2 == 4 / 8
    stats = collect(build)
    # the demo's template replies: the report must flag them
    assert any("template engine" in w for w in diversity_warnings(stats))
    stats.replies.clear()
    stats.replies.update({"same reply": 720 - 320, **{f"reply {i}": 1 for i in range(320)}})
    assert any("321 distinct replies of 720" in w for w in diversity_warnings(stats))
    # a reference that disagrees with a heuristic label is scored; manifest labels are not
    out = copy_build(build, tmp_path / "b")
    path = next((out / "data").glob("*.parquet"))
    rows = pq.read_table(path).to_pylist()
    for row in rows[:4]:
        row["gender_model"] = "pitch-threshold-v1"
    pq.write_table(pa.Table.from_pylist(rows, schema=rec.arrow_schema()), path)
    manifest = tmp_path / "truth.jsonl"
    with open(manifest, "w") as fh:
        for i, row in enumerate(rows[:4]):
            truth = row["gender"] if i < 3 else ("male" if row["gender"] == "female" else "female")
            fh.write(json.dumps({"path": row["source_uri"], "gender": truth, "emotion": row["emotion"]}) + "\n")
    table, matched = label_accuracy(out, manifest)
    assert matched == 4
    (gender,) = table  # emotion came from the manifest: not scored
    assert (gender["field"], gender["scored"], gender["correct"]) == ("gender", 4, 3)
    assert "heuristic" in gender["labelers"]


# ---------------------------------------------------------------------------------------------
# dataset card


def test_card_loads_through_datasets_and_parses(build, tmp_path):
    import datasets
    from huggingface_hub import DatasetCard

    assert main(["card", str(build)]) == 0
    text = (build / "README.md").read_text()
    card = DatasetCard.load(build / "README.md")
    data = card.data.to_dict()
    assert data["configs"][0]["data_files"][0] == {"split": "train", "path": "data/train-*.parquet"}
    assert set(data["language"]) == {"en", "zh"} and data["license"] == "unknown"
    assert data["size_categories"] == ["n<1K"] and "automatic-speech-recognition" in data["task_categories"]
    assert data["pretty_name"] and any(f["name"] == "audio" for f in data["dataset_info"]["features"])
    for words in ("## How it was built", "template-v1", "Label provenance", "## Known limitations", "arXiv:2508.09600",
                  "`reply_emotion`"):
        assert words in text, words
    for path in absolute_paths_of(build):
        assert path not in text
    ds = datasets.load_dataset(str(build), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds.num_rows == pq.read_table(build / "data").num_rows
    assert isinstance(ds.features["audio"], datasets.Audio) and ds.features["audio"].sampling_rate == 16000
    samples = ds[0]["audio"].get_all_samples()
    assert samples.sample_rate == 16000 and samples.data.shape[-1] > 1000


# ---------------------------------------------------------------------------------------------
# Hub push


def test_push_through_huggingface_hub_to_a_local_stand_in(build, tmp_path, monkeypatch, capsys):
    """`echat push` with the real huggingface_hub client against tests/hub_server.py, a local HTTP
    server on 127.0.0.1 that speaks the Hub's upload endpoints (create repo, validate YAML,
    preupload, commit, tree); not the real Hub."""
    from hub_server import HubStandIn

    out = copy_build(build, tmp_path / "b")  # no card or report yet: the push writes them first
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_for_test")
    with HubStandIn() as hub:
        assert main(["push", str(out), "--repo-id", "org/echat-demo", "--dry-run", "--endpoint", hub.url]) == 0
        dry = capsys.readouterr().out
        assert "does not exist yet" in dry and "data/train-00000-of-00001.parquet" in dry and "new" in dry
        assert not hub.repos  # a dry run writes nothing

        assert main(["push", str(out), "--repo-id", "org/echat-demo", "--private", "--endpoint", hub.url]) == 0
        pushed = capsys.readouterr().out
        repo = hub.repos["org/echat-demo"]
        assert repo["private"] and hub.commits
        local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert set(repo["files"]) == {k for k in local if k == "README.md" or k.startswith(("data/", "report/"))}
        assert all(repo["files"][k] == local[k] for k in repo["files"])
        assert "report/index.html" in repo["files"] and not any(k.startswith(("rejects/", "summary")) for k in repo["files"])
        assert hub.validated_yaml and "configs:" in hub.validated_yaml[0]

        assert main(["push", str(out), "--repo-id", "org/echat-demo", "--dry-run", "--endpoint", hub.url]) == 0
        again = capsys.readouterr().out
        assert "the repo exists" in again and f"{len(repo['files'])} unchanged" in again
        assert "hf_secret_token_for_test" not in dry + pushed + again


def test_push_needs_a_token(build, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = copy_build(build, tmp_path / "b")
    (out / "README.md").write_text("---\nlicense: unknown\n---\n")
    (out / "report").mkdir()
    (out / "report" / "index.html").write_text("<html></html>")
    assert main(["push", str(out), "--repo-id", "org/x", "--endpoint", "http://127.0.0.1:9"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err


def test_report_shows_llm_usage_and_rejects(build, tmp_path):
    from echat.validation.report import write_report

    out = copy_build(build, tmp_path / "b")
    lost = "/home/someone/corpus/audio/broken_file.wav"
    with open(out / "rejects" / "rejects-00000-of-00001.jsonl", "a") as fh:
        fh.write(json.dumps({"source_uri": lost, "stage": "decode", "reason": "decode_error",
                             "detail": f"decode_error: cannot read {lost}"}) + "\n")
    summary = json.loads((out / "summary.json").read_text())
    summary["stages"]["reply"]["usage"] = {"requests": 50, "cache_hits": 2, "prompt_tokens": 12000,
                                           "completion_tokens": 3400, "cost_micro_usd": 3840}
    (out / "summary.json").write_text(json.dumps(summary))
    html = write_report(out, samples=1).read_text()
    assert "12000" in html and "3400" in html and "$0.0038" in html
    assert "decode_error" in html and "broken_file.wav" in html and "/home/someone" not in html
    assert (out / "report" / "rejects.png").exists()


def test_duplicates_across_shards_fail_the_dataset_suite(build, tmp_path):
    from echat.validation import validate_build

    out = copy_build(build, tmp_path / "b")
    (path,) = list((out / "data").glob("*.parquet"))
    rows = pq.read_table(path).to_pylist()
    path.unlink()
    rows[30]["id"] = rows[0]["id"]
    rows[31]["audio"] = rows[1]["audio"]
    for i, part in enumerate((rows[:24], rows[24:])):
        pq.write_table(pa.Table.from_pylist(part, schema=rec.arrow_schema()), out / "data" / f"train-0000{i}-of-00002.parquet")
    result = validate_build(out, decode_sample=0, data_docs=False)
    assert result.shards == 2 and result.rows == len(rows)
    by_column = {f.column: f for f in result.failures}
    assert set(by_column) == {"duplicate_ids", "duplicate_audio"}  # each shard alone is fine
    ids_example = by_column["duplicate_ids"].examples[0]["rows"]
    assert ids_example == [f"data/train-00000-of-00002.parquet row 0 id={rows[0]['id']}",
                           f"data/train-00001-of-00002.parquet row 6 id={rows[0]['id']}"]
    assert "train-00001-of-00002.parquet row 7" in by_column["duplicate_audio"].examples[0]["rows"][1]
