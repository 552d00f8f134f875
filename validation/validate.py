"""`echat validate OUT`: run the Great Expectations suites (validation/suite.py) over a build.

Shard by shard: a shard is read in batches of rows; each batch's audio is measured, hashed and (for
a sample of rows) decoded, then dropped, so what stays in memory is one shard's flat columns and
two 8-byte hashes per row (ids and audio, for the corpus-wide duplicate checks). Each shard is
validated against the schema suite and the record suite; the corpus as a whole against the dataset
suite (reject ratio, duplicates across shards, rows against summary.json).

Writes under OUT/validation/:
  results.json       the verdict, every failed expectation with example rows, per-shard counts
  gx/*.json          Great Expectations' own validation results, one file per shard and suite
  index.html         the Data Docs: GX's rendered results (one page per shard and suite), linked

`validate_build(out_dir)` is the function behind the command (`echat build` calls it at the end).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import corpus
from .suite import (
    DATASET_SUITE, DEFAULT_MAX_REJECT_RATIO, DURATION_TOLERANCE_S, ROW_INDEX, ROW_SUITE, SCHEMA_SUITE,
    build_suite, dataset_checks, derived_columns, problem_column, record_checks, record_frame_columns,
    schema_checks, schema_frame,
)

log = logging.getLogger(__name__)

VALIDATION_DIR = "validation"
DEFAULT_DECODE_SAMPLE = 8  # rows per shard whose audio (and reply audio) is decoded
EXAMPLES = 5  # example rows kept per failed expectation and shard


@dataclass
class Failure:
    """A failed expectation: which, where, how many rows, and a few of them."""

    suite: str
    expectation: str  # GX's expectation type
    says: str  # in words
    where: str  # a shard (relative to OUT) or "dataset"
    unexpected: int | None
    examples: list[dict[str, Any]] = field(default_factory=list)
    observed: Any = None
    column: str | None = None

    def line(self) -> str:
        count = f"{self.unexpected} row(s)" if self.unexpected is not None else f"observed {self.observed!r}"
        return f"{self.says} [{self.expectation}] in {self.where}: {count}"


@dataclass
class ValidationResult:
    success: bool
    shards: int
    rows: int
    expectations: int  # evaluated, over every shard and suite
    failures: list[Failure]
    decoded: int  # audio columns decoded (sampled rows)
    seconds: float
    results_path: str | None = None
    docs_path: str | None = None

    def verdict(self) -> str:
        """The console verdict: one line per failed expectation (its shards together), with example rows."""
        state = "PASSED" if self.success else "FAILED"
        head = (f"echat validate: {state}: {self.shards} shard(s), {self.rows} rows, {self.expectations} expectations "
                f"evaluated, {len(self.failures)} failed; {self.decoded} audio files decoded ({self.seconds:.1f} s)")
        lines = [head]
        groups: dict[tuple[str, str, str], list[Failure]] = {}
        for f in self.failures:
            groups.setdefault((f.suite, f.says, f.expectation), []).append(f)
        for (_suite, says, expectation), group in groups.items():
            if len(group) == 1:
                lines.append(f"  FAILED {group[0].line()}")
            else:
                rows = sum(f.unexpected or 0 for f in group)
                lines.append(f"  FAILED {says} [{expectation}] in {len(group)} shards ({group[0].where}, ...): {rows} row(s)")
            examples = [(f.where, ex) for f in group for ex in f.examples][:EXAMPLES]
            for where, ex in examples:
                at = f"{where} " if len(group) > 1 else ""
                lines.append(f"      e.g. {at}{_example_text(ex)}")
        if self.results_path:
            lines.append(f"  results:   {self.results_path}")
        if self.docs_path:
            lines.append(f"  data docs: {self.docs_path}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "success": self.success, "shards": self.shards, "rows": self.rows, "expectations": self.expectations,
            "decoded_audio": self.decoded, "seconds": round(self.seconds, 2),
            "failures": [f.__dict__ for f in self.failures],
        }


def _example_text(example: dict[str, Any]) -> str:
    parts = []
    for key, value in example.items():
        if key == ROW_INDEX:
            parts.insert(0, f"row {value}")
        elif key == "id":
            parts.append(f"id={value}")
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------


class _Gx:
    """One ephemeral GX context with a pandas data source and the three suites registered."""

    def __init__(self, max_reject_ratio: float):
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        logging.getLogger("great_expectations").setLevel(logging.WARNING)
        # this module sets its own logger to INFO ("Created temporary directory ... docs site")
        logging.getLogger("great_expectations.data_context.types.base").setLevel(logging.WARNING)
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.context.data_sources.add_pandas("echat")
        self.checks = {SCHEMA_SUITE: schema_checks(), ROW_SUITE: record_checks(), DATASET_SUITE: dataset_checks(max_reject_ratio)}
        self.says = {name: {c.expectation.description: c.says for c in checks} for name, checks in self.checks.items()}
        self.suites = {name: self.context.suites.add(build_suite(name, checks)) for name, checks in self.checks.items()}
        self.batches = {name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole") for name in self.suites}

    def validate(self, suite: str, frame, index_columns: list[str] | None):
        batch = self.batches[suite].get_batch(batch_parameters={"dataframe": frame})
        result_format: dict[str, Any] = {"result_format": "COMPLETE", "partial_unexpected_count": EXAMPLES}
        if index_columns:
            result_format["unexpected_index_column_names"] = index_columns
        return batch.validate(self.suites[suite], result_format=result_format)


def _failures(gx: _Gx, suite: str, result, where: str) -> list[Failure]:
    out = []
    for r in result.results:
        if r.success:
            continue
        config = r.expectation_config
        column = config.kwargs.get("column") or "/".join(str(config.kwargs.get(k)) for k in ("column_A", "column_B") if config.kwargs.get(k))
        says = gx.says[suite].get(config.description, f"{config.type} on {column}")
        res = r.result or {}
        if r.exception_info and r.exception_info.get("raised_exception"):
            message = r.exception_info.get("exception_message") or "raised an exception"
            out.append(Failure(suite, config.type, says, where, None, [], f"error: {message}", column))
            continue
        examples = []
        for item in (res.get("unexpected_index_list") or [])[:EXAMPLES]:
            examples.append({k: _plain(v) for k, v in item.items()} if isinstance(item, dict) else {"value": _plain(item)})
        if not examples:
            examples = [{"value": _plain(v)} for v in (res.get("partial_unexpected_list") or [])[:EXAMPLES]]
        out.append(Failure(suite, config.type, says, where, res.get("unexpected_count"), examples, _plain(res.get("observed_value")),
                           column))
    return out


def _plain(value: Any) -> Any:
    """A JSON-able form of a value GX hands back (numpy scalars, tuples)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str, bytes)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _sample_rows(n_rows: int, k: int) -> set[int]:
    """`k` rows spread evenly over a shard of `n_rows` (first and last included)."""
    if k <= 0 or n_rows <= 0:
        return set()
    if k >= n_rows:
        return set(range(n_rows))
    return {round(i * (n_rows - 1) / (k - 1)) for i in range(k)} if k > 1 else {0}


