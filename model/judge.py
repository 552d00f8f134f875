"""`echat eval --judge`: EChat-eval-style scores of empathetic replies, from an LLM judge.

    echat eval --judge --predictions preds.jsonl --shards out/test-build --response-audio wavs/ \
        --judge-model gpt-4o [--judge-base-url http://localhost:8000/v1] [--report judge.json]

OSUM-EChat's EChat-eval scores a model's spoken replies with GPT-4o and reports one automatic
score per kind of test query: Emotion, Age, Gender, Event and Multi (several cues at once); its
README shows that table as an image and names no finer dimensions. The judge here gives that
headline score (`empathy`) and, to say where it comes from, three more, each with a reason:
`paralinguistic` (did the reply take in what the voice told), `content` (does it answer what was
said) and `speech_emotion` (does the emotion heard in the reply's speech fit). The dimensions, the
scale (0-100, the paper's) and every word the judge reads are data: model/judge_prompt.yaml
(`--judge-prompt FILE` for another).

What the judge is told, per response:
  - the query: its transcript and its paralinguistic labels (emotion, age, gender, events, style,
    with their confidence) from the record the prediction was made on, joined by key: the rows of
    `--predictions` (what `echat infer --shards` writes) name their record by `key`, and `--shards`
    is the build (or parquet files, or OSUM raw list) they were made from;
  - the cues the query carries (`cues` on the record or the prediction row, as synth-queries writes
    them: `age:child`, `event:cough`; else read from the labels: see `query_cues`);
  - the response text: the prediction with any `<think>...<think end>` reasoning removed;
  - the emotion heard in the response AUDIO: the build's emotion stage (the profile's `emotion` slot,
    loaded as a build loads it: the offline heuristic in configs/local.yaml, emotion2vec in
    production; `--set emotion.backend=...`, `--set emotion.params.x=...`) run on the response's
    speech, with the response text as its transcript (what the build's emotion stage gets from
    ASR). `echat infer` writes speech tokens, not audio: the speech comes from the row's
    `response_audio` (a path, relative to the predictions file) or `--response-audio DIR/<key>.wav`
    (or .flac); a response without speech is not judged (reason `no_response_audio`).

The judge itself is model/judge_stage.py. Requests go through the same machinery as the reply
stage (synth/llm_reply.py): its `openai_client` (the key from `--judge-api-key-env`, default
$OPENAI_API_KEY, only; a local server without one gets a warning), `CircuitBreaker`, `KeyedGate`
and `retry_after`; the judge is a Stage run by the stage runner, so requests are concurrent (`--judge-max-in-flight`) and HTTP 429/5xx/timeouts are retried
with backoff and the peer's Retry-After (`--judge-retries`). A verdict that is not JSON, lacks a
dimension or scores off the scale is asked again with the error fed back (`--judge-attempts`
answers in all). Valid verdicts are cached (synth/cache.py, namespace `echat-judge`, keyed by the
judge model, the prompt version, the messages and the sampling parameters), so a rerun sends no
request it already has a verdict for.

A response that cannot be judged (no record, no speech, a failing endpoint, an unusable verdict)
is kept in the report with its reason and left out of the means, which say how many they cover.
Responses of tasks that are not spoken dialogue replies (ASR, labels, TTS) are counted under
`skipped`. The command line is the one place that knows every folder (DESIGN.md): this command
reaches into synth/, pipelines/ and labelers/ only inside its functions, so importing
`echat.model` (training, inference) still pulls none of them in. The per-task grouping: `emotion`, `age`, `gender`, `event` for a query with one kind of
cue, `multi` for several kinds, `none` for a query with no cue at all.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from echat.schemas import tasks as task_table
from echat.schemas.reasoning import split_think
from echat.schemas.stage import Stage

from .judge_stage import (  # noqa: F401 - PROMPT_FILE, load_judge_prompt, validate_verdict: the judge's API here too
    PROMPT_FILE,
    QUERY_LABELS,
    STRUCTURED_MODES,
    JudgeError,
    JudgePrompt,
    LLMJudge,
    load_judge_prompt,
    validate_verdict,
)

# The paper's columns, in its order; `none` (no cue) comes after them when there are such queries.
TASK_GROUPS = ("emotion", "age", "gender", "event", "multi")
NO_CUE = "none"
CUE_KINDS = ("emotion", "age", "gender", "event")
# Labels that are no cue: the ordinary value a query has when nothing in the voice stands out.
ORDINARY = {"emotion": {"neutral", "other"}, "age": {"adult"}}

# Why a response was not judged, before any request.
NO_RECORD, NO_AUDIO, EMPTY_RESPONSE, AUDIO_UNREADABLE = "no_query_record", "no_response_audio", "empty_response", "response_audio_unreadable"
EMOTION_REJECTED = "response_emotion_unknown"


# ----------------------------------------------------------------------------- the query side


def query_cues(record: dict[str, Any]) -> list[str]:
    """The cues a query carries, as `kind:value` (`age:child`, `event:cough`), sorted.

    A `cues` list on the record (synth-queries writes one per planned query) is taken as given.
    Else they are read from the labels: an emotion other than neutral/other, a child's or an older
    person's voice, each vocal event. Every voice has a gender, so the labels cannot tell whether
    the gender was the point of a query: it counts as the cue only of a query that has no other.
    """
    given = record.get("cues")
    if isinstance(given, (list, tuple)) and given:
        cues = []
        for cue in given:
            kind, _, value = str(cue).partition(":")
            kind = "event" if kind == "events" else kind
            if kind not in CUE_KINDS or not value:
                raise JudgeError(f"record {record.get('id')}: cue {cue!r} is not kind:value with kind one of {', '.join(CUE_KINDS)}")
            cues.append(f"{kind}:{value}")
        return sorted(set(cues))
    cues = []
    for kind in ("emotion", "age"):
        value = record.get(kind)
        if value and value not in ORDINARY[kind]:
            cues.append(f"{kind}:{value}")
    cues += [f"event:{e}" for e in record.get("events") or []]
    if not cues and record.get("gender"):
        cues.append(f"gender:{record['gender']}")
    return sorted(set(cues))


def task_group(cues: list[str]) -> str:
    """`emotion` / `age` / `gender` / `event` for one kind of cue, `multi` for several, `none` for none."""
    kinds = {cue.partition(":")[0] for cue in cues}
    if not kinds:
        return NO_CUE
    return kinds.pop() if len(kinds) == 1 else "multi"


def judged_task(task: Any) -> str | None:
    """The normalised task when its answer is a spoken-dialogue reply to speech, else None."""
    try:
        spec = task_table.task(task_table.normalize(str(task)))
    except (KeyError, ValueError):
        return None
    return spec.tag if spec.replies and spec.input == task_table.SPEECH_INPUT else None


def query_records(source: str) -> dict[str, dict[str, Any]]:
    """The records of `source` by id, with the fields the judge shows (no audio is decoded)."""
    from echat.model.infer_cli import read_records

    keep = {"id", "transcript", "language", "cues", "source_uri",
            *(f for name, _ in QUERY_LABELS for f in (name, f"{name}_score"))}
    return {str(r.get("id")): {k: v for k, v in r.items() if k in keep} for r in read_records(source, None)}


def response_audio_path(row: dict[str, Any], predictions: Path, audio_dir: Path | None) -> Path | None:
    """Where the response's speech is: the row's `response_audio`, else `audio_dir/<key>.wav|.flac`."""
    given = row.get("response_audio")
    if isinstance(given, str) and given:
        path = Path(given)
        return path if path.is_absolute() else predictions.parent / path
    if audio_dir is not None:
        for suffix in (".wav", ".flac"):
            candidate = audio_dir / f"{row['key']}{suffix}"
            if candidate.is_file():
                return candidate
    return None


@dataclass
class Unjudged:
    """A response that got no verdict, and why (kept in the report, left out of the means)."""

    reason: str
    detail: str


def build_items(
    rows: list[dict[str, Any]], records: dict[str, dict[str, Any]], predictions: Path, audio_dir: Path | None,
) -> tuple[list[dict[str, Any]], Counter]:
    """One item per judged prediction row (the query record joined in), and the rows skipped by reason."""
    items, skipped = [], Counter()
    for i, row in enumerate(rows):
        task = judged_task(row.get("task"))
        if task is None:
            skipped[f"task {row.get('task')!r} is not a spoken-dialogue reply"] += 1
            continue
        key = str(row["key"])
        record = records.get(key)
        _, response = split_think(row["prediction"] if isinstance(row.get("prediction"), str) else "")
        # The row number keeps ids unique when a file holds a (key, task) twice.
        item: dict[str, Any] = {"id": f"{key} {task} #{i}", "key": key, "task": task, "row": i, "response_text": response}
        if record is None:
            item.update(cues=[], group=NO_CUE, _unjudged=Unjudged(NO_RECORD, f"no record with id {key!r} in --shards"))
            items.append(item)
            continue
        merged = {**record, **({"cues": row["cues"]} if row.get("cues") else {})}
        cues = query_cues(merged)
        item.update({k: v for k, v in record.items() if k != "id"}, cues=cues, group=task_group(cues))
        item["language"] = row.get("language") or record.get("language")
        audio = response_audio_path(row, predictions, audio_dir)
        item["response_audio"] = str(audio) if audio is not None else None
        if not response:
            item["_unjudged"] = Unjudged(EMPTY_RESPONSE, "the prediction holds no reply text (after any reasoning)")
        elif audio is None:
            where = f" or {audio_dir}/{key}.wav" if audio_dir is not None else " (give --response-audio DIR)"
            item["_unjudged"] = Unjudged(NO_AUDIO, f"no speech for this response: no `response_audio` on the row{where}")
        elif not audio.is_file():
            item["_unjudged"] = Unjudged(NO_AUDIO, f"response audio {audio} does not exist")
        items.append(item)
    return items, skipped


# ----------------------------------------------------------------------------- the emotion heard


@dataclass
class EmotionLabeler:
    """The build's emotion stage, as the pipeline builds it from a profile (pipelines/graph.py)."""

    stage: Stage
    retry: Any  # RetryPolicy
    precedence: tuple[str, ...]


