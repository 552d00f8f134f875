"""`echat eval`: score a predictions file (jsonl) by task.

    echat eval --predictions preds.jsonl [--report report.json]
    echat eval --judge --predictions preds.jsonl --shards BUILD --response-audio WAVS --judge-model NAME

(`--judge`: an LLM judge scores the dialogue replies, EChat-eval style: model/judge.py.)

Each line of the predictions file is one JSON object with `key`, `task`, `prediction` and
`reference` (what `echat infer --shards` writes), and optionally `language` ("en" / "zh").
Rows are grouped by task tag and scored by what the task outputs:

- transcript (every task with `<TRANSCRIBE>`): WER for English (words), CER for Chinese (one token
  per Chinese character; a Latin word inside Chinese text counts as one token). Both sides are
  normalised first: label tags and `<0.3>` timestamps removed, lower case, punctuation other than
  apostrophes turned into spaces (so `stop—it's` stays two words), then apostrophes dropped
  (`it's` -> `its`), spaces collapsed. The language is the row's `language`, else Chinese when the reference holds a
  Chinese character. Rates are corpus-level (total edits / total reference tokens) via `jiwer`.
- labels (`<EMOTION>`, `<GENDER>`, `<AGE>`, `<STYLE>`, also after `<TRANSCRIBE>`): accuracy, per-class
  counts (support, predicted, correct, recall) and a confusion table. A label is the first `<TAG>`
  of the text that belongs to the label's vocabulary (case and `_`/space insensitive); a prediction
  without one counts as wrong, under the predicted class `<none>`.
- events (`<CAPTION>`): the sets of event tags are compared. Reported: micro precision, recall and
  F1 over tags, and exact-match accuracy (the predicted set equals the reference set).
- tag-form reasoning (`<... <THINK>` tasks whose reference has `Emotion: <sad>; ...`): accuracy of
  each labelled field of the reasoning (age, gender, emotion, sound event, reply emotion); the sound
  event field is compared as a set (`<cough><laugh>`, or `<none>` for nothing heard).
- free-form replies and speech tokens (`<S2TCHAT>`, `<TEXT2TEXT>`, `<TEXT2TOKEN>`, `<HISTORY>`)
  have no reference metric here; they are counted as unscored.

Any task that training and inference take is scored: the tags of schemas/vocab.py and every
`[<TRANSCRIBE>] <LABEL> [<LABEL> ...]` combination (`<TRANSCRIBE> <STYLE>`, `<AGE> <GENDER>`), by the
same rule (schemas.tasks.is_known). Any other task is reported under `skipped` with the reason,
never scored by guess. A reference label written as the unknown placeholder `<&&>` (or missing) is not scored, nor
is a row whose `reference` is null (counted as `without_reference`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from echat.model import prompts
from echat.schemas import reasoning, tasks, vocab
from echat.schemas.scoring import (
    NONE_CLASS,
    ErrorRate,
    EventSets,
    LabelAccuracy,
    language_of,
    normalize_transcript,
)

REQUIRED_KEYS = ("key", "task", "prediction", "reference")

EVENTS_FIELD = "events"  # the label field of <CAPTION>: a set of events, scored apart
# Single-label tags -> (record field name, vocabulary), from the tables training uses.
LABEL_VOCABS: dict[str, tuple[str, tuple[str, ...]]] = {
    tag: (field, prompts.LABEL_VOCAB[field]) for tag, field in tasks.LABEL_TAGS.items() if field != EVENTS_FIELD
}

# Fields of the tag-form reasoning that carry a label, by their name in lower case ("sound event"),
# with their vocabularies: schemas/reasoning.py TAG_FIELDS (DESIGN.md: `Age: <adult>; ... Reply emotion:`).
THINK_FIELDS: dict[str, tuple[str, ...]] = {name.lower(): reasoning.FIELD_VOCABS[attr] for name, attr in reasoning.TAG_FIELDS}
_THINK_FIELD_NAME = {attr: name.lower() for name, attr in reasoning.TAG_FIELDS}

_TAG = re.compile(r"<([^<>]*)>")


class PredictionsError(ValueError):
    """The predictions file cannot be read as predictions (the message names the line)."""


# ----------------------------------------------------------------------------- reading


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a predictions jsonl file; raises PredictionsError naming the bad line."""
    path = Path(path)
    if not path.is_file():
        raise PredictionsError(f"{path}: no such file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PredictionsError(f"{path}:{lineno}: not JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise PredictionsError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in REQUIRED_KEYS if k not in row]
            if missing:
                raise PredictionsError(f"{path}:{lineno}: missing key(s) {', '.join(missing)} (need {', '.join(REQUIRED_KEYS)})")
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- text normalisation


