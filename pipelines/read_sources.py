"""`ReadSources`: `--input` listed and read inside the pipeline, so no listing sits in the driver.

```
units (the driver's few) -> ReadUnits -> records, rejects, subunits -> SpreadUnits -> ReadSubunits
gs:// or s3:// prefix    -> fileio.MatchFiles -> Objects
all records -> DropDone -> BySourceUri (GroupByKey) -> KeepFirst -> records (and OUT/_work/sources.jsonl)
all rejects (the readers', the duplicates) -> rejects, and one tally per reject
```
A local folder is one ROOT_FOLDER unit: its own files are read where it is read, each subfolder
becomes a FOLDER unit walked whole by another DoFn call after a Reshuffle, so big trees are walked
in parallel. A WeNet shard list is read the same way (the list, then one call per tar); a manifest
or an OSUM raw list is one unit streamed line by line; a Hugging Face dataset's files are the
driver's units. What each unit holds is defined once, in pipelines/sources.py (`read_unit`).

What a folder held besides audio is counted in Beam counters `source.skipped.<kind>`
(`skipped_counts` reads them back after the run); inputs dropped because an earlier run finished
them, in `source.resumed`. With a progress folder, the listing DoFns report how many records they
found, and the total once the listing is complete (pipelines/progress.py).
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics

from echat.schemas.stage import Reject

from . import progress
from .progress import LISTING_SLOT
from .source_rows import STAGE, SourceContext, printable_name
from .sources import RECORD, REJECT, REMOTE_PREFIX, SKIP, UNIT, Probe, Unit, object_item, probe_input, read_unit
from .stage_transform import METRICS_NAMESPACE

SKIPPED_PREFIX = "source.skipped."
RESUMED = "source.resumed"
_UNITS, _REJECTS = "units", "rejects"


class ReadSources(beam.PTransform):
    """PBegin -> (records, rejects, tallies): the starting records of `input_path` (one per source,
    duplicates by source_uri rejected), the source's rejects (dicts), and one (key, Counter) tally
    per reject for the reconciliation (pipelines/summary.py).

    `probe`: the driver's `probe_input` of `input_path`, when already made. `done_inputs`:
    source_uris an earlier run finished, dropped right after listing. `sources_path`: where to
    write `source_uri -> path` of every record (the one place its full path is kept).
    """

    def __init__(self, input_path: str, ctx: SourceContext, *, manifest_encoding: str = "utf-8",
                 columns: dict | None = None, probe: Probe | None = None, done_inputs: frozenset[str] | None = None,
                 sources_path: str | None = None, progress_dir: str | None = None):
        super().__init__()
        self.input_path, self.ctx, self.encoding, self.columns = input_path, ctx, manifest_encoding, dict(columns or {})
        self.probe = probe or probe_input(input_path, manifest_encoding=manifest_encoding)
        self.done_inputs, self.sources_path, self.progress_dir = done_inputs, sources_path, progress_dir

    def configured(self, *, progress_dir: str | None, done_inputs: frozenset[str] | None) -> "ReadSources":
        """This transform with the build graph's progress folder and resume set (those unset here)."""
        made = copy.copy(self)
        made.progress_dir = self.progress_dir or progress_dir
        made.done_inputs = self.done_inputs if self.done_inputs is not None else done_inputs
        return made

    def expand(self, pbegin):
        read = dict(ctx=self.ctx, encoding=self.encoding, columns=self.columns, progress_dir=self.progress_dir)
        if self.probe.kind == REMOTE_PREFIX:
            from apache_beam.io import fileio
            from apache_beam.io.filesystems import FileSystems

            found = (pbegin
                     | "Match" >> fileio.MatchFiles(FileSystems.join(self.probe.root, "**"))
                     | "Objects" >> beam.ParDo(_ObjectItems(self.ctx, self.progress_dir)).with_outputs(_REJECTS, main="records"))
            records, rejects = [found.records], [found[_REJECTS]]
        else:
            first = (pbegin
                     | "Units" >> beam.Create(self.probe.root_units(self.columns))
                     | "ReadUnits" >> beam.ParDo(_ReadUnit(**read, last=False)).with_outputs(_UNITS, _REJECTS, main="records"))
            second = (first[_UNITS]
                      | "SpreadUnits" >> beam.Reshuffle()
                      | "ReadSubunits" >> beam.ParDo(_ReadUnit(**read, last=True)).with_outputs(_UNITS, _REJECTS, main="records"))
            records, rejects = [first.records, second.records], [first[_REJECTS], second[_REJECTS]]
        return finish(records, rejects, done_inputs=self.done_inputs, sources_path=self.sources_path,
                      progress_dir=self.progress_dir)


