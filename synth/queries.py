"""`echat synth-queries`: synthetic user turns spoken for chosen cues, as a corpus `echat build` reads.

EChat-200K is largely synthetic: user turns written for chosen paralinguistic cues (a child's or an
elderly voice, an emotion, a cough or a laugh), spoken with a voice that fits, with the labels known
by construction. This command makes such a corpus:
  1. plans (synth/query_plans.py, `--plan FILE`, default synth/query_plans.yaml): single-label plans
     (one cue each) and multi-label plans (several together), each with a share of `--n`, and the
     languages (en, zh) with theirs;
  2. text: from an LLM when one is configured (`--llm-model`/`--llm-base-url`, or the profile's
     reply slot when its backend is `openai`; synth/query_text.py: a prompt for a user turn fitting
     the cues and the language, cached, transient errors retried), else, and for any query the LLM
     gave nothing usable for, from the offline line bank (synth/query_lines.yaml);
  3. voice: espeak-ng (`--tts espeak`, the default) with a variant fitting the age and gender, the
     emotion's prosody (synth/demo_lines.yaml's table), an age's pitch, pace, formant shift and
     tremolo; or the profile's `tts` backend (`--tts profile`: openai or cosyvoice), its voice by
     the gender and a style instruction for the emotion and age (synth/templates/speech_styles.yaml);
  4. vocal events mixed in at natural places (before or after the sentence, or at a pause at a
     clause boundary) from synth/event_sounds.py: synthesised offline, or clips of
     `--event-bank DIR/<event>/*.wav`.
It writes DIR/audio/*.wav (16 kHz, 16-bit) and DIR/manifest.jsonl in the format `echat build`
reads (pipelines/sources.py): path, text, language, speaker, gender, age, emotion, events, style,
`source_kind: synthetic`, plus columns the build ignores and a person or a script may use (plan,
plan_kind, cues, voice, tts, text_source, events_at: where each event was mixed in, seconds). Then
  echat build --input DIR/manifest.jsonl --set "trust_manifest=[transcript, language]" --set vad.params.pad_s=1.5
takes the text and language as given and scores the labelers against the intended cues: the
build's summary.json `label_accuracy` table. The padding keeps an event before or after the speech
inside the VAD segment (silero-vad does not hear a cough or a sigh as speech, and would trim it
off; a query's events lie within 1.5 s of its speech). DIR/synth_summary.json counts what was made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from echat.schemas.audio import resample
from echat.schemas.record import SAMPLE_RATE

from .event_sounds import EventBank
from .espeak_tts import Prosody, speakable_text, synthesize
from .query_plans import PlanFile, allocate, load_plans

PAD_S = 0.25  # silence before and after each query
GAP_S = (0.1, 0.22)  # silence between an event and the speech next to it: short, so VAD keeps one segment
# The longest an event and its gap reach before or after the speech (the sigh, 1.2 s, is the longest
# offline sound). silero-vad does not count a cough or a sigh as speech, so a build keeps an event at
# the edge only with `--set vad.params.pad_s=` at least this (the command prints it).
EDGE_S = 1.5
MAX_EVENT_S = EDGE_S - GAP_S[1]
# What `echat build` needs to score the labelers against the intended cues and keep the events.
BUILD_OVERRIDES = ("trust_manifest=[transcript, language]", f"vad.params.pad_s={EDGE_S:g}")
SPEECH_PEAK = 0.8
PEAK = 0.95
NOISE_FLOOR_RMS = 0.001  # about -60 dBFS, so silence is not digital zero
TTS_CHOICES = ("espeak", "profile")


class QueryError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# voices


def emotion_prosody(spec: PlanFile) -> dict[str, Prosody]:
    """How each user emotion is spoken: the demo corpus's table, with the plan file's `prosody` on top."""
    from .demo_corpus import load_spec

    table = dict(load_spec().prosody)
    for emotion, values in spec.prosody.items():
        table[emotion] = Prosody(**{**(table.get(emotion, Prosody()).model_dump()), **values})
    return table


def query_prosody(spec: PlanFile, table: dict[str, Prosody], query: dict[str, Any]) -> Prosody:
    """The emotion's prosody changed by the age group (the formant shift's speed-up undone)."""
    base = table.get(query["emotion"]) or table["neutral"]
    age = spec.ages[query["age"]]
    return Prosody(
        speed=int(min(450, max(80, round(base.speed * age.speed / age.formant_shift)))),
        pitch=int(min(99, max(0, base.pitch + age.pitch))),
        range=int(min(400, max(0, round(base.range * age.range)))),
        amplitude=base.amplitude,
    )


@dataclass
class EspeakVoice:
    """A query's espeak-ng voice: variant, prosody, and the age's formant shift and tremolo."""

    voice: str
    prosody: Prosody
    formant_shift: float = 1.0
    tremolo_hz: float = 0.0
    tremolo_depth: float = 0.0

    def speak(self, text: str, language: str, rng: np.random.Generator) -> np.ndarray:
        audio, rate = synthesize(speakable_text(text, language), self.voice, self.prosody)
        # Read the samples as if recorded `formant_shift` times faster: pitch and formants rise
        # (a shorter vocal tract) and the pace quickens, which the slower speaking rate undid.
        wave = resample(audio, int(round(rate * self.formant_shift)), SAMPLE_RATE)
        if self.tremolo_depth:
            t = np.arange(wave.size) / SAMPLE_RATE
            wobble = 1.0 + self.tremolo_depth * np.sin(2 * np.pi * self.tremolo_hz * t + rng.uniform(0, 2 * np.pi))
            wave = wave * wobble.astype(np.float32)
        return wave.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# mixing


def choose_positions(spec: PlanFile, events: list[str], rng: np.random.Generator) -> list[str]:
    """Where each event goes (start, end, pause), by its placement weights, one event per place (so
    the sound before or after the speech stays within `EDGE_S` of it)."""
    chosen: list[str] = []
    for event in events:
        weights = {k: v for k, v in spec.events[event].positions.items() if k not in chosen}
        if not any(weights.values()):
            weights = {k: 1.0 for k in ("start", "end", "pause") if k not in chosen} or {"end": 1.0}
        names = list(weights)
        p = np.array([weights[n] for n in names], dtype=float)
        chosen.append(names[int(rng.choice(len(names), p=p / p.sum()))])
    return chosen


def trim_silence(wave: np.ndarray, level: float = 0.003, keep_s: float = 0.03) -> np.ndarray:
    """`wave` without the near-silence at its ends (below `level` of its peak), `keep_s` left on."""
    loud = np.nonzero(np.abs(wave) > level * (float(np.abs(wave).max()) or 1.0))[0]
    if not loud.size:
        return wave
    keep = int(keep_s * SAMPLE_RATE)
    return wave[max(0, loud[0] - keep):loud[-1] + 1 + keep]


def render(query: dict[str, Any], spec: PlanFile, speak: Callable[[str], np.ndarray], bank: EventBank,
           seed: int, voice: str, pitch: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The query's 16 kHz waveform and where its events were put (event, position, start, end)."""
    from .demo_corpus import split_for_gap

    rng = np.random.default_rng([seed, query["index"]])
    text, language = query["text"], query["language"]
    positions = choose_positions(spec, query["events"], rng)
    halves = split_for_gap(text, language) if "pause" in positions else None
    if "pause" in positions and halves is None:  # no clause boundary to pause at
        positions = ["end" if p == "pause" else p for p in positions]
    # espeak-ng leaves silence around its speech (more at a slow pace): trimmed, so an event's
    # distance to the speech is the gap chosen here
    parts = [trim_silence(speak(h)) for h in halves] if halves else [trim_silence(speak(text))]
    scale = SPEECH_PEAK / max(float(max(np.abs(p).max() for p in parts)), 1e-9)
    parts = [p * scale for p in parts]

    def gap() -> np.ndarray:
        return np.zeros(int(SAMPLE_RATE * rng.uniform(*GAP_S)), np.float32)

    def event_sound(event: str) -> np.ndarray:
        low, high = spec.events[event].level
        sound = bank.sound(event, rng, voice, pitch)[: int(MAX_EVENT_S * SAMPLE_RATE)]  # a long bank clip is cut
        fade = min(sound.size, int(0.03 * SAMPLE_RATE))
        if fade:
            sound = sound.copy()
            sound[-fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        return sound * (SPEECH_PEAK * rng.uniform(low, high))

    sequence: list[tuple[np.ndarray, dict[str, Any] | None]] = [(np.zeros(int(SAMPLE_RATE * PAD_S), np.float32), None)]
    placed = list(zip(query["events"], positions))
    for event, position in placed:
        if position == "start":
            sequence += [(event_sound(event), {"event": event, "position": "start"}), (gap(), None)]
    sequence.append((parts[0], None))
    for event, position in placed:
        if position == "pause":
            sequence += [(gap(), None), (event_sound(event), {"event": event, "position": "pause"}), (gap(), None)]
    if len(parts) > 1:
        if not any(p == "pause" for _, p in placed):
            sequence.append((gap(), None))
        sequence.append((parts[1], None))
    for event, position in placed:
        if position == "end":
            sequence += [(gap(), None), (event_sound(event), {"event": event, "position": "end"})]
    sequence.append((np.zeros(int(SAMPLE_RATE * PAD_S), np.float32), None))

    events_at, cursor = [], 0
    for piece, info in sequence:
        if info is not None:
            events_at.append({**info, "start": round(cursor / SAMPLE_RATE, 3),
                              "end": round((cursor + piece.size) / SAMPLE_RATE, 3), "sound": bank.source(info["event"])})
        cursor += piece.size
    audio = np.concatenate([piece for piece, _ in sequence]).astype(np.float32)
    audio = audio + rng.normal(0.0, NOISE_FLOOR_RMS, audio.size).astype(np.float32)
    audio = audio / max(float(np.abs(audio).max()) / PEAK, 1.0)
    return audio.astype(np.float32), events_at


# ---------------------------------------------------------------------------------------------
# the corpus


def llm_settings(profile, base_url: str | None, model: str | None, api_key_env: str | None) -> dict[str, Any] | None:
    """The query-writing LLM: the flags, else the profile's reply slot when it is an `openai` one."""
    if model or base_url:
        if not model:
            raise QueryError("--llm-base-url needs --llm-model (the model name the endpoint serves)")
        return {"model": model, "base_url": base_url, "api_key_env": api_key_env or "OPENAI_API_KEY"}
    entry = next((e for e in profile.enabled_stages() if e.slot == "reply" and e.backend == "openai"), None)
    if entry is None:
        return None
    params = entry.params
    return {"model": params.get("model"), "base_url": params.get("base_url"),
            "api_key_env": api_key_env or params.get("api_key_env", "OPENAI_API_KEY")}


def profile_speaker(profile, cache_dir: str):
    """(speak(text, query) -> 16 kHz waveform, name) from the profile's tts slot (openai or cosyvoice)."""
    from echat.pipelines.backends import build_stage

    entry = next((e for e in profile.enabled_stages() if e.backend_kind == "tts"), None)
    if entry is None or entry.backend == "espeak":
        return None
    params = dict(entry.params)
    params.setdefault("cache_dir", cache_dir)
    stage = build_stage(entry.backend_kind, entry.backend, params)
    stage.setup()
    styles = stage.styles

    def speak(text: str, query: dict[str, Any]) -> tuple[np.ndarray, str]:
        instruction = styles.for_user(query["emotion"], query["age"])
        if hasattr(stage, "voice_for"):  # the OpenAI-compatible endpoint
            voice = stage.voice_for(query["gender"])
            return stage.speak(text, voice=voice, instructions=instruction if stage.instructions else None), stage.describe(voice)
        return stage.speak(text, query["language"], instruction, query["gender"]), stage.describe(query["language"])

    return speak, entry.backend


def make_queries(
    out_dir: str | Path, n: int, *, profile, seed: int = 0, plan_file: str | None = None,
    lines_file: str | None = None, event_bank: str | None = None, tts: str = "espeak", llm: dict[str, Any] | None = None,
    overwrite: bool = False, jobs: int = 4, progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write `n` synthetic queries under `out_dir/audio/` and `out_dir/manifest.jsonl`; a summary."""
    import soundfile as sf

    from .query_text import LineBank, QueryTextLLM, texts_from_llm

    if tts not in TTS_CHOICES:
        raise QueryError(f"--tts must be one of {', '.join(TTS_CHOICES)}, got {tts!r}")
    out = Path(out_dir)
    manifest_path = out / "manifest.jsonl"
    if manifest_path.exists() and not overwrite:
        raise QueryError(f"{manifest_path} already exists; pass --overwrite to replace the queries there")
    spec = load_plans(plan_file)
    bank = EventBank(event_bank)
    bank.check({e for _, plan in spec.plans() for e in plan.cues.events})
    table = emotion_prosody(spec)
    missing = sorted({plan.cues.emotion for _, plan in spec.plans() if plan.cues.emotion} - set(table))
    if missing:
        raise QueryError(f"no prosody for emotion(s) {missing}: add them under `prosody` in the plan file")
    lines = LineBank.load(lines_file, seed=seed)
    for language in spec.languages:
        unknown = sorted({plan.cues.emotion or "neutral" for _, plan in spec.plans()} - lines.emotions(language))
        if unknown:
            raise QueryError(f"the line bank has no {language} lines for emotion(s) {unknown}")
    queries = allocate(spec, n, seed)
    cache_dir = os.path.expanduser(profile.cache_dir)

    # text
    texts: list[str | None] = [None] * len(queries)
    llm_usage: dict[str, int] = {}
    text_rejects = []
    writer = None
    if llm is not None:
        from echat.schemas.stage_runner import RetryPolicy

        writer = QueryTextLLM(**llm, cache_dir=cache_dir)
        if progress:
            progress(f"writing {len(queries)} query texts with {writer.describe()}")
        texts, text_rejects = texts_from_llm(writer, queries, RetryPolicy(**profile.retry.model_dump()))
        llm_usage = writer.usage()
    for query, text in zip(queries, texts):
        query["text_source"] = f"llm:{writer.model}" if text is not None and writer is not None else "bank"
        query["text"] = text if text is not None else lines.pick(query["language"], query["age"], query["emotion"])

    # speech
    speaker = profile_speaker(profile, cache_dir) if tts == "profile" else None
    if tts == "profile" and speaker is None:
        tts = "espeak"  # the profile speaks with espeak-ng itself

    def one(query: dict[str, Any]) -> dict[str, Any]:
        rng = np.random.default_rng([seed, query["index"], 1])
        if speaker is None:
            age = spec.ages[query["age"]]
            voice = EspeakVoice(query["voice"], query_prosody(spec, table, query), age.formant_shift,
                                age.tremolo_hz, age.tremolo_depth)

            def speak(text: str) -> np.ndarray:
                return voice.speak(text, query["language"], rng)

            tts_name, pitch = f"espeak-ng {voice.voice}", voice.prosody.pitch
        else:
            names = []

            def speak(text: str) -> np.ndarray:
                wave, name = speaker[0](text, query)
                names.append(name)
                return wave

            tts_name, pitch = None, 60
        audio, events_at = render(query, spec, speak, bank, seed, query["voice"], pitch)
        if tts_name is None:
            tts_name = names[0] if names else speaker[1]
        path = out / query["path"]
        sf.write(str(path), audio, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        return {"tts": tts_name, "events_at": events_at, "seconds": audio.size / SAMPLE_RATE}

    (out / "audio").mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in (out / "audio").glob("q*.wav"):
            old.unlink()
    if progress:
        progress(f"speaking {len(queries)} queries ({tts})")
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        rendered = list(pool.map(one, queries))

    rows = []
    for query, made in zip(queries, rendered):
        rows.append({
            "path": query["path"], "text": query["text"], "language": query["language"],
            "speaker": f"synthetic:{made['tts']}", "gender": query["gender"], "age": query["age"],
            "emotion": query["emotion"], "events": query["events"], "style": query["style"], "source_kind": "synthetic",
            "plan": query["plan"], "plan_kind": query["plan_kind"], "cues": query["cues"], "voice": query["voice"],
            "tts": made["tts"], "text_source": query["text_source"], "events_at": made["events_at"],
        })
    tmp = manifest_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(manifest_path)

    def tally(key: str) -> dict[str, int]:
        return dict(sorted(Counter(r[key] for r in rows).items()))

    summary = {
        "out_dir": str(out), "manifest": str(manifest_path), "count": len(rows),
        "seconds": round(sum(m["seconds"] for m in rendered), 1), "plan_file_version": spec.version,
        "plans": tally("plan"), "plan_kinds": tally("plan_kind"), "languages": tally("language"),
        "genders": tally("gender"), "ages": tally("age"), "emotions": tally("emotion"),
        "events": dict(sorted(Counter(e for r in rows for e in r["events"]).items())),
        "event_positions": dict(sorted(Counter(f"{e['event']}@{e['position']}" for r in rows for e in r["events_at"]).items())),
        "text_sources": tally("text_source"), "distinct_texts": len({r["text"] for r in rows}),
        "llm_usage": llm_usage, "llm_rejects": [r.to_dict() for r in text_rejects],
        "build_overrides": list(BUILD_OVERRIDES),
    }
    (out / "synth_summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------
# the command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="local", help="profile name from configs/ or a YAML path (cache, retry, "
                        "and the reply slot's LLM / the tts slot's engine when asked for; default: local)")
    parser.add_argument("--n", type=int, default=200, help="number of queries (default 200)")
    parser.add_argument("--output", required=True, help="folder to write audio/, manifest.jsonl and synth_summary.json into")
    parser.add_argument("--plan", default=None, help="cue plans (YAML like synth/query_plans.yaml; default: that file)")
    parser.add_argument("--lines", default=None, help="offline line bank (YAML like synth/query_lines.yaml)")
    parser.add_argument("--event-bank", default=None, metavar="DIR", help="real event clips as DIR/<event>/*.wav")
    parser.add_argument("--tts", choices=TTS_CHOICES, default="espeak",
                        help="espeak: espeak-ng voices by age and gender (default); profile: the profile's tts backend")
    parser.add_argument("--llm-base-url", default=None, help="an OpenAI-compatible endpoint that writes the query texts")
    parser.add_argument("--llm-model", default=None, help="the model it serves (with --llm-base-url, or OpenAI's)")
    parser.add_argument("--llm-api-key-env", default=None, help="environment variable holding its key (default OPENAI_API_KEY)")
    parser.add_argument("--offline", action="store_true", help="take every text from the line bank, even if the profile's reply slot has an LLM")
    parser.add_argument("--seed", type=int, default=0, help="seed of every choice; the same seed gives the same corpus")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="queries spoken at once")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a profile value (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace queries already in OUTPUT")


def run(args: argparse.Namespace) -> int:
    from echat.pipelines.profile import ProfileError, load_profile

    try:
        profile = load_profile(args.profile, args.overrides)
        llm = None if args.offline else llm_settings(profile, args.llm_base_url, args.llm_model, args.llm_api_key_env)
        summary = make_queries(args.output, args.n, profile=profile, seed=args.seed, plan_file=args.plan,
                               lines_file=args.lines, event_bank=args.event_bank, tts=args.tts, llm=llm,
                               overwrite=args.overwrite, jobs=args.jobs,
                               progress=lambda line: print(f"echat synth-queries: {line}", file=sys.stderr))
    except (ProfileError, QueryError, ValueError, FileNotFoundError) as exc:
        print(f"echat synth-queries: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # espeak-ng missing or failing, an endpoint without a key
        print(f"echat synth-queries: {exc}", file=sys.stderr)
        return 1

    def counts(c: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in c.items()) or "none"

    print(f"wrote {summary['count']} synthetic queries ({summary['seconds']} s of audio) to {Path(summary['out_dir']) / 'audio'}")
    print(f"  manifest:   {summary['manifest']}")
    print(f"  plans:      {counts(summary['plan_kinds'])} ({len(summary['plans'])} plans)")
    print(f"  languages:  {counts(summary['languages'])}")
    print(f"  ages:       {counts(summary['ages'])};  genders: {counts(summary['genders'])}")
    print(f"  emotions:   {counts(summary['emotions'])}")
    print(f"  events:     {counts(summary['events'])}")
    print(f"  texts:      {counts(summary['text_sources'])} ({summary['distinct_texts']} distinct)")
    if summary["llm_rejects"]:
        print(f"  {len(summary['llm_rejects'])} LLM text(s) unusable; those queries took a bank line (synth_summary.json says why)")
    print("  build it, scoring the labelers against the intended cues:")
    print(f"    echat build --input {summary['manifest']} --output OUT --set \"trust_manifest=[transcript, language]\" "
          f"--set vad.params.pad_s={EDGE_S:g}")
    return 0