def load_profile(profile_name: str, overrides: list[str]):
    """The run profile (pipelines/profile.py), `--set` overrides applied; JudgeError naming the problem."""
    from echat.pipelines.profile import ProfileError, load_profile as load

    try:
        return load(profile_name, overrides)
    except ProfileError as exc:
        raise JudgeError(str(exc)) from None


def emotion_labeler(profile) -> EmotionLabeler:
    """The profile's emotion stage (its first enabled slot of kind `emotion`), configured as a build
    configures it (pipelines/graph.py stage_specs): the backend table, the slot's params with the
    profile's cache folder for a backend that takes one, its batch size, retry and precedence."""
    import inspect

    from echat.pipelines import backends
    from echat.schemas.stage_runner import RetryPolicy

    entries = [e for e in profile.enabled_stages() if e.backend_kind == "emotion"]
    if not entries:
        raise JudgeError(f"profile {profile.name!r} has no enabled emotion stage to hear the responses with; "
                         "set one with --set emotion.backend=heuristic (or emotion2vec)")
    entry = entries[0]
    try:
        cls = backends.stage_class(entry.backend_kind, entry.backend)
    except backends.BackendError as exc:
        raise JudgeError(f"emotion stage {entry.slot!r}: {exc}") from None
    params = dict(entry.params)
    if "cache_dir" in inspect.signature(cls).parameters and "cache_dir" not in params:
        params["cache_dir"] = str(Path(profile.cache_dir).expanduser())
    stage = cls(**params)
    stage.slot = entry.slot
    if entry.batch_size is not None:
        stage.batch_size = entry.batch_size
    if entry.max_in_flight is not None:
        stage.max_in_flight = entry.max_in_flight
    retry = RetryPolicy(**(entry.retry or profile.retry).model_dump())
    return EmotionLabeler(stage, retry, tuple(profile.precedence))


