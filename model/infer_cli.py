"""`echat infer`: run a trained checkpoint on audio files, texts or a shard folder, for any task tag.

    echat infer --checkpoint runs/tiny --task "<TRANSCRIBE> <EMOTION>" a.wav b.wav
    echat infer --checkpoint runs/tiny --task "<TEXT2TOKEN>" --text "Hello there."
    echat infer --checkpoint runs/tiny --task all --shards out/demo-build --output preds.jsonl
    echat eval --predictions preds.jsonl

With `--shards` (a build output folder with data/*.parquet, a parquet file or glob, or an OSUM raw
list) the inputs come from the records: the user's audio, the reply text for <TEXT2TOKEN>, the
transcript for <TEXT2TEXT>, the earlier turns for <HISTORY>. Each prediction is written next to
its reference, which is the training target the record gives for that task (built by the same
sample builder as training); a record that lacks the target is still predicted, with reference
null, and a record that lacks the task's input is skipped and counted (so is, for the speech-input
tasks, a record whose audio is longer than the model's speech encoder takes: 30 s for Whisper).

Output: one JSON object per line and task: key, task, prediction (the text; for speech tasks
speech_tokens too), reference (and reference_speech_tokens), language, finished.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

from echat.schemas import tasks as task_table
from echat.schemas import vocab

ALL = "all"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="a checkpoint step folder, a run's checkpoints folder, or a run's output folder (newest checkpoint)")
    parser.add_argument("--task", action="append", required=True, metavar="TAGS",
                        help=f'task tag(s), e.g. "<TRANSCRIBE> <EMOTION>"; repeat for several, or "{ALL}" for every one of schemas/vocab.py')
    parser.add_argument("inputs", nargs="*", metavar="AUDIO", help="audio files (for the speech-input tasks)")
    parser.add_argument("--text", action="append", default=[], metavar="TEXT", help="text input for <TEXT2TEXT> / <TEXT2TOKEN> (repeatable)")
    parser.add_argument("--shards", metavar="DIR", help="read inputs and references from shards (build folder, parquet files or glob, OSUM raw list)")
    parser.add_argument("--output", metavar="FILE.jsonl", help="write predictions here (required with --shards; else also printed)")
    parser.add_argument("--history", metavar="FILE.json", help='earlier turns for <HISTORY> with audio files: [{"role": "user", "text": ...}, ...]')
    parser.add_argument("--instruction", help="use this instruction instead of the task's default paraphrase")
    parser.add_argument("--limit", type=int, metavar="N", help="with --shards: only the first N records")
    parser.add_argument("--speech", action="store_true", help="<HISTORY>: also generate the reply's speech tokens")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-text-tokens", type=int, default=256)
    parser.add_argument("--max-speech-tokens", type=int, default=1500)
    add_sampling_arguments(parser)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def parse_tasks(values: list[str]) -> list[str]:
    """The task strings asked for, `all` expanded, each checked; duplicates dropped."""
    from echat.model.inference import check_task

    tasks: list[str] = []
    for value in values:
        for task in (vocab.TASK_TAGS if value.strip().lower() == ALL else (value,)):
            task = check_task(task)
            if task not in tasks:
                tasks.append(task)
    return tasks


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags `echat infer` and `echat chat` share; `sampling_from` reads them."""
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")


