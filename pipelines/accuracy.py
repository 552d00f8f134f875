"""How the labelers did against a manifest used as reference (`trust_manifest` per field).

A manifest field that is not trusted is kept aside as the record's `_reference` instead of filling
the label, so the labelers label it and the build can score them. Scored on the rows that reach the
shards: each label (accuracy, coverage, per-class recall and precision, confusion), the events as
sets (precision, recall, F1), and the transcript as WER (English) or CER (Chinese). A piece of a
file that VAD split is not scored on its transcript: the reference belongs to the whole file.
"""

from __future__ import annotations

from typing import Any

import apache_beam as beam

from echat.labelers.vad import SPLIT_FLAG
from echat.schemas.record import FIELDS_BY_NAME
from echat.schemas.scoring import NONE_CLASS, ErrorRate, EventSets, LabelAccuracy, language_of

from .source_rows import REFERENCE_KEY


def _scorer(name: str):
    if name == "events":
        return EventSets()
    if name.startswith("transcript_"):
        return ErrorRate(name.removeprefix("transcript_"))
    return LabelAccuracy(FIELDS_BY_NAME[name].allowed or ())


class LabelAccuracyFn(beam.CombineFn):
    """rows (before encoding, with `_reference`) -> {field: report}."""

    def create_accumulator(self) -> dict[str, Any]:
        return {"_rows": 0}

    def add_input(self, acc: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
        reference = record.get(REFERENCE_KEY) or {}
        if not reference:
            return acc
        acc["_rows"] += 1
        for field, expected in reference.items():
            predicted = record.get(field)
            if field == "transcript":
                if SPLIT_FLAG in (record.get("quality_flags") or []):
                    acc["_transcript_unscored_split"] = acc.get("_transcript_unscored_split", 0) + 1
                    continue
                field = f"transcript_{language_of(expected, record.get('language'))}"
                _get(acc, field).add(expected, predicted or "")
            elif field == "events":
                scorer = _get(acc, field)
                if predicted is None:  # nobody labelled events: coverage, not a miss
                    acc["_unlabelled_events"] = acc.get("_unlabelled_events", 0) + 1
                    continue
                scorer.add(set(expected), set(predicted))
            else:
                _get(acc, field).add(expected, predicted)
        return acc

    def merge_accumulators(self, accumulators) -> dict[str, Any]:
        merged = self.create_accumulator()
        for acc in accumulators:
            for key, value in acc.items():
                if key.startswith("_"):
                    merged[key] = merged.get(key, 0) + value
                elif key in merged:
                    merged[key].merge(value)
                else:
                    merged[key] = value
        return merged

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, scorer in sorted(acc.items()):
            if key.startswith("_"):
                continue
            report = scorer.report()
            if isinstance(scorer, LabelAccuracy):
                scored = report["scored"]
                unknown = sum(row.get(NONE_CLASS, 0) for row in report["confusion"].values())
                report["labelled"] = scored - unknown
                report["coverage"] = (scored - unknown) / scored if scored else None
                # accuracy over the rows the labeler did label (it may say "unknown" instead of guessing)
                correct = report["correct"]
                report["accuracy_of_labelled"] = correct / (scored - unknown) if scored - unknown else None
            if isinstance(scorer, EventSets):
                report["unlabelled"] = acc.get("_unlabelled_events", 0)
            out[key] = report
        if acc.get("_transcript_unscored_split"):
            out["transcript_unscored_split_pieces"] = acc["_transcript_unscored_split"]
        out["rows_with_reference"] = acc["_rows"]
        return out


class LabelAccuracyAccumulator(LabelAccuracyFn):
    """The same combine, stopped before the report: what the chunks of a build write, merged
    and reported by `merged_report`."""

    def extract_output(self, acc: dict[str, Any]) -> dict[str, Any]:
        return acc


def merged_report(accumulators: list[dict[str, Any]]) -> dict[str, Any]:
    fn = LabelAccuracyFn()
    return fn.extract_output(fn.merge_accumulators(accumulators))


def _get(acc: dict[str, Any], field: str):
    if field not in acc:
        acc[field] = _scorer(field)
    return acc[field]
