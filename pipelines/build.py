"""`echat build`: raw audio (a folder or a manifest) -> EChat-style parquet shards.

Output layout under OUT:
  data/train-NNNNN-of-MMMMM.parquet   the records (schemas/record.py), audio as FLAC
  rejects/rejects-SSSSS-of-NNNNN.jsonl every dropped input or segment: source, stage, reason, detail
  summary.json                         counts per stage, audio hours, speed, reconciliation
  reconciliation.jsonl                 the per-source table behind the reconciliation
  _work/                               the run's tallies and shard list, read back for the summary,
                                       and beam.log: Beam's own log lines (on the console with --verbose)
Unrecognised flags are passed to Beam as pipeline options (e.g. --direct_num_workers 2
--direct_running_mode multi_processing, or Dataflow's --project/--region/--temp_location).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any

ACCEPTS_EXTRA_ARGS = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="local", help="profile name from configs/ or a YAML path (default: local)")
    parser.add_argument("--input", required=True, help="a folder (searched recursively) or a manifest (.jsonl/.csv)")
    parser.add_argument("--output", required=True, help="output folder (local path or gs://...)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value, e.g. --set vad.params.threshold=0.4 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards and rejects already in OUTPUT")
    parser.add_argument("--quiet", action="store_true", help="no progress line; warnings only")
    parser.add_argument("--no-validate", action="store_true", help="skip the Great Expectations validation at the end")
    parser.add_argument("--verbose", action="store_true", help="Beam's own log lines on the console instead of OUT/_work/beam.log")
    parser.epilog = "Other --flags are passed to Beam as pipeline options."


def run(args: argparse.Namespace) -> int:
    from .profile import ProfileError, load_profile

    try:
        profile = load_profile(args.profile, args.overrides)
    except ProfileError as exc:
        print(f"echat build: {exc}", file=sys.stderr)
        return 2
    try:
        summary = build(profile, args.input, args.output, beam_args=getattr(args, "extra_args", []), overwrite=args.overwrite,
                        verbose=args.verbose, show_progress=not args.quiet)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"echat build: {exc}", file=sys.stderr)
        return 2
    if summary.get("dry_run"):
        print(summary["message"])
        return 0
    if summary.get("already_complete"):
        print(f"{args.output} already holds a finished build of this profile and input (pass --overwrite to build it again)")
    print_report(summary, args.output)
    validated = True if args.no_validate else validate_output(args.output)
    return 0 if summary["reconciliation"]["ok"] and validated else 1


def validate_output(output: str) -> bool:
    """Run the Great Expectations suites over a finished build and print the verdict.

    A build in a bucket is validated with `echat validate` on a local copy (the suites read local
    shards), so this says so and passes.
    """
    if "://" in output:
        print(f"  validation: skipped for {output} (copy the build down and run `echat validate`)")
        return True
    import logging

    from echat.validation import validate_build

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are about temp folders
    result = validate_build(output)
    print(result.verdict())
    return result.success


def pipeline_options(profile, beam_args: list[str], *, verbose: bool = True):
    """Beam options from the profile's `beam:` section, then the command line's extra flags.

    Unless `verbose`, worker processes log warnings only (their INFO lines would reach the console,
    which they share, not our log file).

    Raises ValueError naming any flag that is neither ours nor a Beam pipeline option, so a
    mistyped `--overwite` stops the build instead of being dropped with a log line.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    b = profile.beam
    flags = [f"--runner={b.runner}", f"--direct_num_workers={b.direct_num_workers}", f"--direct_running_mode={b.direct_running_mode}"]
    flags += [f"--{k}={v}" for k, v in b.extra.items()]
    if not verbose:
        flags.append("--default_sdk_harness_log_level=WARNING")
    options = PipelineOptions(flags + list(beam_args))  # later flags win: the command line overrides the profile
    every = options.get_all_options(retain_unknown_options=True, display_warnings=False)
    known = options.get_all_options(display_warnings=False)
    unknown = sorted(set(every) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s): {', '.join('--' + name for name in unknown)} "
                         "(neither an `echat build` option nor a Beam pipeline option)")
    return options


_SECRET_WORDS = ("token", "secret", "password", "key", "credential")


def redact_flags(flags: list[str]) -> list[str]:
    """Command-line flags for the report, with the values of secret-looking options hidden."""
    redacted, hide_next = [], False
    for flag in flags:
        if hide_next:
            redacted.append("***")
            hide_next = False
            continue
        name, eq, _ = flag.partition("=")
        secret = flag.startswith("--") and any(word in name.lower() for word in _SECRET_WORDS)
        if secret and eq:
            redacted.append(f"{name}=***")
        else:
            redacted.append(flag)
            hide_next = secret
    return redacted