def _canonical(label: str) -> str:
    return " ".join(label.strip().lower().replace("_", " ").split())


def tags_in(text: str) -> list[str]:
    """Canonical contents of the `<...>` tags of `text`, in order."""
    return [_canonical(t) for t in _TAG.findall(text or "")]


def find_label(tags: Iterable[str], labels: tuple[str, ...], taken: set[int] | None = None) -> str | None:
    """The first tag that is one of `labels` (returned in the vocabulary's own spelling)."""
    by_canonical = {_canonical(v): v for v in labels}
    for i, tag in enumerate(tags):
        if taken is not None and i in taken:
            continue
        if tag in by_canonical:
            if taken is not None:
                taken.add(i)
            return by_canonical[tag]
    return None


def label_answers(text: str, task_tags: list[str]) -> dict[str, str | None]:
    """Label tag -> the label `text` gives for it, taking tags in order (OSUM writes them so)."""
    tags = tags_in(text)
    taken: set[int] = set()
    return {tag: find_label(tags, LABEL_VOCABS[tag][1], taken) for tag in task_tags if tag in LABEL_VOCABS}


def event_set(text: str) -> set[str]:
    tags = tags_in(text)
    by_canonical = {_canonical(v): v for v in vocab.EVENTS}
    return {by_canonical[t] for t in tags if t in by_canonical}


def think_fields(text: str) -> dict[str, str | None]:
    """Field -> label of the tag-form reasoning (`Emotion: <sad>`); None for `<&&>` or no label."""
    found: dict[str, str | None] = {}
    for attr, labels in reasoning.tag_form_labels(text).items():
        name = _THINK_FIELD_NAME[attr]
        values = [_canonical(v) for v in labels]
        if attr == EVENTS_FIELD:
            # Several events may be heard: the value is the set, written "cough+laugh"; "none" for <none>.
            known = {_canonical(e): e for e in (*vocab.EVENTS, reasoning.NO_EVENT)}
            ok = values and all(v in known for v in values)
            found[name] = "+".join(sorted({known[v] for v in values})) if ok else None
        else:
            found[name] = find_label(values[:1], THINK_FIELDS[name])
    return found


# ----------------------------------------------------------------------------- scorers


# ----------------------------------------------------------------------------- evaluation


def _split_task(task: Any) -> tuple[str | None, str | None]:
    """(normalised task, None) for a task training and inference take, else (None, reason)."""
    if not isinstance(task, str):
        return None, f"task is not a tag string: {task!r}"
    try:
        normalised = tasks.normalize(task)
    except ValueError:
        return None, f"task is not a tag string: {task!r}"
    if not tasks.is_known(normalised):
        return None, (f"unknown task {task!r} (known: {', '.join(vocab.TASK_TAGS)}, or an optional <TRANSCRIBE> "
                      "followed by label tags)")
    return normalised, None


def evaluate(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The report: {"tasks": {task: {...metrics}}, "skipped": {reason: count}, "rows": n}."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    skipped: Counter = Counter()
    n_rows = 0
    for row in rows:
        n_rows += 1
        task, reason = _split_task(row.get("task"))
        if task is None:
            skipped[reason] += 1
            continue
        groups[task].append(row)
    return {
        "rows": n_rows,
        "tasks": {task: _evaluate_task(task, group) for task, group in sorted(groups.items())},
        "skipped": dict(skipped),
    }


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)  # speech tokens etc.: kept, never scored as text


