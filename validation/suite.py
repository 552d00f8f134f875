"""The Great Expectations suites of a corpus, generated from the one schema (schemas/record.py).

Three suites, each a plain list of GX expectations built from `FIELDS` and the task table:

- the *schema* suite, over a frame of one row per column of a shard: every column of the schema
  is there, nothing else is, and each has the arrow type `record.arrow_schema()` gives it;
- the *record* suite, over a frame of one row per record (one shard at a time): required fields
  not null, every closed vocabulary (`Field.allowed`, list items included), every declared range
  (`Field.min`/`max`: durations, sampling rate, scores, acoustic metrics), unique ids, segment
  bounds in order, the audio present and, for a sample of rows, decodable at the declared rate
  and duration, what each row's task needs (schemas/tasks.py; a task that reasons needs both
  reasoning forms, since a dual-thinking corpus trains both) and both reasoning forms well formed;
- the *dataset* suite, over one row of corpus-wide figures: the reject ratio under its bound, no
  id and no audio twice across shards, the shard rows matching the build summary.

Columns the record suite reads but a shard does not hold as a flat value are derived first
(`derived_columns`): `audio__bytes` (length of the FLAC bytes), `audio__decode` (None, or what was
wrong when the row's audio was decoded), `events__outside_vocabulary`, `task__unmet_needs`,
`think_tags__problem`... Each derived problem column holds None for a good row and the problem, in
words, for a bad one, so a failed expectation's examples say what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from echat.schemas import record as rec
from echat.schemas import tasks as task_table
from echat.schemas.reasoning import THINK_END, THINK_START, ThinkParseError, parse_tag_form, split_think

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # no usage statistics leave the machine

ROW_SUITE = "echat-record"
SCHEMA_SUITE = "echat-schema"
DATASET_SUITE = "echat-dataset"
ROW_INDEX = "__row"  # row number in its shard, beside `id` in every failed expectation's examples
SCALAR_KINDS = (rec.STRING, rec.FLOAT, rec.DOUBLE, rec.INT, rec.BOOL)
LIST_KINDS = (rec.STRINGS, rec.INTS, rec.WORDS, rec.TURNS)
DURATION_TOLERANCE_S = 0.05  # a decoded file may differ from the declared duration by this much
DEFAULT_MAX_REJECT_RATIO = 0.25


@dataclass(frozen=True)
class Check:
    """One expectation and the words that name it on the console."""

    expectation: Any  # a great_expectations Expectation
    says: str


def _gxe():
    import great_expectations.expectations as gxe

    return gxe


def _fmt(values) -> str:
    values = list(values)
    return ", ".join(values) if len(values) <= 16 else ", ".join(values[:16]) + f", ... ({len(values)})"


def _bound(value: float | None) -> str:
    return "-inf" if value is None else f"{value:g}"


# ---------------------------------------------------------------------------------------------
# the schema suite


def schema_checks() -> list[Check]:
    gxe = _gxe()
    names = list(rec.FIELD_NAMES)
    return [
        Check(gxe.ExpectColumnValuesToBeInSet(column="column", value_set=names,
                                              description="every column of the shard is a field of schemas/record.py"),
              "no column outside the schema"),
        Check(gxe.ExpectColumnDistinctValuesToContainSet(column="column", value_set=names,
                                                         description="every field of schemas/record.py is a column of the shard"),
              "every schema field is a column"),
        Check(gxe.ExpectColumnPairValuesToBeEqual(column_A="arrow_type", column_B="expected_type",
                                                  description="each column has the arrow type of record.arrow_schema()"),
              "column types as record.arrow_schema()"),
    ]


def type_name(arrow_type) -> str:
    """An arrow type in words, without the name of a list's item field (`item` or `element`: parquet
    writers differ, the type is the same)."""
    import re

    return re.sub(r"list<(?:item|element): ", "list<", str(arrow_type))


def schema_frame(arrow_schema) -> "Any":
    """One row per column of a shard: its name, its arrow type and the type the schema wants."""
    import pandas as pd

    expected = rec.arrow_schema()
    rows = []
    for field in arrow_schema:
        want = expected.field(field.name).type if field.name in expected.names else None
        rows.append({"column": field.name, "arrow_type": type_name(field.type),
                     "expected_type": type_name(want) if want is not None else "(not in the schema)"})
    return pd.DataFrame(rows, columns=["column", "arrow_type", "expected_type"])


# ---------------------------------------------------------------------------------------------
# the record suite


def problem_column(name: str, what: str) -> str:
    return f"{name}__{what}"


def record_checks() -> list[Check]:
    """The record suite, field by field from `FIELDS`, then the rules across fields."""
    gxe = _gxe()
    checks: list[Check] = []
    for f in rec.FIELDS:
        if f.kind in SCALAR_KINDS:
            if not f.nullable:
                checks.append(Check(gxe.ExpectColumnValuesToNotBeNull(column=f.name, description=f"{f.name} is required"),
                                    f"{f.name} is required (not null)"))
                if f.kind == rec.STRING:
                    checks.append(Check(gxe.ExpectColumnValueLengthsToBeBetween(column=f.name, min_value=1,
                                                                                description=f"{f.name} is not empty"),
                                        f"{f.name} is not empty"))
            if f.allowed is not None:
                checks.append(Check(gxe.ExpectColumnValuesToBeInSet(column=f.name, value_set=list(f.allowed),
                                                                    description=f"{f.name} is one of its vocabulary"),
                                    f"{f.name} is one of {{{_fmt(f.allowed)}}}"))
            if f.min is not None or f.max is not None:
                checks.append(Check(gxe.ExpectColumnValuesToBeBetween(column=f.name, min_value=f.min, max_value=f.max,
                                                                      description=f"{f.name} in [{_bound(f.min)}, {_bound(f.max)}]"),
                                    f"{f.name} in [{_bound(f.min)}, {_bound(f.max)}]"))
        elif f.kind == rec.AUDIO:
            size = problem_column(f.name, "bytes")
            if not f.nullable:
                checks.append(Check(gxe.ExpectColumnValuesToBeBetween(column=size, min_value=1,
                                                                      description=f"{f.name} holds audio bytes"),
                                    f"{f.name} holds audio bytes"))
            decode = problem_column(f.name, "decode")
            checks.append(Check(gxe.ExpectColumnValuesToBeNull(column=decode,
                                                               description=f"{f.name} decodes at its declared rate and duration (sampled rows)"),
                                f"{f.name} decodes at its declared rate and duration (sampled rows)"))
        elif f.kind in LIST_KINDS and (f.allowed is not None or f.min is not None or f.max is not None):
            column = problem_column(f.name, "outside_vocabulary" if f.allowed is not None else "outside_range")
            says = (f"every item of {f.name} is one of {{{_fmt(f.allowed)}}}" if f.allowed is not None
                    else f"every item of {f.name} in [{_bound(f.min)}, {_bound(f.max)}]")
            checks.append(Check(gxe.ExpectColumnValuesToBeNull(column=column, description=says), says))
    checks += [
        Check(gxe.ExpectColumnValuesToBeUnique(column="id", description="ids are unique"), "id is unique"),
        Check(gxe.ExpectColumnPairValuesAToBeGreaterThanB(column_A="segment_end", column_B="segment_start", or_equal=True,
                                                          ignore_row_if="either_value_is_missing",
                                                          description="segment_end >= segment_start"),
              "segment_end >= segment_start"),
        Check(gxe.ExpectColumnValuesToBeNull(column=problem_column("task", "unmet_needs"),
                                             description="each row holds what its task needs (schemas/tasks.py)"),
              "each row holds what its task needs (schemas/tasks.py: reply, reasoning forms, audio...)"),
        Check(gxe.ExpectColumnValuesToBeNull(column=problem_column("think_tags", "problem"),
                                             description="think_tags is a well-formed tag-form trace naming reply_emotion"),
              "think_tags is a well-formed tag-form trace naming the row's reply_emotion"),
        Check(gxe.ExpectColumnValuesToBeNull(column=problem_column("think_text", "problem"),
                                             description="think_text is <think>...<think end> with a body"),
              "think_text is <think>...<think end> with a body"),
    ]
    return checks


def record_frame_columns() -> list[str]:
    """The columns of the frame the record suite runs on, in order."""
    cols = [ROW_INDEX] + [f.name for f in rec.FIELDS if f.kind in SCALAR_KINDS]
    for f in rec.FIELDS:
        if f.kind == rec.AUDIO:
            cols += [problem_column(f.name, "bytes"), problem_column(f.name, "decode")]
        elif f.kind in LIST_KINDS and (f.allowed is not None or f.min is not None or f.max is not None):
            cols.append(problem_column(f.name, "outside_vocabulary" if f.allowed is not None else "outside_range"))
    cols += [problem_column("task", "unmet_needs"), problem_column("think_tags", "problem"), problem_column("think_text", "problem")]
    return cols


def derived_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The record-suite columns of one row (a dict of the shard's columns, audio included) that are
    not flat values of the row: list items outside their vocabulary, unmet task needs, reasoning
    problems, audio byte lengths. (`*__decode` is filled by the validator for sampled rows.)"""
    out: dict[str, Any] = {}
    for f in rec.FIELDS:
        value = row.get(f.name)
        if f.kind == rec.AUDIO:
            data = (value or {}).get("bytes") if isinstance(value, dict) else None
            out[problem_column(f.name, "bytes")] = len(data) if data else 0
            out[problem_column(f.name, "decode")] = None
        elif f.kind in LIST_KINDS and f.allowed is not None:
            bad = [repr(v) for v in (value or []) if v not in f.allowed]
            out[problem_column(f.name, "outside_vocabulary")] = ", ".join(bad) if bad else None
        elif f.kind in LIST_KINDS and (f.min is not None or f.max is not None):
            bad = [repr(v) for v in (value or []) if v is None or (f.min is not None and v < f.min) or (f.max is not None and v > f.max)]
            out[problem_column(f.name, "outside_range")] = ", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") if bad else None
    out[problem_column("task", "unmet_needs")] = unmet_task_needs(row)
    out[problem_column("think_tags", "problem")] = tag_form_problem(row.get("think_tags"), row.get("reply_emotion"))
    out[problem_column("think_text", "problem")] = text_form_problem(row.get("think_text"))
    return out


