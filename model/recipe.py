"""The learning recipe (issue #12): proof that the training path learns, in one command.

    .venv/bin/python -m echat.model.recipe OUT

runs, through the ordinary `echat` commands (each printed before it runs):

1. `echat demo-data` twice, split by voice: OUT/train-corpus is spoken by every voice but the
   held-out ones (`--hold-out-voices`), OUT/test-corpus by the held-out ones alone (`--voices`,
   another seed). Both read the same lines, so the test set holds seen sentences in unseen voices.
2. `echat build --profile local` of each (manifest labels trusted) -> OUT/train-build, OUT/test-build.
3. `echat train --config tiny-learning` on OUT/train-build -> OUT/run; and the same config for
   one step at a learning rate of 1e-12 -> OUT/untrained, a checkpoint of the very weights the
   trained run started from (same seed; `echat train` saves no step-0 checkpoint).
4. `echat infer --shards OUT/test-build` for <GENDER> and <EMOTION>, then for <TRANSCRIBE>, with
   each checkpoint; the two predictions files of a checkpoint are joined and scored by `echat eval`.
5. The figures against their targets: gender accuracy on unseen voices >= 0.90, emotion accuracy
   above the majority class of the test references, WER (English) and CER (Mandarin) of the
   trained model below those of the untrained one. Written to OUT/figures.json; the exit status
   is 0 only when every target is met.

OUT belongs to the recipe: a rerun replaces the corpora, builds, OUT/run and OUT/untrained there.
`--train-n`, `--test-n`, `--set KEY=VALUE` (training-config overrides, e.g. run.max_steps) scale it
down; the test suite runs it with a handful of utterances and a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One male and one female voice per language of synth/demo_lines.yaml that training never hears.
HELD_OUT_VOICES = ("en-us+m1", "en-us+f4", "cmn-latn-pinyin+m1", "cmn-latn-pinyin+f4")
TRAIN_CONFIG = "tiny-learning"
LABEL_TASKS = ("<GENDER>", "<EMOTION>")
ASR_TASKS = ("<TRANSCRIBE>",)
TASKS = LABEL_TASKS + ASR_TASKS
GENDER_TARGET = 0.90
TRAIN_SEED, TEST_SEED = 0, 1  # another seed for the test corpus: other coughs, gaps and line order
UNTRAINED_LR = "1.0e-12"  # one step at this rate leaves the initial weights (changes of ~1e-12)
# Decoding budgets (tiny tokenizer): a label such as <SURPRISE> is 9 tokens, the longest demo
# transcript under 50; <|im_end|> ends a trained model's answer well before them.
LABEL_MAX_TOKENS = 12
ASR_MAX_TOKENS = 80


class RecipeError(RuntimeError):
    """A step of the recipe failed; the message names the command."""


# ----------------------------------------------------------------------------- figures


@dataclass
class Figure:
    name: str
    value: float | None
    target: str  # how the value is judged, in words
    met: bool


def _metric(report: dict[str, Any], task: str, name: str) -> dict[str, Any] | None:
    return ((report.get("tasks") or {}).get(task) or {}).get("metrics", {}).get(name)


def majority_share(metric: dict[str, Any]) -> tuple[str | None, float]:
    """(the most common reference class, its share of the scored rows) of a label metric."""
    support = {label: c["support"] for label, c in (metric.get("per_class") or {}).items() if c.get("support")}
    scored = metric.get("scored") or 0
    if not support or not scored:
        return None, 0.0
    label = max(support, key=support.get)
    return label, support[label] / scored


def figures(trained: dict[str, Any], untrained: dict[str, Any]) -> list[Figure]:
    """The recipe's figures from the `echat eval` reports of the trained and untrained model."""
    out: list[Figure] = []
    gender = _metric(trained, "<GENDER>", "gender")
    value = gender["accuracy"] if gender else None
    out.append(Figure("gender accuracy (unseen voices)", value, f">= {GENDER_TARGET:.2f}",
                      value is not None and value >= GENDER_TARGET))
    emotion = _metric(trained, "<EMOTION>", "emotion")
    if emotion:
        label, share = majority_share(emotion)
        out.append(Figure("emotion accuracy", emotion["accuracy"], f"> majority class {label} {share:.4f}",
                          emotion["accuracy"] is not None and emotion["accuracy"] > share))
    else:
        out.append(Figure("emotion accuracy", None, "> majority class", False))
    for lang, kind in (("en", "wer"), ("zh", "cer")):
        after = _metric(trained, "<TRANSCRIBE>", f"transcript_{lang}")
        before = _metric(untrained, "<TRANSCRIBE>", f"transcript_{lang}")
        if after is None and before is None:
            continue  # no test utterance of this language
        a = after[kind] if after else None
        b = before[kind] if before else None
        out.append(Figure(f"{kind.upper()} {lang} trained", a, f"< untrained {b:.4f}" if b is not None else "< untrained",
                          a is not None and b is not None and a < b))
    return out