def _evaluate_task(task: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    spec = tasks.task(task)
    tags = list(spec.words)
    result: dict[str, Any] = {"rows": len(rows), "metrics": {}}
    metrics = result["metrics"]
    error_rates: dict[str, _ErrorRate] = {}
    labels = {tag: LabelAccuracy(LABEL_VOCABS[tag][1]) for tag in tags if tag in LABEL_VOCABS}
    events = EventSets() if EVENTS_FIELD in spec.labels else None
    think: dict[str, _Accuracy] = {}
    without_reference = 0
    for row in rows:
        if row.get("reference") is None:
            # e.g. `echat infer --shards` on a record that lacks this task's target: predicted, not scored.
            without_reference += 1
            continue
        prediction, reference = _text(row.get("prediction")), _text(row.get("reference"))
        if spec.transcribes:
            lang = language_of(reference, row.get("language"))
            error_rates.setdefault(lang, ErrorRate(lang)).add(reference, prediction)
        if labels:
            ref_labels = label_answers(reference, tags)
            hyp_labels = label_answers(prediction, tags)
            for tag, scorer in labels.items():
                scorer.add(ref_labels[tag], hyp_labels[tag])
        if events is not None:
            events.add(event_set(reference), event_set(prediction))
        if spec.reasons:
            ref_fields, hyp_fields = think_fields(reference), think_fields(prediction)
            for name, value in ref_fields.items():
                think.setdefault(name, LabelAccuracy(THINK_FIELDS[name])).add(value, hyp_fields.get(name))
    for lang, scorer in sorted(error_rates.items()):
        metrics[f"transcript_{lang}"] = scorer.report()
    for tag, scorer in labels.items():
        metrics[LABEL_VOCABS[tag][0]] = scorer.report()
    if events is not None:
        metrics["events"] = events.report()
    for name, scorer in think.items():
        metrics[f"think_{name.replace(' ', '_')}"] = scorer.report()
    result["without_reference"] = without_reference
    if not metrics:
        result["note"] = "free-form reply or speech tokens: no reference metric (counted, not scored)"
    return result


# ----------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: one line per (task, metric), then confusion tables for labels."""
    lines = [f"{'task':<34} {'metric':<22} {'value':>8} {'n':>6}  detail"]
    lines.append("-" * len(lines[0]) + "-" * 20)
    confusions = []
    for task, result in report["tasks"].items():
        if not result["metrics"]:
            lines.append(f"{task:<34} {'(unscored)':<22} {'-':>8} {result['rows']:>6}  {result.get('note', '')}")
        for name, m in result["metrics"].items():
            kind = m["metric"]
            if kind in ("wer", "cer"):
                detail = f"S={m['substitutions']} D={m['deletions']} I={m['insertions']} ref tokens={m['reference_tokens']}"
                lines.append(f"{task:<34} {name + ' ' + kind.upper():<22} {_fmt(m[kind]):>8} {m['utterances']:>6}  {detail}")
            elif kind == "accuracy":
                detail = f"correct={m['correct']}" + (f" no-reference={m['unscored_no_reference']}" if m["unscored_no_reference"] else "")
                lines.append(f"{task:<34} {name + ' acc':<22} {_fmt(m['accuracy']):>8} {m['scored']:>6}  {detail}")
                if m["confusion"]:
                    confusions.append((task, name, m))
            elif kind == "event_sets":
                detail = f"P={_fmt(m['precision'])} R={_fmt(m['recall'])} F1={_fmt(m['f1'])}"
                lines.append(f"{task:<34} {'events exact-match':<22} {_fmt(m['exact_match']):>8} {m['scored']:>6}  {detail}")
    for task, result in report["tasks"].items():
        if result.get("without_reference"):
            lines.append(f"{task}: {result['without_reference']} row(s) without a reference, not scored")
    for reason, count in report["skipped"].items():
        lines.append(f"skipped {count} row(s): {reason}")
    for task, name, m in confusions:
        lines.append("")
        lines.append(f"confusion {task} {name} (rows: reference, columns: predicted)")
        columns = list(m["per_class"])
        width = max(8, *(len(c) for c in columns)) + 1
        lines.append(" " * width + "".join(f"{c:>{width}}" for c in columns))
        for ref, counts in m["confusion"].items():
            lines.append(f"{ref:<{width}}" + "".join(f"{counts.get(c, 0):>{width}}" for c in columns))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, metavar="FILE.jsonl",
                        help="predictions written by `echat infer` (key, task, prediction, reference[, language])")
    parser.add_argument("--report", metavar="FILE.json",
                        help="write the JSON report here (default: next to the predictions, .eval.json; .judge.json with --judge)")
    from echat.model import judge  # its options only: the judge's own imports wait until it runs

    judge.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from echat.model import judge

    if getattr(args, "judge", False):
        return judge.run(args)
    stray = judge.stray_options(args) if hasattr(args, "judge") else []
    if stray:
        print(f"echat eval: {', '.join(stray)} only mean something with --judge", file=sys.stderr)
        return 2
    try:
        rows = read_predictions(args.predictions)
    except PredictionsError as err:
        print(f"echat eval: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"echat eval: {args.predictions} holds no predictions", file=sys.stderr)
        return 2
    report = evaluate(rows)
    report["predictions"] = str(args.predictions)
    out = Path(args.report) if args.report else Path(args.predictions).with_suffix(".eval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_report(report))
    print(f"\nreport: {out}")
    for reason, count in report["skipped"].items():
        print(f"echat eval: warning: skipped {count} row(s): {reason}", file=sys.stderr)
    return 0