def hear_emotions(items: list[dict[str, Any]], labeler: EmotionLabeler) -> None:
    """Set each judgeable item's `response_emotion` (+ score, model) from its speech, in place."""
    from echat.schemas.audio import AudioError, load_audio
    from echat.schemas.record import SAMPLE_RATE
    from echat.schemas.stage_runner import run_stages

    inputs = []
    for item in items:
        if "_unjudged" in item:
            continue
        try:
            decoded = load_audio(item["response_audio"], target_sample_rate=SAMPLE_RATE)
        except AudioError as exc:
            item["_unjudged"] = Unjudged(AUDIO_UNREADABLE, f"{item['response_audio']}: {exc}")
            continue
        inputs.append({
            "id": item["id"], "source_uri": item["response_audio"], "segment_start": 0.0,
            "segment_end": len(decoded.waveform) / SAMPLE_RATE, "duration": len(decoded.waveform) / SAMPLE_RATE,
            "_waveform": decoded.waveform, "sampling_rate": SAMPLE_RATE,
            # What the build's emotion stage reads after ASR: the words of the speech, which the
            # response text is (a heuristic stage uses them; an audio model ignores them).
            "transcript": item["response_text"], "language": item.get("language"),
        })
    if not inputs:
        return
    outputs, rejects = run_stages([labeler.stage], inputs, precedence=labeler.precedence, retry=labeler.retry)
    by_id = {item["id"]: item for item in items}
    for out in outputs:
        item = by_id[out["id"]]
        if out.get("emotion") is None:
            item["_unjudged"] = Unjudged(EMOTION_REJECTED, f"the emotion stage ({labeler.stage.describe()}) gave no emotion")
            continue
        item.update(response_emotion=out["emotion"], response_emotion_score=out.get("emotion_score"),
                    response_emotion_model=out.get("emotion_model") or labeler.stage.describe())
    for reject in rejects:
        by_id[reject.id]["_unjudged"] = Unjudged(EMOTION_REJECTED, f"the emotion stage rejected the audio: {reject.reason}: {reject.detail}")


