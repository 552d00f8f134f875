"""`echat chat`: one empathetic spoken turn with a trained model.

    echat chat --checkpoint runs/tiny question.wav
    echat chat --checkpoint runs/echat question.wav --wav reply.wav \\
        --cosyvoice-model CosyVoice-300M-25Hz --prompt-wav voice.wav

Prints the reasoning, the reply, its emotion (from a tag-form reasoning) and the number of speech
tokens, and writes the speech tokens to a JSON file (a list of ints: CosyVoice 25 Hz codes). With
`--wav`, the tokens are turned into audio by a token-to-wav backend (CosyVoice); when none is
installed the command says how to get one and stops before loading the model, so nothing is lost.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from echat.model.infer_cli import add_sampling_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help="checkpoint step folder, checkpoints folder or run folder")
    parser.add_argument("audio", metavar="AUDIO", help="the user's spoken turn (any format the corpus build reads: wav, flac, mp3, m4a, opus...)")
    parser.add_argument("--no-think", action="store_true", help="reply without the reasoning trace")
    parser.add_argument("--text-only", action="store_true", help="reply in text only (no speech tokens)")
    parser.add_argument("--history", metavar="FILE.json", help='earlier turns, [{"role": "user"|"assistant", "text": ...}] (a <HISTORY> turn; implies --no-think)')
    parser.add_argument("--tokens-out", metavar="FILE.json", help="where to write the speech tokens (default: AUDIO's name + .reply_tokens.json, here)")
    parser.add_argument("--wav", metavar="OUT.wav", help="also synthesize the reply's audio with a token-to-wav backend")
    parser.add_argument("--token2wav", default="cosyvoice", choices=["cosyvoice"], help="token-to-wav backend for --wav")
    parser.add_argument("--cosyvoice-model", metavar="DIR", help="CosyVoice model folder (OSUM-EChat uses CosyVoice-300M-25Hz)")
    parser.add_argument("--prompt-wav", metavar="WAV", help="a few seconds of the voice the reply is spoken with (CosyVoice)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-think-tokens", type=int, default=256)
    parser.add_argument("--max-reply-tokens", type=int, default=256)
    parser.add_argument("--max-speech-tokens", type=int, default=1500)
    add_sampling_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from echat.model.checkpoint import CheckpointError
    from echat.model.infer_cli import resolve_device, sampling_from
    from echat.model.inference import InferenceError, Predictor
    from echat.model.token2wav import TokenToWavUnavailable, load_token2wav

    if not Path(args.audio).is_file():
        print(f"echat chat: audio file not found: {args.audio}", file=sys.stderr)
        return 2
    if args.wav and args.text_only:
        print("echat chat: --wav needs speech tokens; drop --text-only", file=sys.stderr)
        return 2
    history = None
    if args.history:
        try:
            history = json.loads(Path(args.history).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            print(f"echat chat: cannot read --history {args.history}: {err}", file=sys.stderr)
            return 2
        if not isinstance(history, list) or not all(isinstance(t, dict) for t in history):
            print(f"echat chat: {args.history}: expected a JSON list of {{role, text}} turns", file=sys.stderr)
            return 2

    backend = None
    if args.wav:
        # Before the model loads and generates: a missing backend should cost the user nothing.
        try:
            backend = load_token2wav(args.token2wav, model_dir=args.cosyvoice_model, prompt_wav=args.prompt_wav)
        except TokenToWavUnavailable as err:
            print(f"echat chat: cannot write {args.wav}: {err}\n"
                  "Run without --wav to get the reasoning, the reply and its speech tokens.", file=sys.stderr)
            return 3

    try:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=resolve_device(args.device))
    except (CheckpointError, FileNotFoundError) as err:
        print(f"echat chat: cannot load checkpoint {args.checkpoint}: {err}", file=sys.stderr)
        return 2
    try:
        result = predictor.chat(
            args.audio, think=not (args.no_think or history), speech=not args.text_only, history=history,
            max_think_tokens=args.max_think_tokens, max_reply_tokens=args.max_reply_tokens,
            max_speech_tokens=args.max_speech_tokens, sampling=sampling_from(args), seed=args.seed, token2wav=backend,
        )
    except InferenceError as err:
        print(f"echat chat: {err}", file=sys.stderr)
        return 2

    tokens_path = None
    if result.speech_tokens:
        tokens_path = Path(args.tokens_out) if args.tokens_out else Path(Path(args.audio).stem + ".reply_tokens.json")
        tokens_path.parent.mkdir(parents=True, exist_ok=True)
        tokens_path.write_text(json.dumps(result.speech_tokens) + "\n", encoding="utf-8")
    if result.waveform is not None:
        import soundfile as sf

        Path(args.wav).parent.mkdir(parents=True, exist_ok=True)
        sf.write(args.wav, result.waveform, result.sample_rate)

    if args.json:
        print(json.dumps({
            "think": result.think, "reply_text": result.reply_text, "reply_emotion": result.reply_emotion,
            "speech_tokens": result.speech_tokens, "tokens_file": str(tokens_path) if tokens_path else None,
            "wav": args.wav if result.waveform is not None else None, "text": result.text,
            "think_forced_end": result.think_forced_end, "finished": result.finished,
        }, ensure_ascii=False))
        return 0
    if not (args.no_think or history):
        note = "  (budget reached: <think end> was forced)" if result.think_forced_end else ""
        print(f"Reasoning: {result.think}{note}")
    print(f"Reply: {result.reply_text}")
    if result.reply_emotion:
        print(f"Reply emotion: {result.reply_emotion}")
    if not args.text_only:
        where = f" -> {tokens_path}" if tokens_path else ""
        print(f"Speech tokens: {len(result.speech_tokens)}{where}")
    if result.waveform is not None:
        print(f"Audio: {args.wav} ({len(result.waveform) / result.sample_rate:.2f} s at {result.sample_rate} Hz)")
    return 0
