"""Builds from and to object stores, for real: s3:// on a local moto server through Beam's S3
filesystem, gs:// on gcp-storage-emulator through Beam's GCS filesystem; audio decoded from the
bucket through fsspec (s3fs, gcsfs); shards, rejects and the summary written to the bucket, then
read back with pyarrow and `datasets` through fsspec and reconciled. Preflight's bucket checks
(a missing bucket, an endpoint that never answers) via the `echat build` command line.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from cloud_servers import _installed, gcs_client, gcs_emulator, moto_server, object_store_env, s3_beam_args

# Found, not imported: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when first imported (object_store_env).
_missing = [m for m in ("boto3", "s3fs", "gcsfs", "google.cloud.storage") if not _installed(m)]
if _missing:
    pytest.skip(f"needs the test-cloud extra ({', '.join(_missing)} missing)", allow_module_level=True)

pytestmark = pytest.mark.slow

CORPUS, OUT = "echat-corpus", "echat-out"
N_AUDIO = 4


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Both servers running, the clients pointed at them, and the demo corpus in each store:
    CORPUS/in/manifest.jsonl with N_AUDIO demo files and one corrupt file (a reject to reconcile)."""
    from echat.synth.demo_corpus import make_demo_corpus

    logs = tmp_path_factory.mktemp("servers")
    corpus = tmp_path_factory.mktemp("cloud-corpus")
    make_demo_corpus(corpus, n=N_AUDIO, overwrite=True)
    manifest = (corpus / "manifest.jsonl").read_text(encoding="utf-8")
    manifest += json.dumps({"path": "audio/corrupt.wav", "text": "This file is not audio."}) + "\n"
    files = {f"in/{p.relative_to(corpus).as_posix()}": p.read_bytes() for p in sorted(corpus.rglob("*"))
             if p.is_file() and p.name != "manifest.jsonl"}
    files["in/manifest.jsonl"] = manifest.encode("utf-8")
    files["in/audio/corrupt.wav"] = b"RIFF\x00\x00\x00\x00WAVEnot really"

    with moto_server(logs) as s3_url, gcs_emulator(logs) as gcs_url, object_store_env(s3_url, gcs_url):
        import boto3

        s3 = boto3.client("s3")
        gcs = gcs_client()
        for bucket in (CORPUS, OUT):
            s3.create_bucket(Bucket=bucket)
            gcs.create_bucket(bucket)
        for key, data in files.items():
            s3.put_object(Bucket=CORPUS, Key=key, Body=data)
            gcs.bucket(CORPUS).blob(key).upload_from_string(data)
        yield {"s3": s3_beam_args(s3_url), "gs": [], "s3_url": s3_url}


@pytest.fixture(scope="module")
def bucket_builds(stores, local_profile):
    """{scheme: summary} of one build per store: input and output in the bucket."""
    from echat.pipelines.build import build

    return {scheme: build(local_profile(), f"{scheme}://{CORPUS}/in/manifest.jsonl", f"{scheme}://{OUT}/build",
                          beam_args=stores[scheme])
            for scheme in ("s3", "gs")}