class GivenSources(beam.PTransform):
    """PBegin -> (records, rejects, tallies) from records and rejects already in hand (tests, small
    callers), through the same resume drop, duplicate check and tallies as `ReadSources`."""

    def __init__(self, records: list[dict[str, Any]], rejects: list[dict[str, Any]] = (), *,
                 done_inputs: frozenset[str] | None = None, progress_dir: str | None = None):
        super().__init__()
        self.records, self.rejects = list(records), list(rejects)
        self.done_inputs, self.progress_dir = done_inputs, progress_dir

    def configured(self, *, progress_dir: str | None, done_inputs: frozenset[str] | None) -> "GivenSources":
        made = copy.copy(self)
        made.progress_dir = self.progress_dir or progress_dir
        made.done_inputs = self.done_inputs if self.done_inputs is not None else done_inputs
        return made

    def expand(self, pbegin):
        keyed = [(r["source_uri"], ((i,), f"given record #{i}", r)) for i, r in enumerate(self.records)]
        placed = [(f"given reject #{i}", r) for i, r in enumerate(self.rejects)]
        return finish([pbegin | "Records" >> beam.Create(keyed, reshuffle=False)],
                      [pbegin | "Rejects" >> beam.Create(placed, reshuffle=False)],
                      done_inputs=self.done_inputs, progress_dir=self.progress_dir)


def finish(records: list, rejects: list, *, done_inputs: frozenset[str] | None, sources_path: str | None = None,
           progress_dir: str | None = None):
    """Listed records `(source_uri, (order, where, record))` and rejects `(where, reject)` ->
    (records, rejects, tallies), inputs of `done_inputs` dropped, duplicates rejected."""
    records = records | "AllListed" >> beam.Flatten()
    rejects = rejects | "AllListingRejects" >> beam.Flatten()
    if done_inputs:
        records = records | "DropDone" >> beam.Filter(_NotDone(done_inputs, lambda kv: kv[0]))
        rejects = rejects | "DropDoneRejects" >> beam.Filter(_NotDone(done_inputs, lambda wr: wr[1]["source_uri"]))
    kept = (records
            | "BySourceUri" >> beam.GroupByKey()
            | "KeepFirst" >> beam.ParDo(_KeepFirst()).with_outputs(_REJECTS, main="records"))
    placed_rejects = (rejects, kept[_REJECTS]) | "SourceRejectsPlaced" >> beam.Flatten()
    records = kept.records
    if sources_path:
        (records
         | "SourcePathJson" >> beam.Map(source_path_line)
         | "WriteSourcePaths" >> beam.io.WriteToText(sources_path, shard_name_template="", num_shards=1, skip_if_empty=True))
    if progress_dir:
        (records
         | "CountListed" >> beam.combiners.Count.Globally()
         | "ReportListed" >> beam.Map(_report_total, progress_dir))
    return (records,
            placed_rejects | "SourceRejectDicts" >> beam.Map(lambda wr: wr[1]),
            placed_rejects | "TallySourceRejects" >> beam.MapTuple(source_reject_tally))


def source_path_line(record: dict[str, Any]) -> str:
    from echat.labelers.decode import SOURCE_PATH_KEY

    return json.dumps({"source_uri": record["source_uri"], "path": printable_name(record.get(SOURCE_PATH_KEY) or "")},
                      ensure_ascii=False)