def unmet_task_needs(row: dict[str, Any]) -> str | None:
    """What the row's task needs (schemas/tasks.py) that the row lacks, in words; None when nothing.

    A task that reasons needs both reasoning forms (the table accepts either; a dual-thinking
    corpus row carries the tag form and the natural-language form). A task outside the vocabulary
    is left to the vocabulary check.
    """
    tag = row.get("task")
    if not tag:
        return None
    try:
        t = task_table.task(tag)
    except (KeyError, ValueError):
        return None
    missing = t.missing(row)
    if t.reasons:
        missing += [form for form in task_table.REASONING_FORMS if not task_table.filled(row.get(form)) and form not in missing]
        missing = [m for m in missing if m != "|".join(task_table.REASONING_FORMS)]
    if not missing:
        return None
    return f"{tag} needs {', '.join(m.replace('|', ' or ') for m in missing)} (empty)"


def tag_form_problem(trace: str | None, reply_emotion: str | None) -> str | None:
    if trace is None:
        return None
    try:
        parsed = parse_tag_form(trace, strict=True)
    except ThinkParseError as err:
        return str(err)[:200]
    if reply_emotion and parsed.reply_emotion and parsed.reply_emotion != reply_emotion:
        return f"names reply emotion {parsed.reply_emotion}, the row says {reply_emotion}"
    return None