def decode_problem(audio: dict | None, rate: Any, duration: Any) -> str | None:
    """None when `audio` decodes at `rate` Hz to `duration` s (within DURATION_TOLERANCE_S)."""
    from echat.schemas.audio import AudioError, load_audio

    data = (audio or {}).get("bytes") if isinstance(audio, dict) else None
    if not data:
        return None  # no bytes: the presence check speaks for a required column
    try:
        decoded = load_audio(data)
    except AudioError as err:
        return f"{err.reason}: {err.detail}"[:200]
    except Exception as err:  # any decoder failure is the row's problem, not the validator's
        return f"decode_error: {err}"[:200]
    if rate is not None and decoded.source_sample_rate != int(rate):
        return f"decodes at {decoded.source_sample_rate} Hz, the row says {int(rate)} Hz"
    if duration is not None and abs(decoded.source_duration - float(duration)) > DURATION_TOLERANCE_S:
        return f"decodes to {decoded.source_duration:.3f} s, the row says {float(duration):.3f} s"
    return None


_DURATION_OF = {"audio": "duration", "reply_audio": "reply_duration"}


class _Hashes:
    """8-byte hashes with their (shard, row), kept as numpy arrays: 16 bytes a row, whatever the corpus size."""

    def __init__(self):
        self.parts: list = []
        self.current: list[tuple[int, int, int]] = []

    def add(self, data: bytes, shard: int, row: int) -> None:
        self.current.append((_hash64(data), shard, row))

    def end_shard(self) -> None:
        import numpy as np

        if self.current:
            self.parts.append(np.asarray(self.current, dtype=np.uint64))
            self.current = []

    def duplicates(self) -> list[list[tuple[int, int]]]:
        """Groups of (shard, row) that share a hash, each group of two or more."""
        import numpy as np

        self.end_shard()
        if not self.parts:
            return []
        arr = np.concatenate(self.parts)
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
        _, starts, counts = np.unique(arr[:, 0], return_index=True, return_counts=True)
        return [[(int(s), int(r)) for _, s, r in arr[start : start + count]]
                for start, count in zip(starts, counts) if count > 1]


