"""`echat quickstart [OUT]`: the README's first command.

Synthesizes the demo corpus (espeak-ng) into OUT/demo-corpus, builds it on the offline profile
into OUT/build, validates it, writes the quality report, and says where the shards, the rejects,
the summary and the report are. The manifest's
transcripts are used; its labels are the reference the labelers are scored against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ACCEPTS_EXTRA_ARGS = True
QUICKSTART_TRUST = "trust_manifest=[transcript, language]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", nargs="?", default="demo-out", help="folder for the demo corpus and the build (default: demo-out)")
    parser.add_argument("--n", type=int, default=48, help="number of demo utterances (default: 48)")
    parser.add_argument("--profile", default="local")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.epilog = "Other --flags are passed to Beam as pipeline options."


def run(args: argparse.Namespace) -> int:
    import logging

    from echat.synth.demo_corpus import DemoDataError, make_demo_corpus
    from echat.synth.espeak_tts import EspeakError

    from .build import build, print_report, validate_output
    from .profile import ProfileError, load_profile

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    out = Path(args.out)
    # The demo's transcripts and languages are given; its labels are made by the labelers and
    # scored against the manifest's ground truth (the summary's label accuracy table).
    overrides = [QUICKSTART_TRUST, *args.overrides]
    try:
        profile = load_profile(args.profile, overrides)
    except ProfileError as exc:
        print(f"echat quickstart: {exc}", file=sys.stderr)
        return 2
    corpus = out / "demo-corpus"
    try:
        make_demo_corpus(corpus, n=args.n, overwrite=True)
    except (DemoDataError, EspeakError) as exc:
        print(f"echat quickstart: {exc}", file=sys.stderr)
        return 2
    manifest = corpus / "manifest.jsonl"
    print(f"demo corpus: {args.n} utterances, manifest {manifest}")
    try:
        summary = build(profile, str(manifest), str(out / "build"), beam_args=getattr(args, "extra_args", []), overwrite=True,
                        show_progress=True)
    except ValueError as exc:  # e.g. an unknown Beam option
        print(f"echat quickstart: {exc}", file=sys.stderr)
        return 2
    print_report(summary, str(out / "build"))
    validated = validate_output(str(out / "build"))
    from echat.validation.report import write_report

    page = write_report(out / "build")
    print(f"  report:  {page}  (open it in a browser; it needs no server)")
    return 0 if summary["reconciliation"]["ok"] and validated else 1