# ----------------------------------------------------------------------------- asking the judge


def judge_items(items: list[dict[str, Any]], judge: LLMJudge, retry: Any) -> None:
    """Ask the judge about every judgeable item (in place: `judge_scores`, or `_unjudged`)."""
    from echat.schemas.stage_runner import run_stages

    todo = [{k: v for k, v in item.items() if k != "row"} for item in items if "_unjudged" not in item]
    if not todo:
        return
    outputs, rejects = run_stages([judge], todo, retry=retry)
    by_id = {item["id"]: item for item in items}
    for out in outputs:
        by_id[out["id"]]["judge_scores"] = out["judge_scores"]
    for reject in rejects:
        by_id[reject.id]["_unjudged"] = Unjudged(reject.reason, reject.detail)
    for item in items:  # the runner answers every input; this only keeps the counts honest if not
        if "judge_scores" not in item and "_unjudged" not in item:
            item["_unjudged"] = Unjudged("no_result", "the judge stage returned nothing for this response")


# ----------------------------------------------------------------------------- the report


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarise(items: list[dict[str, Any]], prompt: JudgePrompt) -> dict[str, Any]:
    """Per task group and overall: responses, judged, unscorable, and the mean of each dimension."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in items:
        groups[item["group"]].append(item)
    order = [g for g in (*TASK_GROUPS, NO_CUE) if g in groups]

    def block(members: list[dict[str, Any]]) -> dict[str, Any]:
        judged = [m for m in members if "judge_scores" in m]
        return {
            "responses": len(members), "judged": len(judged), "unscorable": len(members) - len(judged),
            "means": {d: _mean([float(m["judge_scores"][d]["score"]) for m in judged]) for d in prompt.names},
        }

    unscorable = Counter(item["_unjudged"].reason for item in items if "judge_scores" not in item)
    return {
        "tasks": {g: block(groups[g]) for g in order},
        "overall": block(items),
        "unscorable": dict(sorted(unscorable.items())),
    }


def response_entries(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the report keeps of each response: the case, and its verdict or why there is none."""
    entries = []
    for item in sorted(items, key=lambda it: it["row"]):
        unjudged = item.get("_unjudged")
        entries.append({
            "key": item["key"], "task": item["task"], "group": item["group"], "cues": item.get("cues") or [],
            "query_transcript": item.get("transcript"), "response_text": item["response_text"],
            "response_audio": item.get("response_audio"), "response_emotion": item.get("response_emotion"),
            "response_emotion_score": item.get("response_emotion_score"), "response_emotion_model": item.get("response_emotion_model"),
            "scores": item.get("judge_scores"),
            "unscorable": {"reason": unjudged.reason, "detail": unjudged.detail} if unjudged else None,
        })
    return entries