def _shard_frame(path: Path, decode_sample: int, shard_no: int, ids: _Hashes, audio_hashes: _Hashes) -> tuple[Any, int, int]:
    """(the record-suite frame of one shard, rows, audio files decoded); adds the shard's id and audio hashes."""
    import pandas as pd
    import pyarrow.parquet as pq

    from echat.schemas import record as rec

    n_rows = pq.ParquetFile(path).metadata.num_rows
    sampled = _sample_rows(n_rows, decode_sample)
    columns = record_frame_columns()
    audio_fields = [f.name for f in rec.FIELDS if f.kind == rec.AUDIO]
    records, decoded, row_no = [], 0, 0
    for batch in corpus.iter_batches(path):
        for row in batch.to_pylist():
            flat = {c: row.get(c) for c in columns if c in rec.FIELDS_BY_NAME}
            flat[ROW_INDEX] = row_no
            flat.update(derived_columns(row))
            for name in audio_fields:
                audio = row.get(name)
                if row_no in sampled and audio and audio.get("bytes"):
                    rate = row.get("sampling_rate") if name == "audio" else rec.SAMPLE_RATE
                    flat[problem_column(name, "decode")] = decode_problem(audio, rate, row.get(_DURATION_OF.get(name, "")))
                    decoded += 1
            if row.get("id") is not None:
                ids.add(str(row["id"]).encode("utf-8"), shard_no, row_no)
            audio = row.get("audio")
            if audio and audio.get("bytes"):
                audio_hashes.add(audio["bytes"], shard_no, row_no)
            records.append(flat)
            row_no += 1
        del batch
    ids.end_shard()
    audio_hashes.end_shard()
    return pd.DataFrame(records, columns=columns), row_no, decoded


def _ids_of(files: list[Path], wanted: set[tuple[int, int]]) -> dict[tuple[int, int], str]:
    """The ids of some (shard, row) positions, reading only the id column of those shards."""
    out: dict[tuple[int, int], str] = {}
    for shard_no in sorted({s for s, _ in wanted}):
        row_no = 0
        for batch in corpus.iter_batches(files[shard_no], ["id"]):
            for value in batch.column(0).to_pylist():
                if (shard_no, row_no) in wanted:
                    out[(shard_no, row_no)] = value
                row_no += 1
    return out


def _reject_total(out: Path, summary: dict[str, Any] | None) -> int:
    if summary and isinstance(summary.get("rejects"), dict) and "total" in summary["rejects"]:
        return int(summary["rejects"]["total"])
    return sum(1 for _ in corpus.iter_rejects(out))