def _runner(options):
    """The runner named by the options; the Python direct runner for "DirectRunner".

    Beam 2.77's DirectRunner first tries the Prism runner, which downloads a binary from GitHub
    at run time (impossible offline, and it ignores direct_running_mode). The FnApiRunner is the
    Python direct runner behind it, which honours direct_num_workers and multi_processing mode.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    name = options.view_as(StandardOptions).runner or "DirectRunner"
    if name in ("DirectRunner", "direct"):
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner

        return FnApiRunner()
    return name


def build(profile, input_path: str, output: str, *, beam_args: list[str] = (), overwrite: bool = False,
          verbose: bool = False, show_progress: bool = False) -> dict[str, Any]:
    """Run the build and write OUT/summary.json; returns the summary.

    Beam's log lines go to OUT/_work/beam.log (a local temp file for a remote OUT) unless
    `verbose`; with `show_progress` a live line on stderr tells files, segments, audio and speed.
    """
    import apache_beam as beam
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import StandardOptions, TestOptions

    from .graph import build_graph, stage_specs, write_list
    from .graph import stage_order as graph_stage_order
    from .preflight import check_runnable
    from .parts import PARTS_DIR
    from .progress import ProgressLine
    from .accuracy import merged_report
    from .passes import PassPaths, run_pass
    from .resume import InputSelection, Resume, read_resume, run_description
    from .read_sources import ReadSources, skipped_counts
    from .source_rows import SourceContext
    from .sources import probe_input
    from .summary import make_summary, read_counters

    started = time.time()
    out = output.rstrip("/")
    # The input is checked before the output is touched, so a mistyped input leaves nothing behind.
    options = pipeline_options(profile, beam_args, verbose=verbose)
    FileSystems.set_options(options)  # s3:// needs its endpoint and keys before the driver lists or writes
    check_runnable(profile, options, input_path, out)  # a run that cannot start says so before any work
    data_dir, rejects_dir, work_dir = (FileSystems.join(out, d) for d in ("data", "rejects", "_work"))
    dry_run = bool(options.view_as(TestOptions).dry_run)  # build (and for Dataflow, validate) the job; run nothing
    # Cheap and bounded: the input exists, holds audio, and a manifest decodes. The listing itself
    # runs in the pipeline (pipelines/read_sources.py), never whole in this process.
    probe = probe_input(input_path, manifest_encoding=profile.manifest_encoding)
    parts_dir = FileSystems.join(work_dir, PARTS_DIR)
    resume = Resume(parts_dir) if dry_run else _prepare_output(
        out, [data_dir, rejects_dir, work_dir], overwrite, run_description(profile, input_path))
    if resume == "complete":  # the command line says so; a caller reads `already_complete`
        return {**_read_json(FileSystems.join(out, "summary.json")), "already_complete": True}
    # Where each source was read from (the one place its full path is kept: shards carry it
    # relative) is written by the pipeline, as it lists.
    sources = ReadSources(input_path, SourceContext.from_profile(profile, probe.root), probe=probe,
                          manifest_encoding=profile.manifest_encoding, columns=profile.columns,
                          sources_path=FileSystems.join(work_dir, "sources.jsonl"))
    shards_path = FileSystems.join(work_dir, "shards.json")
    shares_path = FileSystems.join(work_dir, "shares.json")
    specs = stage_specs(profile)
    local_workers = _runs_here(options)
    chunks = 1 if dry_run else profile.output.chunks
    log_path = os.path.join(tempfile.mkdtemp(prefix="echat-build-"), "beam.log") if dry_run else _log_path(out, work_dir)
    tallies: dict[str, Any] = {}
    counters: Counter = Counter()
    accuracies = []
    with tempfile.TemporaryDirectory(prefix="echat-progress-") as progress_dir, \
            console_logging(log_path, verbose=verbose) as console:
        logging.getLogger("echat.build").info("input %s: %s (root %s); listed in the pipeline", input_path, probe.kind, probe.root)
        split = next((s.slot for s in specs if s.splits), None)
        line = ProgressLine(progress_dir, total_files=None, first_slot=specs[0].slot, split_slot=split,
                            last_slot=specs[-1].slot, stream=console) \
            if show_progress and local_workers and not dry_run else contextlib.nullcontext()
        with line:
            for chunk in range(chunks):
                final = chunk == chunks - 1
                suffix = f"-{chunk:04d}" if chunks > 1 else ""
                tallies_path = FileSystems.join(work_dir, f"tallies{suffix}.json")
                accuracy_path = FileSystems.join(work_dir, f"label_accuracy{suffix}.pkl")
                if not final and local_workers:  # in a process of its own, which takes its memory with it
                    paths = PassPaths(data_dir=data_dir, rejects_prefix=FileSystems.join(rejects_dir, "rejects"),
                                      tallies=tallies_path, accuracy=accuracy_path, shares=shares_path, parts_dir=parts_dir,
                                      counters=FileSystems.join(work_dir, f"counters{suffix}.json"))
                    counters.update(run_pass(profile, sources, list(beam_args), verbose=verbose, chunk=chunk, chunks=chunks,
                                             paths=paths, progress_dir=progress_dir))
                    tallies.update(_read_json(tallies_path))
                    accuracies.append(_read_pickle(accuracy_path))
                    continue
                # each chunk sees the parts of the chunks before it: their inputs are done
                state = resume if chunk == 0 else read_resume(parts_dir)
                pipeline = beam.Pipeline(runner=_runner(options), options=options)
                shards = build_graph(
                    pipeline, sources, [], profile,
                    data_dir=data_dir, rejects_prefix=FileSystems.join(rejects_dir, "rejects"), tallies_path=tallies_path,
                    accuracy_path=accuracy_path, progress_dir=progress_dir if local_workers else None,
                    done_inputs=InputSelection(state.done_inputs, chunk, chunks), resume=state,
                    shares_path=shares_path, final=final,
                )
                if final:
                    write_list(shards, shards_path, "Shards")
                if dry_run and local_workers:  # the direct runner has no dry run of its own: the graph is built, not run
                    result = None
                    continue
                result = pipeline.run()
                if not local_workers:
                    _say_job(result, console)
                result.wait_until_finish()
                if not dry_run:
                    tallies.update(_read_json(tallies_path))  # the source's rejects are tallied in the pipeline too
                    counters.update(read_counters(result))
                    accuracies.append(_read_pickle(accuracy_path))
    wall = time.time() - started
    if dry_run:
        return _dry_run_summary(options, result, probe, specs, out)

    skipped = skipped_counts(counters)
    shard_list = _read_json(shards_path)
    label_accuracy = merged_report(accuracies)
    stage_order = graph_stage_order(profile)
    context = {
        "profile": profile.name,
        "input": input_path,
        "output": out,
        "runner": options.view_as(StandardOptions).runner or profile.beam.runner,  # --runner may override the profile
        "beam_args": redact_flags(beam_args),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "non_audio_files_skipped": skipped.get("non-audio files", 0),
        "skipped_in_input": skipped,
        "paths": {"data": data_dir, "rejects": rejects_dir, "summary": FileSystems.join(out, "summary.json"), "log": log_path},
    }
    summary, per_source = make_summary(
        tallies=tallies, shards=shard_list, counters=dict(counters), stage_order=stage_order,
        wall_seconds=wall, context=context, shares=_read_json(shares_path), earlier=resume.earlier(),
    )
    if label_accuracy.get("rows_with_reference"):
        summary["label_accuracy"] = label_accuracy
    _write_text(FileSystems.join(out, "summary.json"), json.dumps(summary, indent=2, ensure_ascii=False))
    _write_text(FileSystems.join(out, "reconciliation.jsonl"), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in per_source))
    _finish_output(resume)
    return summary


def _runs_here(options) -> bool:
    """Whether the workers run on this machine (the direct runner), so they can report progress."""
    from apache_beam.options.pipeline_options import StandardOptions

    return (options.view_as(StandardOptions).runner or "DirectRunner") in ("DirectRunner", "direct")


def _say_job(result, console) -> None:
    """A remote runner's job id on the console (its INFO lines go to the log)."""
    job_id = getattr(result, "job_id", None)
    if callable(job_id):
        with contextlib.suppress(Exception):
            print(f"echat build: submitted job {job_id()}; waiting for it to finish", file=console)