def format_table(report: dict[str, Any]) -> str:
    """The paper's table: a row per dimension, a column per task group, then the counts."""
    judge = report["judge"]
    columns = list(report["tasks"]) + ["all"]
    blocks = {**report["tasks"], "all": report["overall"]}
    width = max(8, *(len(c) for c in columns)) + 1
    lines = [f"EChat-eval judge: {judge['model']} (prompt {judge['prompt_version']}, scale {judge['scale'][0]}-{judge['scale'][1]}); "
             f"response emotion by {judge['emotion_labeler']}"]
    lines.append(f"{'dimension':<16}" + "".join(f"{c.capitalize() if c != 'all' else 'All':>{width}}" for c in columns))
    lines.append("-" * (16 + width * len(columns)))
    for name in judge["dimensions"]:
        cells = [blocks[c]["means"][name] for c in columns]
        lines.append(f"{name:<16}" + "".join(f"{('-' if v is None else f'{v:.1f}'):>{width}}" for v in cells))
    for count in ("judged", "unscorable"):
        lines.append(f"{count:<16}" + "".join(f"{blocks[c][count]:>{width}}" for c in columns))
    for reason, n in report["unscorable"].items():
        lines.append(f"unscorable {n} response(s): {reason}")
    for reason, n in report["skipped"].items():
        lines.append(f"skipped {n} row(s): {reason}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `--judge` options of `echat eval`."""
    group = parser.add_argument_group("LLM judge (--judge): EChat-eval-style empathy scores of dialogue replies")
    group.add_argument("--judge", action="store_true", help="score the dialogue replies with an LLM judge instead of reference metrics")
    group.add_argument("--shards", metavar="DIR", help="the build (or parquet / OSUM raw list) the predictions were made on: the query side")
    group.add_argument("--response-audio", metavar="DIR", help="folder of the responses' speech as <key>.wav or <key>.flac (a row's `response_audio` wins)")
    group.add_argument("--judge-model", metavar="NAME", help="the judge model the endpoint serves (e.g. gpt-4o)")
    group.add_argument("--judge-base-url", metavar="URL", help="an OpenAI-compatible endpoint (default: OpenAI's)")
    group.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", metavar="VAR", help="environment variable with the key (default OPENAI_API_KEY)")
    group.add_argument("--judge-prompt", metavar="FILE.yaml", help="judge prompt file (default: model/judge_prompt.yaml)")
    group.add_argument("--judge-max-in-flight", type=int, default=8, metavar="N", help="requests at once (default 8)")
    group.add_argument("--judge-timeout-s", type=float, default=60.0, metavar="S")
    group.add_argument("--judge-attempts", type=int, default=2, metavar="N", help="verdicts asked per response when one is unusable (default 2)")
    group.add_argument("--judge-retries", type=int, default=None, metavar="N",
                       help="tries per request on HTTP 429/5xx/timeouts (default: the profile's retry.max_attempts)")
    group.add_argument("--judge-structured-output", choices=STRUCTURED_MODES, default="json_object")
    group.add_argument("--profile", default="local", help="profile whose emotion stage hears the responses (default: local)")
    group.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="profile override, e.g. emotion.backend=emotion2vec or emotion.params.model=DIR (repeatable)")
    group.add_argument("--cache-dir", metavar="DIR", help="verdict cache root (default: the profile's cache_dir)")