def validate_build(
    out_dir: str | os.PathLike,
    *,
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO,
    decode_sample: int = DEFAULT_DECODE_SAMPLE,
    write: bool = True,
    data_docs: bool = True,
) -> ValidationResult:
    """Validate the build in `out_dir` shard by shard; write OUT/validation/ unless `write` is False.

    Raises corpus.CorpusError when `out_dir` holds no shards.
    """
    import pandas as pd

    started = time.time()
    out = Path(out_dir)
    files = corpus.shard_files(out)
    summary = corpus.read_summary(out)
    gx = _Gx(max_reject_ratio)
    writer = _ResultWriter(out / VALIDATION_DIR, data_docs) if write else None
    failures: list[Failure] = []
    ids, audio_hashes = _Hashes(), _Hashes()
    rows = decoded = evaluated = 0
    per_shard = []

    def run_suite(suite: str, frame, index_columns, where: str) -> list[Failure]:
        nonlocal evaluated
        result = gx.validate(suite, frame, index_columns)
        evaluated += len(result.results)
        if writer:
            writer.add(where, suite, result)  # written now: no shard's full results stay in memory
        return _failures(gx, suite, result, where)

    for shard_no, path in enumerate(files):
        import pyarrow.parquet as pq

        where = corpus.display_path(path, out)
        try:
            arrow_schema = pq.ParquetFile(path).schema_arrow
        except Exception as err:  # pyarrow raises several types for a damaged file
            failures.append(Failure(SCHEMA_SUITE, "readable_parquet", "the shard is a readable parquet file", where, None, [], str(err)))
            continue
        failures += run_suite(SCHEMA_SUITE, schema_frame(arrow_schema), ["column"], where)
        frame, n, d = _shard_frame(path, decode_sample, shard_no, ids, audio_hashes)
        rows += n
        decoded += d
        shard_failures = run_suite(ROW_SUITE, frame, [ROW_INDEX, "id"], where)
        failures += shard_failures
        per_shard.append({"shard": where, "rows": n, "decoded_audio": d, "failed": len(shard_failures)})
        del frame

    dup_ids, dup_audio = ids.duplicates(), audio_hashes.duplicates()
    del ids, audio_hashes
    rejects = _reject_total(out, summary)
    figures = {
        "reject_ratio": rejects / (rows + rejects) if rows + rejects else 0.0,
        "duplicate_ids": sum(len(g) - 1 for g in dup_ids),
        "duplicate_audio": sum(len(g) - 1 for g in dup_audio),
        "rows_in_shards": rows,
        "rows_in_summary": ((summary or {}).get("outputs") or {}).get("rows"),
        "reconciliation_ok": ((summary or {}).get("reconciliation") or {}).get("ok"),
    }
    dataset_failures = run_suite(DATASET_SUITE, pd.DataFrame([figures]), None, "dataset")
    _dataset_examples(dataset_failures, files, out, dup_ids, dup_audio, rejects, rows, max_reject_ratio)
    failures += dataset_failures

    outcome = ValidationResult(
        success=not failures, shards=len(files), rows=rows, expectations=evaluated, failures=failures,
        decoded=decoded, seconds=time.time() - started,
    )
    if writer:
        writer.finish(outcome, {"per_shard": per_shard, "dataset": figures, "max_reject_ratio": max_reject_ratio})
    return outcome


def _dataset_examples(failures: list[Failure], files, out, dup_ids, dup_audio, rejects, rows, bound) -> None:
    """Examples for the corpus-wide failures: which rows share an id or audio, the reject counts."""
    groups = {"duplicate_ids": dup_ids, "duplicate_audio": dup_audio}
    wanted = {pos for g in dup_ids[:EXAMPLES] + dup_audio[:EXAMPLES] for pos in g}
    id_of = _ids_of(files, wanted) if wanted else {}
    for f in failures:
        if f.column in groups:
            f.examples = [{"rows": [f"{corpus.display_path(files[s], out)} row {r} id={id_of.get((s, r))}" for s, r in group]}
                          for group in groups[f.column][:EXAMPLES]]
        elif f.column == "reject_ratio":
            f.examples = [{"rejects": rejects, "rows": rows, "bound": bound}]