def text_form_problem(trace: str | None) -> str | None:
    if trace is None:
        return None
    text = trace.strip()
    if not text.startswith(THINK_START) or not text.endswith(THINK_END):
        return f"not wrapped in {THINK_START}...{THINK_END}: {text[:80]!r}"
    body, _reply = split_think(text)
    if not body:
        return "empty reasoning between the markers"
    return None


# ---------------------------------------------------------------------------------------------
# the dataset suite


def dataset_checks(max_reject_ratio: float) -> list[Check]:
    gxe = _gxe()
    return [
        Check(gxe.ExpectColumnValuesToBeBetween(column="reject_ratio", min_value=0.0, max_value=max_reject_ratio,
                                                description=f"rejects / (rows + rejects) <= {max_reject_ratio:g}"),
              f"reject ratio (rejects / (rows + rejects)) <= {max_reject_ratio:g}"),
        Check(gxe.ExpectColumnValuesToBeBetween(column="duplicate_ids", min_value=0, max_value=0,
                                                description="no id in two rows of the corpus"),
              "no id in two rows of the corpus (across shards)"),
        Check(gxe.ExpectColumnValuesToBeBetween(column="duplicate_audio", min_value=0, max_value=0,
                                                description="no audio (identical FLAC bytes) in two rows of the corpus"),
              "no audio twice in the corpus (identical bytes)"),
        Check(gxe.ExpectColumnPairValuesToBeEqual(column_A="rows_in_shards", column_B="rows_in_summary",
                                                  ignore_row_if="either_value_is_missing",
                                                  description="the shards hold the rows summary.json counts"),
              "the shards hold the rows summary.json counts"),
        Check(gxe.ExpectColumnValuesToBeInSet(column="reconciliation_ok", value_set=[True],
                                              description="summary.json reconciles (inputs = outputs + rejects)"),
              "summary.json reconciles (inputs = outputs + rejects)"),
    ]


def build_suite(name: str, checks: list[Check]):
    import great_expectations as gx

    suite = gx.ExpectationSuite(name=name)
    for check in checks:
        suite.add_expectation(check.expectation)
    return suite