def stray_options(args: argparse.Namespace) -> list[str]:
    """The judge's options given without `--judge` (they would be ignored): their flags."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    stray = []
    for action in defaults._actions:
        if action.dest in ("help", "judge") or not hasattr(args, action.dest):
            continue
        if getattr(args, action.dest) != action.default:
            stray.append(action.option_strings[0])
    return stray


def run(args: argparse.Namespace) -> int:
    from echat.model.evaluate import PredictionsError, read_predictions
    from echat.schemas.stage_runner import RetryPolicy

    def fail(message: str) -> int:
        print(f"echat eval --judge: {message}", file=sys.stderr)
        return 2

    if not args.shards:
        return fail("--shards is required: the records the predictions were made on (their transcripts and labels)")
    if not args.judge_model:
        return fail("--judge-model is required: the model name the judge endpoint serves")
    if args.judge_max_in_flight < 1:
        return fail(f"--judge-max-in-flight must be at least 1, got {args.judge_max_in_flight}")
    audio_dir = Path(args.response_audio) if args.response_audio else None
    if audio_dir is not None and not audio_dir.is_dir():
        return fail(f"--response-audio {audio_dir}: no such folder")
    try:
        rows = read_predictions(args.predictions)
    except PredictionsError as err:
        return fail(str(err))
    if not rows:
        return fail(f"{args.predictions} holds no predictions")
    try:
        profile = load_profile(args.profile, args.overrides)
        labeler = emotion_labeler(profile)
        cache_dir = args.cache_dir or profile.cache_dir
        retry = RetryPolicy(**profile.retry.model_dump())
        if args.judge_retries is not None:
            if args.judge_retries < 1:
                return fail(f"--judge-retries must be at least 1, got {args.judge_retries}")
            retry = RetryPolicy(max_attempts=args.judge_retries, backoff_s=retry.backoff_s, max_backoff_s=retry.max_backoff_s)
        judge = LLMJudge(
            model=args.judge_model, base_url=args.judge_base_url, api_key_env=args.judge_api_key_env,
            structured_output=args.judge_structured_output, timeout_s=args.judge_timeout_s,
            answer_attempts=args.judge_attempts, prompt_path=args.judge_prompt, cache_dir=str(Path(cache_dir).expanduser()),
        )
        judge.max_in_flight = args.judge_max_in_flight
    except (JudgeError, ValueError) as err:  # pydantic and the backends' own checks are ValueErrors too
        return fail(str(err))
    try:
        records = query_records(args.shards)
    except ValueError as err:  # DataSourceError, naming the path
        return fail(f"--shards {args.shards}: {err}")
    try:
        items, skipped = build_items(rows, records, Path(args.predictions), audio_dir)
    except JudgeError as err:
        return fail(str(err))
    if not items:
        return fail(f"{args.predictions}: no spoken-dialogue replies to judge ({sum(skipped.values())} row(s) of other tasks)")
    try:
        judge.setup()  # before the labeler runs: a missing key fails at once, naming the variable
    except RuntimeError as err:
        return fail(str(err))
    try:
        hear_emotions(items, labeler)
    except Exception as exc:  # noqa: BLE001 - a model that cannot load (a wrong path, a missing package)
        judge.teardown()
        return fail(f"the emotion stage {labeler.stage.describe()} could not run: {type(exc).__name__}: {exc}")
    try:
        judge_items(items, judge, retry)
    finally:
        judge.teardown()

    from echat.endpoints import safe_url

    report = {
        "predictions": str(args.predictions), "shards": str(args.shards),
        "judge": {"model": judge.model, "base_url": safe_url(judge.base_url), "prompt_version": judge.prompt.version,
                  "prompt_file": judge.prompt.source, "scale": [judge.prompt.scale_min, judge.prompt.scale_max],
                  "dimensions": list(judge.prompt.names), "emotion_labeler": labeler.stage.describe()},
        **summarise(items, judge.prompt),
        "skipped": dict(skipped),
        "usage": judge.usage(),
        "responses": response_entries(items),
    }
    out = Path(args.report) if args.report else Path(args.predictions).with_suffix(".judge.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(report))
    print(f"\nreport: {out}")
    overall = report["overall"]
    if overall["unscorable"]:
        print(f"echat eval --judge: warning: {overall['unscorable']} of {overall['responses']} response(s) could not be judged "
              f"({', '.join(f'{r}: {n}' for r, n in report['unscorable'].items())}); the means leave them out", file=sys.stderr)
    return 0 if overall["judged"] else 1
