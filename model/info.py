"""`echat model-info`: build a model config on the meta device and print its parameter counts.

No weights are read and nothing is downloaded: the architecture comes from the config's
`architecture` fields. Prints parameters per module, the total, and the trainable parameters of
each training stage (the config's `stages` rules; Whisper's fixed position table never trains).
"""

from __future__ import annotations

import argparse
import json
import sys

MODULE_LABELS = {
    "encoder": "encoder (Whisper)",
    "adapter": "adapter",
    "speech_bounds": "speech begin/end",
    "llm": "LLM",
    "lora": "LoRA",
    "speech_embed": "speech embedding",
    "speech_head": "speech head",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="model config: osum, osum-echat, tiny, or a YAML path")
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")


def format_table(info: dict) -> str:
    width = max(len(v) for v in MODULE_LABELS.values()) + 2
    lines = [f"model {info['name']}: {info['description']}".rstrip(": "),
             f"(built on the meta device in {info['build_seconds']:.2f} s, dtype {info['dtype']}, no weights loaded)",
             "", f"{'module':<{width}}{'parameters':>16}"]
    for group, count in info["parameters"].items():
        lines.append(f"{MODULE_LABELS[group]:<{width}}{count:>16,}")
    lines.append(f"{'total':<{width}}{info['total']:>16,}")
    lines += ["", f"{'stage':<{width}}{'trainable':>16}{'share':>9}"]
    for stage, count in info["trainable"].items():
        lines.append(f"{stage:<{width}}{count:>16,}{count / info['total']:>9.1%}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from echat.model.config import ModelConfigError

    try:
        from echat.model.osum import describe

        info = describe(args.config)
    except (ModelConfigError, ValueError) as exc:
        print(f"echat model-info: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    return 0