class _ResultWriter:
    """OUT/validation/: GX's JSON and Data Docs page per shard and suite as they come, then the
    verdict (results.json) and the Data Docs index."""

    def __init__(self, vdir: Path, data_docs: bool):
        self.vdir, self.data_docs = vdir, data_docs
        (vdir / "gx").mkdir(parents=True, exist_ok=True)
        if data_docs:
            (vdir / "docs").mkdir(parents=True, exist_ok=True)
        self.pages: list[tuple[str, str, bool, str]] = []

    def add(self, where: str, suite: str, result) -> None:
        stem = f"{suite}--{Path(where).stem if where != 'dataset' else 'dataset'}"
        with open(self.vdir / "gx" / f"{stem}.json", "w", encoding="utf-8") as fh:
            json.dump(result.to_json_dict(), fh, indent=1, ensure_ascii=False, default=str)
        if self.data_docs:
            page = self.vdir / "docs" / f"{stem}.html"
            page.write_text(_render_docs(result), encoding="utf-8")
            self.pages.append((where, suite, result.success, page.relative_to(self.vdir).as_posix()))

    def finish(self, outcome: ValidationResult, details: dict[str, Any]) -> None:
        results_path = self.vdir / "results.json"
        results_path.write_text(json.dumps(outcome.to_dict() | details, indent=2, ensure_ascii=False, default=str), encoding="utf-8")
        outcome.results_path = str(results_path)
        if self.data_docs:
            index = self.vdir / "index.html"
            index.write_text(_docs_index(outcome, self.pages), encoding="utf-8")
            outcome.docs_path = str(index)


def _render_docs(result) -> str:
    """GX's Data Docs page for one validation result."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    return DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(result))


def _docs_index(outcome: ValidationResult, pages) -> str:
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(where)}</td><td>{escape(suite)}</td><td class={'ok' if ok else 'bad'}>{'passed' if ok else 'FAILED'}</td>"
        f"<td><a href='{escape(href)}'>Data Docs</a></td></tr>" for where, suite, ok, href in pages
    )
    failed = "".join(f"<li>{escape(f.line())}<ul>{''.join(f'<li>{escape(_example_text(e))}</li>' for e in f.examples)}</ul></li>"
                     for f in outcome.failures)
    verdict = "PASSED" if outcome.success else "FAILED"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>echat validate: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:left}}.ok{{color:#070}}.bad{{color:#b00;font-weight:bold}}</style>
</head><body><h1>Validation: <span class={'ok' if outcome.success else 'bad'}>{verdict}</span></h1>
<p>{outcome.shards} shard(s), {outcome.rows} rows, {outcome.expectations} expectations evaluated, {len(outcome.failures)} failed,
{outcome.decoded} audio files decoded. Suites generated from schemas/record.py and schemas/tasks.py.</p>
{f'<h2>Failed expectations</h2><ul>{failed}</ul>' if failed else ''}
<h2>Results</h2><table><tr><th>where</th><th>suite</th><th>result</th><th></th></tr>{rows}</table></body></html>"""


# ---------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="a build folder (the --output of `echat build`)")
    parser.add_argument("--max-reject-ratio", type=float, default=DEFAULT_MAX_REJECT_RATIO,
                        help=f"the most rejects / (rows + rejects) the corpus may have (default {DEFAULT_MAX_REJECT_RATIO})")
    parser.add_argument("--decode-sample", type=int, default=DEFAULT_DECODE_SAMPLE,
                        help=f"rows per shard whose audio and reply audio are decoded (default {DEFAULT_DECODE_SAMPLE}; 0: none)")
    parser.add_argument("--no-data-docs", action="store_true", help="write results.json and GX's JSON only, no HTML")


def run(args: argparse.Namespace) -> int:
    try:
        result = validate_build(args.out, max_reject_ratio=args.max_reject_ratio, decode_sample=args.decode_sample,
                                data_docs=not args.no_data_docs)
    except corpus.CorpusError as exc:
        print(f"echat validate: {exc}", file=sys.stderr)
        return 2
    print(result.verdict())
    return 0 if result.success else 1

