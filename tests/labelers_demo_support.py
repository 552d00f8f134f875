"""The demo corpus (`echat demo-data`) made, decoded and cut by VAD once per test session, for the
labelers' accuracy tests. Imported as a module (`import labelers_demo_support as demo`); not a test
module itself.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

N_FILES = 120  # about 630 s of audio: every voice of the corpus at least 7 times
PROBE = "Hello, how are you today?"


@functools.lru_cache(maxsize=None)
def corpus(n: int = N_FILES) -> tuple[Path, tuple[dict[str, Any], ...]]:
    """(folder, manifest rows) of a demo corpus of `n` files, made once."""
    from echat.synth.demo_corpus import make_demo_corpus

    folder = Path(tempfile.mkdtemp(prefix="echat-demo-"))
    atexit.register(shutil.rmtree, folder, True)
    make_demo_corpus(folder, n=n)
    rows = tuple(json.loads(line) for line in (folder / "manifest.jsonl").read_text("utf-8").splitlines())
    return folder, rows


def truth(n: int = N_FILES) -> dict[str, dict[str, Any]]:
    """Manifest row by source_uri."""
    folder, rows = corpus(n)
    return {str(folder / row["path"]): row for row in rows}


@functools.lru_cache(maxsize=None)
def decoded(n: int = N_FILES) -> tuple[dict[str, Any], ...]:
    """The files decoded to 16 kHz mono, with the manifest's text and language (trusted, as a build
    that scores its labelers against the manifest takes them) and no labels."""
    from echat.labelers.decode import DecodeAudio
    from echat.schemas.stage_runner import run_stages

    folder, rows = corpus(n)
    records = [{"source_uri": str(folder / row["path"]), "source_dataset": "demo", "transcript": row["text"],
                "transcript_origin": "manifest", "language": row["language"], "language_origin": "manifest"}
               for row in rows]
    stage = DecodeAudio()
    stage.setup()
    outputs, rejects = run_stages([stage], records)
    assert not rejects, rejects
    return tuple(outputs)


@functools.lru_cache(maxsize=None)
def segments(n: int = N_FILES) -> tuple[dict[str, Any], ...]:
    """silero-vad segments of the decoded files (transcribed files stay whole), as the build cuts them."""
    from echat.labelers.vad import SileroVAD
    from echat.schemas.stage_runner import run_stages

    stage = SileroVAD()
    stage.setup()
    outputs, _ = run_stages([stage], list(decoded(n)))
    return tuple(outputs)


def espeak_bytes(voice: str) -> bytes:
    return subprocess.run(["espeak-ng", "-v", voice, "--stdout", PROBE], capture_output=True, check=True).stdout


def base_voice_gender(language: str) -> str | None:
    """The gender espeak-ng lists for a language's own voice (`espeak-ng --voices=LANG`)."""
    listing = subprocess.run(["espeak-ng", f"--voices={language}"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1] == language:
            return {"M": "male", "F": "female"}.get(fields[2].split("/")[-1])
    return None


def voices_not_as_labelled(rows) -> set[str]:
    """Voices of the manifest that do not sound as their gender says: espeak-ng ignored the variant
    (the audio is byte-identical to the language's own voice, `en-gb+f3` to `en-gb` in espeak-ng 1.51)
    and that voice is listed with the other gender. Their gender is not scored."""
    wrong = set()
    for voice, gender in {row["speaker"]: row["gender"] for row in rows}.items():
        base, _, variant = voice.partition("+")
        if variant and espeak_bytes(voice) == espeak_bytes(base) and base_voice_gender(base) not in (None, gender):
            wrong.add(voice)
    return wrong