def format_figures(rows: list[Figure]) -> str:
    lines = [f"{'figure':<34} {'value':>8}  {'target':<34} met"]
    for f in rows:
        value = "-" if f.value is None else f"{f.value:.4f}"
        lines.append(f"{f.name:<34} {value:>8}  {f.target:<34} {'yes' if f.met else 'NO'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the steps


def _echat(*args: str) -> list[str]:
    return [sys.executable, "-m", "echat.cli", *args]


def command_env() -> dict[str, str]:
    """The environment of every step: one torch thread unless the caller chose otherwise. On the
    2-core CPU the recipe was measured on, the data worker takes the other core, and two torch
    threads fighting other processes for the cores made training ten times slower."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _run(cmd: list[str], log: Path, timings: dict[str, float], label: str) -> None:
    shown = " ".join(shlex.quote(c) for c in ["echat", *cmd[3:]])
    print(f"$ {shown}", flush=True)
    started = time.perf_counter()
    with log.open("a", encoding="utf-8") as fh:
        fh.write(f"\n$ {shown}\n")
        fh.flush()
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=command_env())
    timings[label] = round(time.perf_counter() - started, 1)
    print(f"  ({timings[label]} s)", flush=True)
    if done.returncode != 0:
        raise RecipeError(f"`{shown}` failed with exit status {done.returncode}; its output is in {log}")


def run_recipe(out: Path, *, train_n: int, test_n: int, overrides: list[str], held_out: tuple[str, ...] = HELD_OUT_VOICES,
               config: str = TRAIN_CONFIG) -> dict[str, Any]:
    from echat.model.train_config import TrainConfigError, load_train_config

    sets = [f"data.train=[{out / 'train-build'}]", *overrides]
    try:  # a mistyped config or override fails now, not after the corpora are built
        load_train_config(config, sets)
    except TrainConfigError as err:
        raise RecipeError(f"training config {config}: {err}") from None
    out.mkdir(parents=True, exist_ok=True)
    log = out / "recipe.log"
    log.write_text("", encoding="utf-8")
    timings: dict[str, float] = {}
    voices = ",".join(held_out)
    for split, n, seed, flag in (("train", train_n, TRAIN_SEED, "--hold-out-voices"), ("test", test_n, TEST_SEED, "--voices")):
        _run(_echat("demo-data", str(out / f"{split}-corpus"), "--n", str(n), "--seed", str(seed), flag, voices, "--overwrite"),
             log, timings, f"demo-data {split}")
    for split in ("train", "test"):
        _run(_echat("build", "--profile", "local", "--input", str(out / f"{split}-corpus" / "manifest.jsonl"),
                    "--output", str(out / f"{split}-build"), "--overwrite"), log, timings, f"build {split}")
    train_args = ["train", "--config", config, *(a for s in sets for a in ("--set", s))]
    for name in ("run", "untrained"):
        if (out / name).exists():  # a fresh run each time: `echat train` refuses a folder with checkpoints
            shutil.rmtree(out / name)
    _run(_echat(*train_args, "--out", str(out / "run")), log, timings, "train")
    _run(_echat(*train_args, "--set", "run.max_steps=1", "--set", "optim.warmup_steps=0", "--set", f"optim.lr={UNTRAINED_LR}",
                "--out", str(out / "untrained")), log, timings, "untrained checkpoint")
    reports = {}
    for name in ("run", "untrained"):
        preds = out / f"predictions-{name}.jsonl"
        parts = []
        # Labels and transcripts decode apart, each with a budget that fits its longest target:
        # an untrained model never writes <|im_end|>, so the budget is what its inference costs.
        for part, part_tasks, budget in (("labels", LABEL_TASKS, LABEL_MAX_TOKENS), ("asr", ASR_TASKS, ASR_MAX_TOKENS)):
            part_preds = out / f"predictions-{name}-{part}.jsonl"
            task_args = [a for t in part_tasks for a in ("--task", t)]
            _run(_echat("infer", "--checkpoint", str(out / name), *task_args, "--shards", str(out / "test-build"),
                        "--output", str(part_preds), "--device", "cpu", "--max-text-tokens", str(budget)),
                 log, timings, f"infer {name} {part}")
            parts.append(part_preds.read_text(encoding="utf-8"))
        preds.write_text("".join(parts), encoding="utf-8")
        report = out / f"predictions-{name}.eval.json"
        _run(_echat("eval", "--predictions", str(preds), "--report", str(report)), log, timings, f"eval {name}")
        reports[name] = json.loads(report.read_text(encoding="utf-8"))
    rows = figures(reports["run"], reports["untrained"])
    result = {
        "figures": [f.__dict__ for f in rows],
        "all_met": all(f.met for f in rows),
        "wall_s": timings,
        "held_out_voices": list(held_out),
        "train_n": train_n,
        "test_n": test_n,
        "overrides": overrides,
    }
    (out / "figures.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print()
    print(format_figures(rows))
    print(f"train wall time {timings['train']} s; figures: {out / 'figures.json'}; every command's output: {log}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m echat.model.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", metavar="OUT", help="folder for the corpora, builds, checkpoints and predictions")
    parser.add_argument("--train-n", type=int, default=480, help="utterances in the training corpus (default 480)")
    parser.add_argument("--test-n", type=int, default=120, help="utterances in the held-out-voice test corpus (default 120)")
    parser.add_argument("--config", default=TRAIN_CONFIG, help=f"training config (default {TRAIN_CONFIG})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a training-config value, e.g. --set run.max_steps=20 (repeatable)")
    args = parser.parse_args(argv)
    if args.train_n < 1 or args.test_n < 1:
        parser.error("--train-n and --test-n must be at least 1")
    try:
        result = run_recipe(Path(args.out), train_n=args.train_n, test_n=args.test_n, overrides=args.overrides, config=args.config)
    except RecipeError as err:
        print(f"recipe: {err}", file=sys.stderr)
        return 2
    return 0 if result["all_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