def _dry_run_summary(options, result, probe, specs, out: str) -> dict[str, Any]:
    """What a dry run did: the job graph was built (and, on Dataflow, translated and its options
    checked by Beam), and nothing ran or was written. The sources are counted only where the
    driver's probe counted them (a manifest's rows): a folder is listed when the job runs."""
    from apache_beam.options.pipeline_options import StandardOptions

    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    job = getattr(result, "job", None)
    job_name = getattr(getattr(job, "proto", None), "name", None)
    slots = [s.slot for s in specs]
    checked = f"translated for {runner} and its options checked (job {job_name})" if job_name else "built"
    what = f"{probe.rows} sources ({probe.kind} rows)" if probe.rows is not None else \
        f"the sources of {probe.input_path} ({probe.kind}, listed when the job runs)"
    message = (f"echat build: dry run: the job graph for {what} "
               f"through {', '.join(slots)} was {checked}; nothing ran and nothing was written to {out}")
    return {"dry_run": True, "runner": runner, "job_name": job_name, "sources": probe.rows, "input_kind": probe.kind,
            "stages": slots, "output": out, "message": message}


def _log_path(out: str, work_dir: str) -> str:
    if "://" in out:  # a bucket: the log stays on this machine
        return os.path.join(tempfile.mkdtemp(prefix="echat-build-"), "beam.log")
    return os.path.join(work_dir, "beam.log")