def source_reject_tally(where: str, reject: dict[str, Any]) -> tuple[str, Counter]:
    """One tally per input the source rejected whole, keyed apart from the file's own tally.

    A duplicated path or a bad manifest row may name a file that another row builds: keying it
    by its place (`where`: the manifest line, the duplicate's listing) keeps the two inputs apart,
    so each reconciles on its own."""
    from .graph import reject_counts

    counts = reject_counts(reject)
    counts["file"] = 1
    return f"{reject['source_uri']} [{reject['reason']} at {where}]", counts


def keep_first(uri: str, entries) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
    """The same source listed twice would write the same segments twice: the first listed (least
    `order`) is kept, each other one becomes a `duplicate_source` reject with its place."""
    ordered = sorted(entries, key=lambda entry: entry[0])
    _, first_where, kept = ordered[0]
    rejects = [(where, Reject(source_uri=uri, stage=STAGE, reason="duplicate_source",
                              detail=f"listed more than once ({where}); kept the first ({first_where})").to_dict())
               for _, where, _ in ordered[1:]]
    return kept, rejects


class _KeepFirst(beam.DoFn):
    def process(self, element):
        kept, rejects = keep_first(*element)
        yield kept
        for reject in rejects:
            yield beam.pvalue.TaggedOutput(_REJECTS, reject)


class _NotDone:
    """Filter: False for an input an earlier run finished, or of another chunk (counted as resumed)."""

    def __init__(self, done, uri_of):
        # any container of the source_uris to skip: a set, or pipelines/resume.py's InputSelection
        self.done, self.uri_of = done, uri_of
        self.resumed = Metrics.counter(METRICS_NAMESPACE, RESUMED)

    def __call__(self, element) -> bool:
        if self.uri_of(element) in self.done:
            self.resumed.inc()
            return False
        return True


class _Listing(beam.DoFn):
    """Shared by the listing DoFns: route items to outputs, count skips, report progress."""

    def __init__(self, progress_dir: str | None):
        self.progress_dir = progress_dir

    def _route(self, item):
        if item.tag == RECORD:
            if self.progress_dir:
                progress.report(self.progress_dir, LISTING_SLOT, 1, 0, 0.0, 0.0)
            record = item.value
            yield record["source_uri"], (item.order, item.where or record["source_uri"], record)
        elif item.tag == REJECT:
            reject = item.value.to_dict()
            yield beam.pvalue.TaggedOutput(_REJECTS, (item.where or reject["source_uri"], reject))
        elif item.tag == SKIP:
            Metrics.counter(METRICS_NAMESPACE, SKIPPED_PREFIX + item.value).inc()
        else:
            yield beam.pvalue.TaggedOutput(_UNITS, item.value)

    def finish_bundle(self):
        if self.progress_dir:
            progress.flush(self.progress_dir)


class _ReadUnit(_Listing):
    """One unit per call (`sources.read_unit`); `last`: a unit read here must hold no further units."""

    def __init__(self, *, ctx: SourceContext, encoding: str, columns: dict, progress_dir: str | None, last: bool):
        super().__init__(progress_dir)
        self.ctx, self.encoding, self.columns, self.last = ctx, encoding, columns, last

    def process(self, unit: Unit):
        for item in read_unit(Unit(*unit), self.ctx, manifest_encoding=self.encoding, columns=self.columns):
            if item.tag == UNIT and self.last:
                raise ValueError(f"{unit.uri}: a {unit.kind} unit holds a further unit ({item.value.kind} {item.value.uri})")
            yield from self._route(item)


class _ObjectItems(_Listing):
    """One object of a gs:// or s3:// prefix (a fileio.MatchFiles result) per call."""

    def __init__(self, ctx: SourceContext, progress_dir: str | None):
        super().__init__(progress_dir)
        self.ctx = ctx

    def process(self, metadata):
        yield from self._route(object_item(metadata.path, self.ctx))


def _report_total(total: int, progress_dir: str) -> None:
    progress.report(progress_dir, LISTING_SLOT, 0, int(total), 0.0, 0.0)
    progress.flush(progress_dir)


def skipped_counts(counters: dict[str, int]) -> dict[str, int]:
    """{kind: count} of what the input held besides audio, from the run's counters."""
    return {name[len(SKIPPED_PREFIX):]: n for name, n in sorted(counters.items()) if name.startswith(SKIPPED_PREFIX) and n}