def sampling_from(args: argparse.Namespace):
    from echat.model.generate import Sampling

    if not args.sample:
        return None
    return Sampling(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


# ----------------------------------------------------------------------------- shard records


class RecordTasks:
    """What a record gives each task: the input, and the reference built as the training target."""

    def __init__(self, tokenizer: Any, tasks: list[str]):
        from echat.model.samples import SampleBuilder

        self.tokenizer = tokenizer
        # One builder per task, as `SampleBuilder` checks its task list (and instructions) up front.
        # think_text_ratio 0: the tag-form reasoning is the reference when a record has it (its labels can be scored).
        self.builders = {task: SampleBuilder(tokenizer, {task: 1.0}, think_text_ratio=0.0) for task in tasks}
        from echat.model import prompts

        self._header = self.builders[tasks[0]].encoder.ids(f"{prompts.IM_END}\n{prompts.IM_START}assistant\n", cache=True)
        self._im_end = self.builders[tasks[0]].encoder.im_end_id

    @staticmethod
    def input_of(record: dict[str, Any], task: str) -> tuple[Any, str | None]:
        """(the input for `task`, None) or (None, why the record cannot be run)."""
        spec = task_table.task(task)
        if spec.user_text:  # a text-input task: the record field its user turn carries
            text = (record.get(spec.user_text) or "").strip()
            return (text, None) if text else (None, f"no {spec.user_text}")
        audio = record.get("_audio")
        if audio is None:
            # Set aside when read (unreadable, too short, longer than the encoder takes), or none at all.
            return None, record.get("_audio_issue") or "no audio"
        return audio, None

    def reference_of(self, record: dict[str, Any], task: str) -> tuple[str | None, list[int] | None]:
        """(reference text, reference speech tokens): the target a training sample of this record
        would have, or (None, None) when the record does not support the task."""
        builder = self.builders[task]
        if not builder.supports(record, task):
            return None, None
        # The rng only picks the instruction and the reasoning form; the reference is the target.
        sample = builder.build_task(record, task, random.Random(0))
        ids = sample.input_ids
        start = _last_index_of(ids, self._header)
        target = ids[start + len(self._header):] if start is not None else []
        if target and target[-1] == self._im_end:
            target = target[:-1]
        text = self.tokenizer.decode(target, skip_special_tokens=False) if target else ""
        if task_table.task(task).output == task_table.SPEECH:
            text = None  # the target is speech alone
        return text, (list(sample.speech_tokens) or None)


def _last_index_of(seq: list[int], sub: list[int]) -> int | None:
    n = len(sub)
    for i in range(len(seq) - n, -1, -1):
        if seq[i : i + n] == sub:
            return i
    return None


def read_records(source: str, limit: int | None, max_frames: int | None = None) -> Iterator[dict[str, Any]]:
    """The records of `source` (the first `limit`); audio over `max_frames` mel frames is set aside
    (`_audio` None, `_audio_issue` says why), as for training."""
    from echat.model.data_sources import plan_units, read_unit, resolve_files

    files = resolve_files([source])
    n = 0
    for unit in plan_units(files):
        for record in read_unit(unit, max_frames):
            if limit is not None and n >= limit:
                return
            n += 1
            yield record


# ----------------------------------------------------------------------------- running


def _rows_for(predictions, task, refs, languages) -> Iterator[dict[str, Any]]:
    for pred, (ref_text, ref_tokens), language in zip(predictions, refs, languages):
        row: dict[str, Any] = {"key": pred.key, "task": task, "prediction": pred.text, "reference": ref_text}
        if pred.speech_tokens or ref_tokens:
            row["speech_tokens"] = pred.speech_tokens
        if ref_tokens:
            row["reference_speech_tokens"] = ref_tokens
        if language:
            row["language"] = language
        row["finished"] = pred.finished
        yield row


RECORDS_PER_CHUNK = 256  # records held at once (with their audio bytes) while every task runs on them


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def run_shards(predictor, tasks: list[str], args: argparse.Namespace, sink) -> dict[str, Any]:
    helper = RecordTasks(predictor.tokenizer, tasks)
    counts: Counter = Counter()
    with_reference: Counter = Counter()
    skipped: Counter = Counter()
    n_records = 0
    started = time.perf_counter()
    # Records stream in chunks, so a large shard folder never sits in memory as a whole.
    records_in = read_records(args.shards, args.limit, max_frames=predictor.max_frames)
    for records in _chunks(records_in, RECORDS_PER_CHUNK):
        n_records += len(records)
        for task in tasks:
            inputs, keys, refs, languages, histories = [], [], [], [], []
            for record in records:
                item, why = helper.input_of(record, task)
                if item is None:
                    skipped[f"{task}: {why}"] += 1
                    continue
                inputs.append(item)
                keys.append(str(record.get("id")))
                refs.append(helper.reference_of(record, task))
                languages.append(record.get("language"))
                histories.append([{"role": t["role"], "text": t["text"]} for t in (record.get("history") or [])
                                  if t.get("role") in ("user", "assistant") and t.get("text")] or None)
            if not inputs:
                continue
            preds = predictor.predict(
                inputs, task, keys=keys, instruction=args.instruction,
                history=histories if task_table.task(task).history else None, speech=args.speech or None,
                batch_size=args.batch_size, max_text_tokens=args.max_text_tokens, max_speech_tokens=args.max_speech_tokens,
                sampling=sampling_from(args), seed=args.seed,
            )
            for row in _rows_for(preds, task, refs, languages):
                sink(row)
            counts[task] += len(preds)
            with_reference[task] += sum(r[0] is not None or r[1] is not None for r in refs)
        print(f"echat infer: {n_records} record(s), {sum(counts.values())} prediction(s) "
              f"({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    if n_records == 0:
        raise ValueError(f"{args.shards}: no records")
    for task in tasks:
        print(f"echat infer: {task}: {counts[task]} prediction(s), {with_reference[task]} with a reference", file=sys.stderr)
    return {"records": n_records, "predictions": dict(counts), "skipped": dict(skipped)}


def run_inputs(predictor, tasks: list[str], args: argparse.Namespace, sink) -> dict[str, Any]:
    from echat.model.inference import takes_text

    history = None
    if args.history:
        history = json.loads(Path(args.history).read_text(encoding="utf-8"))
        if not isinstance(history, list) or not all(isinstance(t, dict) for t in history):
            raise ValueError(f"{args.history}: expected a JSON list of {{role, text}} turns")
    counts: Counter = Counter()
    for task in tasks:
        inputs = args.text if takes_text(task) else args.inputs
        if not inputs:
            raise ValueError(f"task {task} needs {'--text TEXT' if takes_text(task) else 'audio files'} as input")
        preds = predictor.predict(
            inputs, task, instruction=args.instruction, history=history if task_table.task(task).history else None,
            speech=args.speech or None, batch_size=args.batch_size, max_text_tokens=args.max_text_tokens,
            max_speech_tokens=args.max_speech_tokens, sampling=sampling_from(args), seed=args.seed,
        )
        for pred in preds:
            sink({"key": pred.key, "task": task, "prediction": pred.text, "reference": None,
                  **({"speech_tokens": pred.speech_tokens} if pred.speech_tokens else {}), "finished": pred.finished})
        counts[task] = len(preds)
    return {"predictions": dict(counts)}


def run(args: argparse.Namespace) -> int:
    from echat.model.checkpoint import CheckpointError
    from echat.model.inference import InferenceError, Predictor, takes_text

    try:
        tasks = parse_tasks(args.task)
    except InferenceError as err:
        print(f"echat infer: {err}", file=sys.stderr)
        return 2
    if args.shards and (args.inputs or args.text):
        print("echat infer: give either --shards or audio files / --text, not both", file=sys.stderr)
        return 2
    if args.shards and not args.output:
        print("echat infer: --shards needs --output FILE.jsonl", file=sys.stderr)
        return 2
    if not args.shards:
        missing = [t for t in tasks if not (args.text if takes_text(t) else args.inputs)]
        if missing:
            need = "; ".join(f"{t} needs {'--text TEXT' if takes_text(t) else 'audio files'}" for t in missing)
            print(f"echat infer: no input: {need}", file=sys.stderr)
            return 2
        absent = [p for p in args.inputs if not Path(p).is_file()]
        if absent:
            print(f"echat infer: audio file(s) not found: {', '.join(absent)}", file=sys.stderr)
            return 2
    if args.shards:
        from echat.model.data_sources import DataSourceError, resolve_files

        try:
            resolve_files([args.shards])  # before the model loads: a wrong path fails at once
        except DataSourceError as err:
            print(f"echat infer: --shards: {err}", file=sys.stderr)
            return 2
    if args.output and Path(args.output).suffix != ".jsonl":
        print(f"echat infer: --output must be a .jsonl file, not {args.output}", file=sys.stderr)
        return 2

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=resolve_device(args.device))
    except (CheckpointError, FileNotFoundError) as err:
        print(f"echat infer: cannot load checkpoint {args.checkpoint}: {err}", file=sys.stderr)
        return 2

    out_fh = None
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        # Written to a temporary name and renamed at the end: a failed run leaves no half file that
        # `echat eval` would score as if it were complete.
        tmp = Path(args.output).with_suffix(".jsonl.partial")
        out_fh = tmp.open("w", encoding="utf-8")

    written = 0

    def sink(row: dict[str, Any]) -> None:
        nonlocal written
        written += 1
        if out_fh is not None:
            out_fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not args.shards:
            tokens = f"  [{len(row['speech_tokens'])} speech tokens]" if row.get("speech_tokens") else ""
            # JSON-quoted: one line per prediction even when the model writes newlines.
            print(f"{row['key']}\t{row['task']}\t{json.dumps(row['prediction'], ensure_ascii=False)}{tokens}")

    try:
        summary = run_shards(predictor, tasks, args, sink) if args.shards else run_inputs(predictor, tasks, args, sink)
    except (InferenceError, ValueError) as err:
        print(f"echat infer: {err}", file=sys.stderr)
        if out_fh is not None:
            out_fh.close()
            if written:
                print(f"echat infer: the {written} prediction(s) made before the error are in {tmp}", file=sys.stderr)
            else:
                tmp.unlink()
        return 2
    if out_fh is not None:
        out_fh.close()
        tmp.replace(args.output)
    for reason, count in summary.get("skipped", {}).items():
        print(f"echat infer: skipped {count} record(s): {reason}", file=sys.stderr)
    total = sum(summary["predictions"].values())
    where = f" -> {args.output}" if args.output else ""
    print(f"echat infer: {total} prediction(s) for {len(summary['predictions'])} task(s){where}", file=sys.stderr)
    return 0
