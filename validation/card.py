"""`echat card OUT`: the Hugging Face dataset card of a build, OUT/README.md.

The YAML header is what the Hub and `datasets` read: `configs` (the `train` split from
`data/train-*.parquet`), `dataset_info` (features from `schemas.record.hf_features()`, with the
`Audio` columns, and the split's size), license, languages, task categories, size category, pretty
name. So `datasets.load_dataset(OUT)` (or the Hub repo) loads the corpus through the card, audio
decoding included, and `huggingface_hub.DatasetCard.load(OUT / "README.md")` parses it.

The body says how the corpus was built: the profile, the models and prompt versions behind each
field and how many rows each wrote, label provenance shares, statistics, the field table (from
`schemas.record.FIELDS`), known limitations, and the OSUM-EChat citation. It names no path of the
machine that built the corpus.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from echat.schemas import record as rec

from . import corpus
from .stats import HEURISTIC, LABELS, MANIFEST, MODEL, UNKNOWN, CorpusStats, collect

CARD = "README.md"
DATA_FILES = f"{corpus.DATA_DIR}/train-*.parquet"
# Hugging Face task categories, by the OSUM task tags a corpus supports (schemas/tasks.py).
TASK_CATEGORIES = {
    "<TRANSCRIBE>": "automatic-speech-recognition",
    "<EMOTION>": "audio-classification", "<GENDER>": "audio-classification", "<AGE>": "audio-classification",
    "<CAPTION>": "audio-classification", "<STYLE>": "audio-classification",
    "<S2TCHAT>": "audio-text-to-text",
    "<S2TCHAT> <TEXT2TOKEN>": "audio-to-audio",
    "<TEXT2TOKEN>": "text-to-speech",
    "<TEXT2TEXT>": "text-generation",
}
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")]
CITATION = """@article{geng2025osumechat,
  title={OSUM-EChat: Enhancing End-to-End Empathetic Spoken Chatbot via Understanding-Driven Spoken Dialogue},
  author={Geng, Xuelong and Shao, Qijie and Xue, Hongfei and Wang, Shuiyuan and Xie, Hanke and Guo, Zhao and Zhao, Yi and Li, Guojian and Tian, Wenjie and Wang, Chengyou and others},
  journal={arXiv preprint arXiv:2508.09600},
  year={2025}
}"""


def size_category(rows: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def card_license(stats: CorpusStats) -> str:
    """The Hub license id: the one license every row states, `other` for a mix, `unknown` for none."""
    known = [k for k in stats.licenses if k != UNKNOWN]
    if not known:
        return "unknown"
    if len(known) == 1 and UNKNOWN not in stats.licenses:
        return str(known[0]).lower()
    return "other"


def card_data(stats: CorpusStats, summary: dict[str, Any] | None, pretty_name: str | None = None):
    """The card's YAML header as huggingface_hub DatasetCardData."""
    import datasets
    from huggingface_hub import DatasetCardData

    categories = sorted({cat for tag, cat in TASK_CATEGORIES.items() if stats.supported_tasks.get(tag)})
    features = datasets.DatasetInfo(features=rec.hf_features())._to_yaml_dict()["features"]
    languages = sorted(k for k in stats.languages if k != UNKNOWN)
    name = pretty_name or _dataset_name(stats, summary)
    return DatasetCardData(
        pretty_name=name,
        license=card_license(stats),
        language=languages or None,
        task_categories=categories,
        size_categories=[size_category(stats.rows)],
        tags=["audio", "speech", "empathetic-dialogue", "spoken-dialogue", "paralinguistics", "echat", "osum-echat"],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES}]}],
        dataset_info={
            "features": features,
            "splits": [{"name": "train", "num_examples": stats.rows}],
            "download_size": stats.shard_bytes,
        },
    )


def _dataset_name(stats: CorpusStats, summary) -> str:
    sources = [k for k in stats.seconds_by["source"] if k != UNKNOWN]
    base = sources[0] if len(sources) == 1 else "echat-forge corpus"
    return f"{base} (EChat-style empathetic spoken dialogue)"


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 360 else f"{seconds / 60:.1f} min"


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