@contextlib.contextmanager
def console_logging(log_path: str, *, verbose: bool):
    """Beam's and our INFO lines go to `log_path`; the console keeps warnings (or all, `verbose`).

    Yields the stream the console should use. Unless `verbose`, the process's standard error (file
    descriptor 2) also points at the log while the pipeline runs: local worker processes inherit
    it, and their harness logs at INFO whatever the pipeline options say.
    """
    root = logging.getLogger()
    log_file = open(log_path, "a", encoding="utf-8")
    console = sys.stderr
    saved_fd = None
    if not verbose:
        sys.stderr.flush()
        saved_fd = os.dup(2)
        console = os.fdopen(os.dup(saved_fd), "w", buffering=1, encoding="utf-8", errors="replace")
        os.dup2(log_file.fileno(), 2)
    handlers = [logging.StreamHandler(log_file), logging.StreamHandler(console)]
    handlers[0].setLevel(logging.INFO)
    handlers[1].setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:  # Beam warns about its own set-up (forwarded worker lines): those stay in the log
        handlers[1].addFilter(lambda r: not r.name.startswith("apache_beam") or r.levelno >= logging.ERROR)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield console
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        if saved_fd is not None:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            os.close(saved_fd)
            console.close()
        log_file.close()


def source_reject_tallies(source_rejects: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """One tally per source reject in hand, keyed apart from the file's own tally. The build
    tallies its source's rejects in the pipeline by the same rule (read_sources.source_reject_tally)."""
    from .read_sources import source_reject_tally

    return dict(source_reject_tally(f"#{i}", reject) for i, reject in enumerate(source_rejects))


def _dedupe(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Records in hand, each source_uri once (the first kept), and the duplicates' rejects: the rule
    the build applies in the pipeline (read_sources.keep_first)."""
    from .read_sources import keep_first

    groups: dict[str, list] = {}
    for i, record in enumerate(records):
        groups.setdefault(record["source_uri"], []).append(((i,), f"record #{i}", record))
    kept, rejects = [], []
    for uri, entries in groups.items():
        first, duplicates = keep_first(uri, entries)
        kept.append(first)
        rejects += [reject for _, reject in duplicates]
    return kept, rejects


def _prepare_output(out: str, dirs: list[str], overwrite: bool, described: dict[str, Any]):
    """Make the output ready and say what it already holds: a fresh start, the Resume of an
    unfinished run of this profile and input (pipelines/resume.py), or "complete" for a finished one."""
    from apache_beam.io.filesystems import FileSystems

    from .parts import PARTS_DIR
    from .resume import RUN_FILE, check_compatible, read_resume

    data_dir, rejects_dir, work_dir = dirs
    run_file = FileSystems.join(work_dir, RUN_FILE)
    existing = [d for d in dirs if _folder_exists(d)]
    summary_file = FileSystems.join(out, "summary.json")
    if existing and not overwrite:
        if not FileSystems.exists(run_file):
            raise FileExistsError(f"{out} already holds a build ({', '.join(existing)}); pass --overwrite to replace it")
        finished = FileSystems.exists(summary_file)
        check_compatible(_read_json(run_file), described, out, finished=finished)
        if finished:
            return "complete"
        # Resume: the parts stay; shards, rejects and the run's other work files are made again.
        for path in (data_dir, rejects_dir):
            if _folder_exists(path):
                _delete_folder(path)
        for d in (data_dir, rejects_dir):
            FileSystems.mkdirs(d)
        return read_resume(FileSystems.join(work_dir, PARTS_DIR))
    # the old summary goes too: were this run to fail, it must not stand beside the new data
    stale = [FileSystems.join(out, name) for name in ("summary.json", "reconciliation.jsonl")]
    for path in existing:
        _delete_folder(path)
    for path in stale:
        if FileSystems.exists(path):
            FileSystems.delete([path])
    for d in dirs:
        FileSystems.mkdirs(d)
    _write_text(run_file, json.dumps(described, indent=2, ensure_ascii=False, sort_keys=True))
    return read_resume(FileSystems.join(work_dir, PARTS_DIR))


def _finish_output(resume) -> None:
    """After a whole run the shards hold every row: the parts go (they would double the output)."""
    for folder in (resume.parts_dir, resume.spill_dir):
        if _folder_exists(folder):
            _delete_folder(folder)


def _folder_exists(path: str) -> bool:
    """A local folder, or on an object store (no folders there) a prefix with anything below it."""
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.exists(path) or ("://" in path and bool(_files_below(path, limit=1)))


def _files_below(path: str, limit: int | None = None) -> list[str]:
    from apache_beam.io.filesystems import FileSystems

    pattern = FileSystems.join(path.rstrip("/"), "**")
    return [m.path for r in FileSystems.match([pattern], limits=None if limit is None else [limit]) for m in r.metadata_list]


def _delete_folder(path: str) -> None:
    """Delete a folder and everything in it: on an object store, every object under the prefix."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path:
        FileSystems.delete([path])
        return
    below = _files_below(path)
    if below:
        FileSystems.delete(below)
    if FileSystems.exists(path):  # a placeholder object named like the folder
        FileSystems.delete([path])


def _read_json(path: str):
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return json.loads(handle.read().decode("utf-8"))


def _read_pickle(path: str):
    import pickle

    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return pickle.loads(handle.read())


def _write_text(path: str, text: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as handle:
        handle.write(text.encode("utf-8"))


def print_report(summary: dict[str, Any], output: str) -> None:
    inputs, outputs, rejects = summary["inputs"], summary["outputs"], summary["rejects"]
    print()
    print(f"echat build: {inputs['sources']} sources ({inputs['audio_hours'] * 3600:.1f} s of audio) "
          f"-> {outputs['rows']} rows in {outputs['shards']} shard(s), {rejects['total']} rejects, "
          f"{summary['wall_seconds']:.1f} s wall ({summary['x_real_time']}x real time)")
    print(f"  {'stage':<14}{'in':>7}{'out':>7}{'rejected':>10}{'skipped':>9}{'busy s':>9}{'x real time':>13}")
    for slot, st in summary["stages"].items():
        xrt = "" if st["x_real_time"] is None else f"{st['x_real_time']:.0f}"
        print(f"  {slot:<14}{st['in']:>7}{st['out']:>7}{st['rejected']:>10}{st.get('skipped', 0):>9}"
              f"{st['busy_seconds']:>9.2f}{xrt:>13}")
    for reason, n in rejects["by_stage_reason"].items():
        print(f"  rejected {n:>4}  {reason}")
    if summary.get("label_accuracy"):
        print_label_accuracy(summary["label_accuracy"])
    ok = summary["reconciliation"]["ok"]
    print(f"  reconciliation: {'ok' if ok else 'MISMATCH'} (inputs = outputs + rejects for {summary['reconciliation']['sources_checked']} sources)")
    paths = summary["paths"]
    print(f"  shards:  {paths['data']}/")
    print(f"  rejects: {paths['rejects']}/")
    print(f"  summary: {paths['summary']}")
    if paths.get("log"):
        print(f"  log:     {paths['log']}")


def print_label_accuracy(table: dict[str, Any]) -> None:
    """The labelers against the manifest's reference: one line per field."""
    print(f"  label accuracy against the manifest ({table['rows_with_reference']} rows with a reference):")
    for field, report in table.items():
        if not isinstance(report, dict):
            continue
        if report["metric"] == "accuracy":
            acc, labelled = report["accuracy_of_labelled"], report["labelled"]
            print(f"    {field:<14} {_pct(acc)} of {labelled} labelled, {report['scored'] - labelled} left unknown "
                  f"({_pct(report['accuracy'])} of all {report['scored']})")
        elif report["metric"] == "event_sets":
            print(f"    {field:<14} precision {_pct(report['precision'])}, recall {_pct(report['recall'])}, "
                  f"exact sets {_pct(report['exact_match'])} of {report['scored']} labelled, {report['unlabelled']} not labelled")
        else:
            name = report["metric"]
            print(f"    {field:<14} {name.upper()} {_pct(report[name])} over {report['reference_tokens']} reference tokens")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
