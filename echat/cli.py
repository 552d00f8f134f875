"""The `echat` command line: the one place that knows every folder.

Each command lives in a module of its folder that defines `add_arguments(parser)` and
`run(args) -> int`. Only the invoked command's module is imported, so `echat --help` is instant
and `echat build` never imports torch's training stack or the model package.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "quickstart": ("echat.pipelines.quickstart", "make the demo corpus and build it into shards (the README's first command)"),
    "demo-data": ("echat.synth.demo_corpus", "synthesize a small demo corpus with espeak-ng"),
    "synth-queries": ("echat.synth.queries", "synthetic user turns spoken for chosen cues (child, elderly, emotions, coughs...), as a manifest"),
    "build": ("echat.pipelines.build", "build EChat-style parquet shards from raw audio (Beam)"),
    "validate": ("echat.validation.validate", "check a build against the Great Expectations suites made from the schema"),
    "report": ("echat.validation.report", "write the quality report (HTML with plots) of a build"),
    "card": ("echat.validation.card", "write the Hugging Face dataset card (README.md) of a build"),
    "push": ("echat.validation.push", "upload a build's card, shards and report to the Hugging Face Hub"),
    "export": ("echat.pipelines.export_osum", "export a build for OSUM's own code: osum-raw (jsonl + wav) or wenet-shards (tar)"),
    "model-info": ("echat.model.info", "build a model config on the meta device and print parameter counts"),
    "train": ("echat.model.train", "train an OSUM-EChat model on shards (run under torchrun for DDP)"),
    "infer": ("echat.model.infer_cli", "run a trained model on audio files or a shard folder for any task tag"),
    "chat": ("echat.model.chat_cli", "empathetic chat with a trained model: reasoning, reply and speech tokens"),
    "eval": ("echat.model.evaluate", "score predictions: WER/CER for ASR, accuracy for label tasks"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="echat",
        description="echat-forge: build empathetic spoken-dialogue corpora and train OSUM-EChat models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items())
        + "\n\nRun `echat COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("command", nargs="?", choices=list(COMMANDS), metavar="COMMAND")
    return parser


def _version() -> str:
    from echat import __version__

    return f"echat-forge {__version__}"


_BEAM_IMPORT_NOISE = ("apitools not found", "google.cloud.bigquery_storage_v1")


def _quiet_beam_import_warning(record) -> bool:
    # apache_beam.io.gcp says on import that BigQuery's client libraries are missing; nothing of
    # ours uses BigQuery, and the message reads as an error on the README's first command.
    message = record.getMessage()
    return not any(noise in message for noise in _BEAM_IMPORT_NOISE)


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.getLogger().addFilter(_quiet_beam_import_warning)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        top = _top_parser()
        if not argv:
            top.print_help()
            return 2
        top.parse_args(argv[:1])  # prints help/version or an error naming the bad command
        return 2
    command, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[command][0])
    parser = argparse.ArgumentParser(prog=f"echat {command}", description=COMMANDS[command][1])
    module.add_arguments(parser)
    if getattr(module, "ACCEPTS_EXTRA_ARGS", False):
        # e.g. `echat build` passes unknown flags through as Beam pipeline options.
        args, args.extra_args = parser.parse_known_args(rest)
    else:
        args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