def _fs(scheme: str):
    import fsspec

    return fsspec.filesystem(scheme)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_build_reads_and_writes_the_bucket(bucket_builds, scheme):
    summary = bucket_builds[scheme]
    fs = _fs(scheme)
    out = f"{OUT}/build"
    assert summary["inputs"]["sources"] == N_AUDIO + 1
    assert summary["inputs"]["decoded"] == N_AUDIO
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["rejects"]["by_stage_reason"] == {"decode/decode_error": 1}
    assert summary["outputs"]["rows"] >= N_AUDIO

    # everything the build writes is in the bucket, and what it says it wrote is there
    names = {p.split(f"{out}/", 1)[1] for p in fs.find(out)}
    assert {"summary.json", "reconciliation.jsonl", "_work/tallies.json", "_work/shards.json"} <= names
    assert not any(".echat-preflight-" in n or "/.tmp-" in n for n in names)
    assert json.loads(fs.cat(f"{out}/summary.json")) == json.loads(json.dumps(summary))
    shard_files = sorted(summary["outputs"]["shard_files"])
    assert shard_files and all(p.startswith(f"{scheme}://{out}/data/") for p in shard_files)
    assert sorted(f"{scheme}://{p}" for p in fs.glob(f"{out}/data/*.parquet")) == shard_files

    rejects = [json.loads(line) for p in fs.glob(f"{out}/rejects/*.jsonl") for line in fs.cat(p).decode().splitlines() if line]
    assert len(rejects) == summary["rejects"]["total"] == 1
    assert rejects[0]["reason"] == "decode_error" and rejects[0]["source_uri"].endswith("corrupt.wav")
    per_source = [json.loads(line) for line in fs.cat(f"{out}/reconciliation.jsonl").decode().splitlines() if line]
    assert len(per_source) == N_AUDIO + 1


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_bucket_folder_is_listed_by_the_pipeline(stores, scheme, local_profile):
    """A prefix as `--input`: Beam's MatchFiles lists it inside the pipeline; the ids are relative
    to the prefix, so they equal those of the same files built from the manifest's folder."""
    from echat.pipelines.build import build

    summary = build(local_profile("trust_manifest=false"), f"{scheme}://{CORPUS}/in/audio",
                    f"{scheme}://{OUT}/folder-build", beam_args=stores[scheme])
    assert summary["reconciliation"]["ok"], summary["reconciliation"]["mismatches"]
    assert summary["inputs"]["sources"] == N_AUDIO + 1 and summary["inputs"]["decoded"] == N_AUDIO
    assert summary["rejects"]["by_stage_reason"].get("decode/decode_error") == 1
    assert summary["skipped_in_input"] == {}
    in_bucket = {p.rsplit("/", 1)[1] for p in _fs(scheme).find(f"{CORPUS}/in/audio")}
    assert {row["source_uri"] for row in summary["per_source"]} == in_bucket  # relative to the prefix


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_shards_read_back_through_fsspec(bucket_builds, scheme, tmp_path):
    import datasets
    import pyarrow.parquet as pq
    import soundfile as sf
    import io

    summary = bucket_builds[scheme]
    fs = _fs(scheme)
    rows = []
    for path in summary["outputs"]["shard_files"]:
        with fs.open(path, "rb") as handle:
            rows += pq.read_table(handle).to_pylist()
    assert len(rows) == summary["outputs"]["rows"]
    assert len({r["id"] for r in rows}) == len(rows)
    assert all("://" not in r["source_uri"] for r in rows)  # relative to the input root, not the bucket
    for row in rows:
        audio, rate = sf.read(io.BytesIO(row["audio"]["bytes"]))
        assert rate == row["sampling_rate"] == 16000
        assert abs(len(audio) / rate - row["duration"]) < 0.05
        assert row["reply_text"]

    ds = datasets.load_dataset("parquet", data_files=f"{scheme}://{OUT}/build/data/*.parquet", split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(rows)
    assert sorted(ds["id"]) == sorted(r["id"] for r in rows)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_bucket_output_is_refused_then_replaced_whole(stores, bucket_builds, scheme, local_profile):
    """A bucket has no folders: an earlier build is still found (a finished one of the same profile
    is left as it is, one of unknown make refused without --overwrite), and --overwrite removes
    every object under the old folders, not only same-named ones."""
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    from echat.pipelines.build import _prepare_output, build

    again = build(local_profile(), f"{scheme}://{CORPUS}/in/manifest.jsonl", f"{scheme}://{OUT}/build", beam_args=stores[scheme])
    assert again["already_complete"]

    fs = _fs(scheme)
    base = f"{OUT}/replace"
    for name in ("data/train-00000-of-00009.parquet", "rejects/old.jsonl", "_work/tallies.json", "summary.json", "keep.txt"):
        fs.pipe(f"{base}/{name}", b"old")
    dirs = [f"{scheme}://{base}/{d}" for d in ("data", "rejects", "_work")]
    FileSystems.set_options(PipelineOptions(stores[scheme]))
    with pytest.raises(FileExistsError, match="already holds a build"):
        _prepare_output(f"{scheme}://{base}", dirs, overwrite=False, described={})
    _prepare_output(f"{scheme}://{base}", dirs, overwrite=True, described={})
    fs.invalidate_cache()
    assert [p.split(f"{base}/", 1)[1] for p in fs.find(base)] == ["_work/run.json", "keep.txt"]


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_preflight_names_a_missing_output_bucket(stores, scheme, capsys):
    from echat.cli import main

    rc = main(["build", "--input", f"{scheme}://{CORPUS}/in/manifest.jsonl", "--output", f"{scheme}://no-such-bucket/out",
               *stores[scheme]])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"echat build: cannot write to {scheme}://no-such-bucket/out:"), err


def test_preflight_does_not_hang_on_an_endpoint_that_never_answers(stores, capsys, monkeypatch):
    """An S3 endpoint that accepts connections and never replies: one line after the timeout."""
    from echat.cli import main

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    accepted = []
    stop = threading.Event()

    def hold():  # accept and keep every connection open, answering nothing
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except OSError:
                continue

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    monkeypatch.setenv("ECHAT_PREFLIGHT_TIMEOUT_S", "1.5")
    try:
        args = [a for a in stores["s3"] if not a.startswith("--s3_endpoint_url")] + [f"--s3_endpoint_url=http://127.0.0.1:{port}"]
        rc = main(["build", "--input", f"s3://{CORPUS}/in/manifest.jsonl", "--output", f"s3://{OUT}/never", *args])
    finally:
        stop.set()
        holder.join()
        for conn in accepted:
            conn.close()
        silent.close()
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert "cannot reach s3://" in err and "within 1.5 s" in err, err