PRODUCED_BY = [
    ("transcript", "transcript_origin"), ("language", "language_origin"),
    *((label, f"{label}_model") for label in LABELS),
    ("reply_text, think_tags, think_text, reply_emotion", "llm_model"), ("prompt", "prompt_version"),
    ("reply_audio", "tts_model"), ("reply_speech_tokens", "speech_tokenizer_model"),
]


def card_body(stats: CorpusStats, summary: dict[str, Any] | None, name: str) -> str:
    s = summary or {}
    total_replies = sum(stats.replies.values())
    parts = [f"# {name}", ""]
    parts.append(
        "Empathetic spoken-dialogue data in the style of EChat-200K (the corpus behind OSUM-EChat): each row is a user's "
        "spoken turn with its transcript and paralinguistic labels (gender, age, emotion, vocal events, style, each with "
        "its score and the model that produced it), acoustic metrics, an empathetic reply with a reasoning trace in both "
        "forms (tag form and natural language), the reply emotion and the reply's synthesized speech. Built with "
        "echat-forge (`echat build`).")
    parts += ["", "```python", "import datasets", 'ds = datasets.load_dataset("path/or/hub-id", split="train")',
              'ds[0]["audio"]  # decoded at 16 kHz', "```", ""]
    parts += ["## How it was built", ""]
    parts.append(f"- Profile: `{s.get('profile', '?')}` (runner {s.get('runner', '?')}), input `{corpus.input_name(s) or '?'}`, "
                 f"built {s.get('started_at', '?')}, pipeline {_top(stats, 'pipeline_version')}, schema {_top(stats, 'schema_version') or rec.SCHEMA_VERSION}.")
    inputs, outputs, rejects = s.get("inputs") or {}, s.get("outputs") or {}, s.get("rejects") or {}
    if inputs:
        parts.append(f"- {inputs.get('sources', '?')} input files ({_hours(float(inputs.get('audio_hours', 0)) * 3600)}) -> "
                     f"{outputs.get('rows', stats.rows)} rows; {rejects.get('total', 0)} rejected "
                     f"({', '.join(f'{k}: {v}' for k, v in (rejects.get('by_stage_reason') or {}).items()) or 'none'}).")
    parts += ["", "Models and prompt versions per field (rows):", ""]
    rows = []
    for fields, column in PRODUCED_BY:
        counts = stats.provenance.get(column, Counter())
        values = ", ".join(f"`{v}` ({n})" for v, n in counts.most_common() if v != UNKNOWN) or "none"
        rows.append([fields, column, values])
    parts += [_md_table(["field(s)", "provenance column", "producers"], rows), ""]
    parts += ["Label provenance (share of rows whose label came from each source; `unknown`: no label):", ""]
    rows = []
    for label in LABELS:
        share = stats.label_share(label)
        rows.append([label, *(_pct(share.get(k, 0.0)) for k in (MANIFEST, MODEL, HEURISTIC, UNKNOWN))])
    parts += [_md_table(["label", MANIFEST, MODEL, HEURISTIC, "unknown"], rows), ""]

    parts += ["## Statistics", ""]
    parts.append(_md_table(["", "value"], [
        ["rows", f"{stats.rows:,}"], ["shards", f"{stats.shards} ({stats.shard_bytes / 1e6:.1f} MB)"],
        ["user audio", _hours(stats.seconds)], ["reply audio", _hours(stats.reply_seconds)],
        ["languages", ", ".join(f"{k} ({v})" for k, v in stats.languages.most_common())],
        ["audio by kind", ", ".join(f"{k} ({_hours(v)})" for k, v in stats.seconds_by["kind"].most_common())],
        ["speakers", len(stats.speakers)], ["multi-turn rows", stats.multi_turn],
        ["distinct replies", f"{len(stats.replies)} of {total_replies}"],
        ["reply distinct-1 / distinct-2", f"{_f3(stats.reply_diversity.distinct1)} / {_f3(stats.reply_diversity.distinct2)}"],
    ]))
    parts += ["", "Label distributions:", ""]
    rows = [[label, ", ".join(f"{v} ({n})" for v, n in stats.labels.get(label, Counter()).most_common())]
            for label in (*LABELS, "reply_emotion")]
    parts += [_md_table(["label", "values (rows)"], rows), ""]
    parts += ["OSUM tasks the rows support (schemas/tasks.py):", ""]
    parts += [_md_table(["task", "rows"], [[f"`{t}`", n] for t, n in stats.supported_tasks.most_common()]), ""]

    parts += ["## Fields", ""]
    parts += [_md_table(["field", "type", "description"], [[f"`{f.name}`", f.kind, _field_doc(f)] for f in rec.FIELDS]), ""]

    parts += ["## Known limitations", ""]
    parts += [f"- {line}" for line in limitations(stats)]
    parts += ["", "## Citation", "", "The data follows the conventions of OSUM-EChat:", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(parts)


def _f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _top(stats: CorpusStats, column: str) -> str | None:
    counts = stats.provenance.get(column)
    return str(counts.most_common(1)[0][0]) if counts else None


def _field_doc(f: rec.Field) -> str:
    doc = f.description
    if f.allowed:
        doc += " One of: " + ", ".join(f"`{v}`" for v in f.allowed) + "."
    if f.min is not None or f.max is not None:
        doc += f" Range [{f.min if f.min is not None else '-inf'}, {f.max if f.max is not None else 'inf'}]."
    if not f.nullable:
        doc += " Required."
    return doc


def limitations(stats: CorpusStats) -> list[str]:
    lines = []
    llm = stats.provenance.get("llm_model", Counter())
    if any(str(m).startswith("template") for m in llm):
        lines.append(f"Replies and reasoning come from the offline template engine: {len(stats.replies)} distinct replies of "
                     f"{sum(stats.replies.values())}, reply distinct-2 {_f3(stats.reply_diversity.distinct2)}; they repeat "
                     "phrasings and are meant for trying the pipeline, not for training a model that should generalise.")
    tts = stats.provenance.get("tts_model", Counter())
    if any(str(m).startswith("espeak") for m in tts):
        lines.append("Reply speech is espeak-ng (formant synthesis): intelligible but robotic; emotion is only prosody.")
    for label in LABELS:
        share = stats.label_share(label)
        if share.get(HEURISTIC, 0) > 0:
            lines.append(f"{_pct(share[HEURISTIC])} of `{label}` labels are heuristic (low-confidence estimates); "
                         f"see `{label}_score` and `{label}_model`.")
        if share.get(UNKNOWN, 0) >= 0.5:
            lines.append(f"`{label}` is unknown for {_pct(share[UNKNOWN])} of rows (written as `<&&>` in the tag-form reasoning).")
    if not stats.with_speech_tokens:
        lines.append("No reply speech tokens (`reply_speech_tokens` is empty): speech-output training needs the CosyVoice "
                     "tokenizer run over `reply_audio` first.")
    kinds = stats.seconds_by["kind"]
    if not stats.has_source_kind:
        lines.append("The rows do not say whether a user turn is real or synthetic speech (no `source_kind`): counted as real.")
    elif kinds.get("synthetic"):
        lines.append(f"{_hours(kinds['synthetic'])} of user turns are synthetic (TTS) speech, labelled by construction.")
    if sum(1 for (q, r), n in stats.language_pairs.items() if q != r):
        lines.append("Some replies are not in the language of the user's turn (see the quality report).")
    lines.append("Labels, transcripts and replies are machine-made or taken from the source manifest without review.")
    return lines


def write_card(out_dir: str | Path, *, pretty_name: str | None = None) -> Path:
    """Write OUT/README.md; returns its path."""
    from huggingface_hub import DatasetCard

    out = Path(out_dir)
    stats = collect(out, samples=0)
    summary = corpus.read_summary(out)
    data = card_data(stats, summary, pretty_name)
    content = f"---\n{data.to_yaml()}\n---\n\n{card_body(stats, summary, data.pretty_name)}"
    card = DatasetCard(content)
    path = out / CARD
    card.save(path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="a build folder (the --output of `echat build`)")
    parser.add_argument("--pretty-name", help="the dataset's display name on the Hub")


def run(args: argparse.Namespace) -> int:
    try:
        path = write_card(args.out, pretty_name=args.pretty_name)
    except corpus.CorpusError as exc:
        print(f"echat card: {exc}", file=sys.stderr)
        return 2
    print(f"echat card: {path}")
    return 0
