"""`echat demo-data OUT_DIR`: synthesize a small demo corpus with espeak-ng.

The corpus gives the pipeline something real to chew on without a download: short user turns in
English and Mandarin whose words carry their emotion (so the reply engine has something to answer),
spoken with a prosody that fits it, by male and female voices. Some turns have a cough-like burst
of filtered noise (labelled `events: ["cough"]`), some a silent gap of 1-2 s in the middle (so VAD
has work), a few are several sentences long. Most files are 16-bit WAV at espeak-ng's rate
(22,050 Hz), some FLAC and one or two stereo 44.1 kHz WAV, so decoding and resampling are
exercised. `OUT_DIR/manifest.jsonl` has one line per file: path (relative to the manifest),
text, language, speaker, gender, emotion, events, style. The same seed gives the same corpus.

A split by voice: `--voices a,b` has only those voices speak, `--hold-out-voices a,b` every voice
but those. Every split reads the same lines, so a corpus built with `--hold-out-voices X` and one
built with `--voices X` share sentences but not speakers (a test set of unseen voices; the
learning recipe, model/recipe.py, uses it).

The lines, voices and per-emotion prosody are data: synth/demo_lines.yaml.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from echat.schemas import vocab

from echat.schemas.audio import resample

from .espeak_tts import Prosody, speakable_text, synthesize

DEFAULT_COUNT = 40
LINES_FILE = "demo_lines.yaml"
STYLE = "daily conversation"

# Which utterance gets what, by its index: spread so that any handful of utterances already has a
# cough, a gap, both languages and both genders.
ZH_EVERY = 4  # i % 4 == 3: Mandarin (a quarter of the corpus)
COUGH_EVERY = 6  # i % 6 == 2: a cough burst (one in six)
GAP_EVERY = 5  # i % 5 == 1: a silent gap in the middle
STEREO_EVERY = 20  # i % 20 == 7: stereo 44.1 kHz WAV (two in the default 40)
FLAC_EVERY = 8  # i % 8 == 5: FLAC

PAD_S = 0.3  # silence before and after the speech
NOISE_FLOOR_RMS = 0.001  # about -60 dBFS, so silence is not digital zero
PEAK = 0.9


class DemoDataError(ValueError):
    pass


@dataclass(frozen=True)
class Line:
    text: str
    language: str
    emotion: str


@dataclass(frozen=True)
class Voice:
    voice: str
    gender: str


@dataclass
class DemoSpec:
    voices: dict[str, list[Voice]]
    prosody: dict[str, Prosody]
    lines: dict[str, list[Line]]


@dataclass
class Utterance:
    index: int
    line: Line
    voice: Voice
    cough: bool
    gap_s: float | None
    container: str  # "wav", "flac" or "wav-stereo"
    cough_at_start: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        suffix = "flac" if self.container == "flac" else "wav"
        return f"demo_{self.index:04d}_{self.line.language}_{self.line.emotion}.{suffix}"


def load_spec(path: str | Path | None = None) -> DemoSpec:
    """Read and check demo_lines.yaml (the packaged one when `path` is None)."""
    if path:
        text, where = Path(path).read_text("utf-8"), str(path)
    else:
        text, where = resources.files("echat.synth").joinpath(LINES_FILE).read_text("utf-8"), LINES_FILE
    data = yaml.safe_load(text) or {}
    voices: dict[str, list[Voice]] = {}
    lines: dict[str, list[Line]] = {}
    for language in vocab.LANGUAGES:
        try:
            voices[language] = [Voice(str(v["voice"]), str(v["gender"])) for v in data["voices"][language]]
            lines[language] = [Line(str(l["text"]).strip(), language, str(l["emotion"])) for l in data["lines"][language]]
        except (KeyError, TypeError) as exc:
            raise DemoDataError(f"{where}: voices and lines need an entry for {language!r} ({exc})") from exc
        if not voices[language] or not lines[language]:
            raise DemoDataError(f"{where}: no voices or no lines for {language!r}")
        for v in voices[language]:
            if v.gender not in vocab.GENDERS:
                raise DemoDataError(f"{where}: voice {v.voice} has gender {v.gender!r}, not one of {vocab.GENDERS}")
        for l in lines[language]:
            if not l.text:
                raise DemoDataError(f"{where}: an empty {language} line")
            if l.emotion not in vocab.EMOTIONS:
                raise DemoDataError(f"{where}: line {l.text!r} has emotion {l.emotion!r}, not one of {vocab.EMOTIONS}")
    prosody = {emotion: Prosody(**values) for emotion, values in (data.get("prosody") or {}).items()}
    used = {l.emotion for ls in lines.values() for l in ls}
    missing = sorted(used - set(prosody))
    if missing:
        raise DemoDataError(f"{where}: no prosody for emotion(s) {missing}")
    return DemoSpec(voices=voices, prosody=prosody, lines=lines)


def select_voices(spec: DemoSpec, voices: list[str] | None = None, hold_out: list[str] | None = None) -> DemoSpec:
    """The spec with only `voices` (or every voice but `hold_out`) left to speak; the lines stay.

    A name that is no voice of the spec, or a language left without a voice, is a DemoDataError
    naming it. The voices keep their order in the spec (which alternates genders).
    """
    if voices is not None and hold_out is not None:
        raise DemoDataError("give --voices or --hold-out-voices, not both")
    names = voices if voices is not None else hold_out
    if names is None:
        return spec
    known = [v.voice for vs in spec.voices.values() for v in vs]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise DemoDataError(f"unknown voice(s) {', '.join(unknown)}; the voices are {', '.join(known)}")
    if not names:
        raise DemoDataError("name at least one voice")
    chosen = set(names)
    keep = (lambda v: v.voice in chosen) if voices is not None else (lambda v: v.voice not in chosen)
    kept = {language: [v for v in vs if keep(v)] for language, vs in spec.voices.items()}
    empty = [language for language, vs in kept.items() if not vs]
    if empty:
        raise DemoDataError(f"no {' or '.join(empty)} voice left to speak (every language needs one): "
                            f"keep one of {', '.join(v.voice for l in empty for v in spec.voices[l])}")
    return DemoSpec(voices=kept, prosody=spec.prosody, lines=spec.lines)


def _emotion_interleaved(lines: list[Line], rng: random.Random) -> list[Line]:
    """The lines shuffled within each emotion, then dealt one emotion at a time, so the first
    few utterances already cover several emotions."""
    by_emotion: dict[str, list[Line]] = {}
    for line in lines:
        by_emotion.setdefault(line.emotion, []).append(line)
    emotions = sorted(by_emotion)
    rng.shuffle(emotions)
    for group in by_emotion.values():
        rng.shuffle(group)
    order: list[Line] = []
    while any(by_emotion.values()):
        for emotion in emotions:
            if by_emotion[emotion]:
                order.append(by_emotion[emotion].pop())
    return order


def plan_corpus(spec: DemoSpec, n: int, seed: int) -> list[Utterance]:
    """Decide every utterance (line, voice, cough, gap, container) before synthesizing any."""
    rng = random.Random(seed)
    queues = {language: _emotion_interleaved(spec.lines[language], rng) for language in vocab.LANGUAGES}
    voice_offset = {language: rng.randrange(len(spec.voices[language])) for language in vocab.LANGUAGES}
    taken = Counter()
    plan = []
    for i in range(n):
        language = "zh" if i % ZH_EVERY == ZH_EVERY - 1 else "en"
        k = taken[language]
        taken[language] += 1
        line = queues[language][k % len(queues[language])]  # lines repeat (other voice) past the list
        voices = spec.voices[language]
        # Voices are listed alternating genders; stepping one voice per utterance keeps both.
        voice = voices[(voice_offset[language] + k) % len(voices)]
        item_rng = random.Random(f"{seed}:{i}")
        container = "wav-stereo" if i % STEREO_EVERY == 7 else "flac" if i % FLAC_EVERY == 5 else "wav"
        gap = round(item_rng.uniform(1.0, 2.0), 2) if i % GAP_EVERY == 1 else None
        plan.append(
            Utterance(
                index=i, line=line, voice=voice, cough=i % COUGH_EVERY == 2, gap_s=gap,
                container=container, cough_at_start=item_rng.random() < 0.5,
            )
        )
    return plan


def split_for_gap(text: str, language: str) -> tuple[str, str] | None:
    """Two halves of `text` cut at the clause boundary nearest its middle (at a word when it has
    no inner punctuation); None when it is too short to cut."""
    end = len(text.rstrip(" .!?。！？"))
    cuts = [m.end() for m in re.finditer(r"[,.!?;:，。！？；：、]", text) if 0 < m.end() < end]
    if not cuts:
        if language == "zh":
            cuts = [len(text) // 2] if len(text) >= 6 else []
        else:
            spaces = [m.start() for m in re.finditer(r" ", text)]
            cuts = spaces if len(spaces) >= 3 else []
    if not cuts:
        return None
    middle = len(text) / 2
    cut = min(cuts, key=lambda c: abs(c - middle))
    first, second = text[:cut].strip(), text[cut:].strip()
    return (first, second) if first and second else None


def cough_burst(rate: int, rng: np.random.Generator) -> np.ndarray:
    """A cough-like sound: two bursts of band-passed noise with a sharp attack and fast decay."""
    from scipy.signal import butter, sosfilt

    sos = butter(4, [250, 3000], btype="bandpass", fs=rate, output="sos")
    parts = []
    for strength in (1.0, rng.uniform(0.55, 0.8)):
        length = int(rate * rng.uniform(0.18, 0.3))
        t = np.arange(length) / rate
        envelope = np.minimum(t / 0.012, 1.0) * np.exp(-t / rng.uniform(0.05, 0.08))
        burst = sosfilt(sos, rng.standard_normal(length)) * envelope
        parts += [strength * burst / (np.abs(burst).max() + 1e-9), np.zeros(int(rate * rng.uniform(0.08, 0.15)))]
    return np.concatenate(parts).astype(np.float32)


def render(utt: Utterance, spec: DemoSpec, seed: int) -> tuple[np.ndarray, int]:
    """The utterance's mono waveform at espeak-ng's rate."""
    line = utt.line
    prosody = spec.prosody[line.emotion]
    rng = np.random.default_rng([seed, utt.index])

    def speak(text: str) -> tuple[np.ndarray, int]:
        return synthesize(speakable_text(text, line.language), utt.voice.voice, prosody)

    halves = split_for_gap(line.text, line.language) if utt.gap_s else None
    if halves:
        (a, rate), (b, rate_b) = speak(halves[0]), speak(halves[1])
        assert rate == rate_b
        speech = np.concatenate([a, np.zeros(int(rate * utt.gap_s), np.float32), b])
        utt.extra["gap_s"] = utt.gap_s
    else:
        speech, rate = speak(line.text)
    speech = speech / (np.abs(speech).max() + 1e-9) * 0.8
    pieces = [speech]
    if utt.cough:
        cough = cough_burst(rate, rng) * rng.uniform(0.5, 0.8)
        pause = np.zeros(int(rate * 0.25), np.float32)
        pieces = [cough, pause, speech] if utt.cough_at_start else [speech, pause, cough]
    pad = np.zeros(int(rate * PAD_S), np.float32)
    audio = np.concatenate([pad, *pieces, pad])
    audio = audio + rng.normal(0.0, NOISE_FLOOR_RMS, audio.size)
    audio = audio / max(np.abs(audio).max() / PEAK, 1.0)
    return audio.astype(np.float32), rate


def write_audio(path: Path, audio: np.ndarray, rate: int, container: str) -> tuple[int, int]:
    """Write 16-bit PCM; returns (sampling rate, channels) as written."""
    import soundfile as sf

    if container == "wav-stereo":
        stereo_rate = 44_100
        mono = resample(audio, rate, stereo_rate)
        # Slightly different channels, so a decoder that keeps only one would still be caught.
        stereo = np.stack([mono, 0.85 * mono], axis=1)
        sf.write(str(path), stereo, stereo_rate, subtype="PCM_16", format="WAV")
        return stereo_rate, 2
    sf.write(str(path), audio, rate, subtype="PCM_16", format="FLAC" if container == "flac" else "WAV")
    return rate, 1


def make_demo_corpus(
    out_dir: str | Path, n: int = DEFAULT_COUNT, seed: int = 0, overwrite: bool = False, lines_file: str | None = None,
    voices: list[str] | None = None, hold_out_voices: list[str] | None = None,
) -> dict[str, Any]:
    """Write `n` utterances under `out_dir/audio/` and `out_dir/manifest.jsonl`; returns a summary.

    voices / hold_out_voices: the voice split (`select_voices`)."""
    if n < 1:
        raise DemoDataError(f"--n must be at least 1, got {n}")
    out = Path(out_dir)
    manifest_path = out / "manifest.jsonl"
    audio_dir = out / "audio"
    if manifest_path.exists() and not overwrite:
        raise DemoDataError(f"{manifest_path} already exists; pass --overwrite to replace the demo corpus there")
    spec = select_voices(load_spec(lines_file), voices, hold_out_voices)
    plan = plan_corpus(spec, n, seed)
    audio_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:  # remove only what an earlier run of this command wrote
        for old in list(audio_dir.glob("demo_*.wav")) + list(audio_dir.glob("demo_*.flac")):
            old.unlink()

    rows, seconds = [], 0.0
    for utt in plan:
        audio, rate = render(utt, spec, seed)
        path = audio_dir / utt.filename
        written_rate, channels = write_audio(path, audio, rate, utt.container)
        seconds += audio.size / rate
        rows.append({
            "path": path.relative_to(out).as_posix(),
            "text": utt.line.text,
            "language": utt.line.language,
            "speaker": utt.voice.voice,
            "gender": utt.voice.gender,
            "emotion": utt.line.emotion,
            "events": ["cough"] if utt.cough else [],
            "style": STYLE,
        })
        utt.extra.update(rate=written_rate, channels=channels)
    tmp = manifest_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(manifest_path)

    return {
        "out_dir": str(out),
        "manifest": str(manifest_path),
        "count": len(rows),
        "seconds": round(seconds, 1),
        "languages": dict(Counter(r["language"] for r in rows)),
        "genders": dict(Counter(r["gender"] for r in rows)),
        "emotions": dict(Counter(r["emotion"] for r in rows)),
        "speakers": dict(Counter(r["speaker"] for r in rows)),
        "coughs": sum(1 for u in plan if u.cough),
        "gaps": sum(1 for u in plan if "gap_s" in u.extra),
        "containers": dict(Counter(u.container for u in plan)),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write audio/ and manifest.jsonl into")
    parser.add_argument("--n", type=int, default=DEFAULT_COUNT, help=f"number of utterances (default {DEFAULT_COUNT})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the choices; the same seed gives the same corpus")
    parser.add_argument("--overwrite", action="store_true", help="replace a demo corpus already in OUT_DIR")
    split = parser.add_mutually_exclusive_group()
    split.add_argument("--voices", type=_voice_list, metavar="V1,V2",
                       help="only these voices speak (comma-separated espeak-ng names of synth/demo_lines.yaml)")
    split.add_argument("--hold-out-voices", type=_voice_list, metavar="V1,V2",
                       help="every voice but these speaks (the same lines: a split by voice)")


def _voice_list(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one voice")
    return names


def run(args: argparse.Namespace) -> int:
    try:
        summary = make_demo_corpus(args.out_dir, n=args.n, seed=args.seed, overwrite=getattr(args, "overwrite", False),
                                   voices=getattr(args, "voices", None), hold_out_voices=getattr(args, "hold_out_voices", None))
    except DemoDataError as exc:
        print(f"echat demo-data: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # espeak-ng missing or failing (EspeakError)
        print(f"echat demo-data: {exc}", file=sys.stderr)
        return 1

    def counts(c: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items()))

    print(f"wrote {summary['count']} utterances ({summary['seconds']} s of audio) to {Path(summary['out_dir']) / 'audio'}")
    print(f"  manifest:  {summary['manifest']}")
    print(f"  languages: {counts(summary['languages'])}")
    print(f"  genders:   {counts(summary['genders'])}")
    print(f"  emotions:  {counts(summary['emotions'])}")
    print(f"  speakers:  {counts(summary['speakers'])}")
    print(f"  coughs {summary['coughs']}, silent gaps {summary['gaps']}; files: {counts(summary['containers'])}")
    return 0
