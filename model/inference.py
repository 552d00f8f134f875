"""Inference: run a trained OSUM-EChat checkpoint on audio (or text) for any task tag.

    from echat.model.inference import Predictor
    predictor = Predictor.from_checkpoint("runs/tiny", device="cpu")
    predictor.predict(["a.wav", "b.wav"], "<TRANSCRIBE> <EMOTION>")   # -> [Prediction, ...]
    predictor.predict(["Hello there."], "<TEXT2TOKEN>")               # text in, speech tokens out
    predictor.chat("question.wav")                                     # -> ChatResult

Prompts are built by the same code the training samples use (`prompts.prompt_segments` through
`prompts.ChatEncoder`, with `prompts.output_type` choosing the system prompt), so a task's prompt
at inference is token for token the prompt it was trained with. The understanding tasks get an
instruction from the task's paraphrase list (`model/instructions/*.yaml`; the first one unless
`instruction=` is given), the dialogue tasks none, as in training (OSUM-EChat names the mode in
the system prompt). Generation is `generate.generate` (greedy unless sampling is asked for).

Inputs: an audio file path, encoded audio bytes, a mono float waveform at 16 kHz, or a
`(waveform, sample_rate)` pair; `<TEXT2TEXT>` and `<TEXT2TOKEN>` take text instead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np

from echat.model import prompts
from echat.schemas import tasks
from echat.schemas.reasoning import THINK_END, THINK_START, reply_emotion_of, split_think, wrap_think
from echat.schemas.record import SAMPLE_RATE

AudioInput = Union[str, Path, bytes, np.ndarray, tuple]


class InferenceError(ValueError):
    """An input or option the model cannot run on; the message says which and why."""


# ----------------------------------------------------------------------------- results


@dataclass
class Prediction:
    """One input's output for one task."""

    key: str
    task: str
    text: str  # the text the model wrote, without <|im_end|> ("" for <TEXT2TOKEN>)
    speech_tokens: list[int] = field(default_factory=list)  # CosyVoice codes 0..4095 (speech tasks)
    think: str | None = None  # the reasoning between <think> and <think end>, when the text has one
    reply: str = ""  # the text after the reasoning (the whole text when there is none)
    finished: bool = True  # the text ended with <|im_end|> (and speech with its end marker)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ChatResult:
    """An empathetic spoken reply: reasoning, reply text, its emotion and its speech."""

    think: str  # the reasoning trace (tag form or natural language), without the markers
    reply_text: str
    reply_emotion: str | None  # from `Reply emotion: <X>` of a tag-form reasoning, when present
    speech_tokens: list[int]
    waveform: np.ndarray | None = None  # when a token-to-wav backend was given
    sample_rate: int | None = None
    text: str = ""  # the model's whole text output, `<think>...<think end>reply`
    think_forced_end: bool = False  # the reasoning hit its budget and `<think end>` was forced
    finished: bool = True  # the reply ended with <|im_end|> (and speech with its end marker)


# ----------------------------------------------------------------------------- tasks


def check_task(task: str) -> str:
    """The task in its normal spelling; InferenceError when it is not a task the model knows."""
    try:
        return tasks.task(task).tag
    except ValueError as err:  # not tags at all, or tags the table does not know (UnknownTaskError)
        raise InferenceError(str(err)) from None


def takes_text(task: str) -> bool:
    """<TEXT2TEXT> (the user's words) and <TEXT2TOKEN> (the text to speak) take text, not audio."""
    return tasks.task(task).input == tasks.TEXT_INPUT


def generation_mode(task: str, speech: bool | None = None) -> str:
    """"text", "speech" (TTS: speech right after the prompt) or "text+speech" (spoken reply).

    `<HISTORY>` replies in text unless `speech=True` (it was trained with speech when the record
    had reply tokens); `speech=False` turns a speech task into its text part.
    """
    spec = tasks.task(task)
    if spec.output == tasks.SPEECH:
        return "speech"
    speaks = spec.speaks or (spec.speaks_optionally and bool(speech))
    if speech is False:
        speaks = False
    return "text+speech" if speaks else "text"


# ----------------------------------------------------------------------------- prompts


def default_instruction(instructions: dict[str, tuple[str, ...]], task: str) -> str | None:
    """The instruction a task's user turn carries: none for the dialogue tasks (as trained), the
    first paraphrase for the understanding tasks."""
    spec = tasks.task(task)
    if not spec.instruction:
        return None
    choices = instructions.get(spec.tag)
    if not choices:
        raise InferenceError(f"no instructions for task {spec.tag!r}: add a list for it to an instructions YAML")
    return choices[0]


def build_prompt_ids(
    encoder: "prompts.ChatEncoder",
    instructions: dict[str, tuple[str, ...]],
    task: str,
    *,
    text: str | None = None,
    history: list[dict[str, str]] | None = None,
    instruction: str | None = None,
    speech: bool | None = None,
) -> list[int]:
    """Token ids of the prompt for `task`, up to `<|im_start|>assistant\\n`, exactly as a training
    sample of the task starts (`samples.SampleBuilder.build_task` lays out the same segments).

    text: the user's text for <TEXT2TEXT> / <TEXT2TOKEN>. history: earlier turns
    ([{"role": "user"|"assistant", "text": ...}]) for <HISTORY>. speech: <HISTORY> with a spoken
    reply takes the speech-to-speech system prompt, as in training.
    """
    task = check_task(task)
    text_input = takes_text(task)
    if text_input and not (text and text.strip()):
        raise InferenceError(f"task {task} takes text input; none was given")
    out_type = prompts.output_type(task, speech_target=generation_mode(task, speech) != "text")
    return encoder.prompt_ids(
        out_type,
        instruction=instruction if instruction is not None else default_instruction(instructions, task),
        user_text=text.strip() if text_input else None,
        with_audio=not text_input,
        history=history if tasks.task(task).history else None,
    )


# ----------------------------------------------------------------------------- audio


def load_waveform(item: AudioInput) -> np.ndarray:
    """Mono float32 at 16 kHz from a path, encoded bytes, a 16 kHz array, (array, rate) or an AudioRef.

    Files and bytes go through the build's decoder (`schemas.audio`, via `features.decode_audio`),
    so whatever format the corpus builder reads (m4a, opus, mp3...) loads here too; arrays are
    resampled with the same resampler. Raises InferenceError saying what could not be read and why.
    """
    from echat.model.features import AudioRef, decode_audio
    from echat.schemas.audio import AudioError, resample

    if isinstance(item, AudioRef):  # a record's audio (bytes or a file, maybe a span of it)
        try:
            return decode_audio(item)
        except (AudioError, ValueError) as err:
            raise InferenceError(f"cannot read audio {item.describe()}: {err}") from None
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.is_file():
            raise InferenceError(f"audio file not found: {item}")
        try:
            return decode_audio(AudioRef(path=str(path)))
        except (AudioError, ValueError) as err:
            raise InferenceError(f"cannot read audio {item}: {err}") from None
    if isinstance(item, (bytes, bytearray)):
        try:
            return decode_audio(AudioRef(data=bytes(item)))
        except (AudioError, ValueError) as err:
            raise InferenceError(f"cannot decode audio bytes ({len(item)} bytes): {err}") from None
    if isinstance(item, tuple) and len(item) == 2:
        wav, rate = np.asarray(item[0], dtype=np.float32), int(item[1])
    elif isinstance(item, np.ndarray):
        wav, rate = item.astype(np.float32, copy=False), SAMPLE_RATE
    else:
        raise InferenceError(f"unsupported audio input of type {type(item).__name__}: pass a path, bytes, an array or (array, rate)")
    if wav.ndim == 2:
        wav = wav.mean(axis=1) if wav.shape[1] <= 8 else wav.mean(axis=0)  # (samples, channels) or (channels, samples)
    if wav.ndim != 1:
        raise InferenceError(f"expected a mono waveform, got shape {wav.shape}")
    return np.ascontiguousarray(resample(wav, rate, SAMPLE_RATE), dtype=np.float32)


def _describe(item: Any, index: int) -> str:
    """The key of an input that was given none: its path, else its position."""
    return str(item) if isinstance(item, (str, Path)) else f"input-{index}"


# ----------------------------------------------------------------------------- the predictor


@dataclass
class _Request:
    key: str
    prompt_ids: list[int]
    waveform: np.ndarray | None


class Predictor:
    """A model, its tokenizer and config, ready to answer any task tag on batches of inputs."""

    def __init__(self, model: Any, tokenizer: Any, model_config: Any = None, *, device: str | None = None,
                 instructions: dict[str, tuple[str, ...]] | None = None):
        import torch

        from echat.model.features import LogMelExtractor

        self.model = model
        self.tokenizer = tokenizer
        self.config = model_config if model_config is not None else getattr(model, "config", None)
        if getattr(model, "tokenizer", None) is not tokenizer:
            model.bind_tokenizer(tokenizer)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.encoder = prompts.ChatEncoder(tokenizer)
        # the instructions of the tokenizer's prompt profile (an osum checkpoint: OSUM's layout)
        self.instructions = instructions if instructions is not None else \
            prompts.load_instructions(profile=prompts.tokenizer_profile(tokenizer))
        n_mels = int(model.encoder.config.num_mel_bins)
        self.extractor = LogMelExtractor(n_mels=n_mels)
        # Whisper's position table bounds the input: 2 mel frames per encoder position (30 s).
        self.max_frames = model.encoder.max_input_frames
        self.model.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", **kwargs: Any) -> "Predictor":
        """Load a training checkpoint: a step folder, a checkpoints folder or a run's output folder."""
        from echat.model.checkpoint import load_for_inference

        model, tokenizer, model_config = load_for_inference(path, device=device)
        return cls(model, tokenizer, model_config, device=device, **kwargs)

    @property
    def has_speech_output(self) -> bool:
        return getattr(self.model, "speech_head", None) is not None

    # ------------------------------------------------------------------ prompts

    def default_instruction(self, task: str) -> str | None:
        return default_instruction(self.instructions, task)

    def prompt_ids(
        self,
        task: str,
        *,
        text: str | None = None,
        history: list[dict[str, str]] | None = None,
        instruction: str | None = None,
        speech: bool | None = None,
    ) -> list[int]:
        """Token ids of the prompt for `task` (see `build_prompt_ids`)."""
        return build_prompt_ids(self.encoder, self.instructions, task, text=text, history=history,
                                instruction=instruction, speech=speech)

    # ------------------------------------------------------------------ batches

    def _batch(self, requests: list[_Request]):
        import torch

        from echat.model.batch import IGNORE_INDEX, Batch
        from echat.model.data import pad_features, pad_sequences

        feats = [self.extractor(r.waveform) if r.waveform is not None else None for r in requests]
        features, feature_lengths = pad_features(feats, self.extractor.n_mels)
        input_ids, attention_mask = pad_sequences([r.prompt_ids for r in requests], self.encoder.pad_id)
        n = len(requests)
        return Batch(
            features=features,
            feature_lengths=feature_lengths,
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=torch.full(input_ids.shape, IGNORE_INDEX, dtype=torch.long),
            speech_tokens=torch.zeros(n, 0, dtype=torch.long),
            speech_token_lengths=torch.zeros(n, dtype=torch.long),
            keys=[r.key for r in requests],
        ).to(self.device)

    def _waveform(self, item: AudioInput, key: str) -> np.ndarray:
        from echat.model.features import FRAMES_PER_SECOND, MIN_SAMPLES, num_frames

        wav = load_waveform(item)
        if len(wav) < MIN_SAMPLES:
            raise InferenceError(f"{key}: audio of {len(wav)} samples is too short (at least {MIN_SAMPLES} at 16 kHz)")
        if num_frames(len(wav)) > self.max_frames:
            raise InferenceError(
                f"{key}: {len(wav) / SAMPLE_RATE:.1f} s of audio is longer than the encoder's "
                f"{self.max_frames / FRAMES_PER_SECOND:.0f} s; split it first"
            )
        return wav

    # ------------------------------------------------------------------ predicting

    def predict(
        self,
        inputs: Sequence[AudioInput | str],
        task: str,
        *,
        keys: Sequence[str] | None = None,
        instruction: str | None = None,
        history: list[dict[str, str]] | Sequence[list[dict[str, str]]] | None = None,
        speech: bool | None = None,
        batch_size: int = 8,
        max_text_tokens: int = 256,
        max_speech_tokens: int = 1500,
        sampling: Any = None,
        speech_sampling: Any = None,
        seed: int | None = None,
    ) -> list[Prediction]:
        """Run `task` on every input, in batches; one Prediction per input, in input order.

        inputs: audio (paths, bytes, arrays, (array, rate)) or, for <TEXT2TEXT> / <TEXT2TOKEN>,
        strings of text. history: for <HISTORY>, one list of turns for all inputs or one per input.
        speech: for <HISTORY>, also generate speech; False limits a speech task to its text.
        sampling / speech_sampling: `generate.Sampling` (default greedy). seed: for sampling.
        """
        import torch

        from echat.model.generate import generate

        task = check_task(task)
        mode = generation_mode(task, speech)
        if mode != "text" and not self.has_speech_output:
            raise InferenceError(f"task {task} generates speech, but this model's config has no speech output")
        if batch_size < 1:
            raise InferenceError("batch_size must be at least 1")
        inputs = list(inputs)
        if keys is not None and len(keys) != len(inputs):
            raise InferenceError(f"{len(keys)} keys for {len(inputs)} inputs")
        histories = _per_input_history(history, len(inputs))
        requests = []
        for i, item in enumerate(inputs):
            if keys is not None:
                key = str(keys[i])
            else:
                key = f"text-{i}" if takes_text(task) else _describe(item, i)
            if takes_text(task):
                if not isinstance(item, str):
                    raise InferenceError(f"{key}: task {task} takes text input, got {type(item).__name__}")
                ids = self.prompt_ids(task, text=item, instruction=instruction, speech=speech)
                requests.append(_Request(key, ids, None))
            else:
                ids = self.prompt_ids(task, history=histories[i], instruction=instruction, speech=speech)
                requests.append(_Request(key, ids, self._waveform(item, key)))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        out: list[Prediction] = []
        for start in range(0, len(requests), batch_size):
            chunk = requests[start : start + batch_size]
            result = generate(
                self.model, self._batch(chunk), mode=mode,
                max_text_tokens=max_text_tokens, max_speech_tokens=max_speech_tokens,
                text_sampling=sampling, speech_sampling=speech_sampling, generator=generator,
            )
            for i, req in enumerate(chunk):
                text = result.text.texts[i] if result.text is not None else ""
                finished = result.text.finished[i] if result.text is not None else True
                codes: list[int] = []
                if result.speech is not None:
                    codes = list(result.speech.codes[i])
                    finished = finished and result.speech.finished[i]
                think, reply = split_think(text)
                out.append(Prediction(key=req.key, task=task, text=text, speech_tokens=codes, think=think, reply=reply, finished=finished))
        return out

    # ------------------------------------------------------------------ chatting

    def _cut_at_text(self, tokens: list[int], marker: str) -> tuple[list[int], list[int] | None]:
        """(the tokens before `marker`, the tokens that spell it) where the decoded text first
        holds `marker`; (tokens, None) when it never does."""
        for k in range(1, len(tokens) + 1):
            if marker in self.tokenizer.decode(tokens[:k], skip_special_tokens=False):
                for j in range(k - 1, -1, -1):  # the shortest tail that still spells the marker
                    if marker in self.tokenizer.decode(tokens[j:k], skip_special_tokens=False):
                        return tokens[:j], tokens[j:k]
        return tokens, None

    def chat(
        self,
        audio: AudioInput,
        *,
        think: bool = True,
        speech: bool = True,
        max_think_tokens: int = 256,
        max_reply_tokens: int = 256,
        max_speech_tokens: int = 1500,
        sampling: Any = None,
        speech_sampling: Any = None,
        seed: int | None = None,
        token2wav: Any = None,
        history: list[dict[str, str]] | None = None,
    ) -> ChatResult:
        """Answer one spoken turn: reasoning (with `think`), reply text, speech tokens (with `speech`).

        The task is `<S2TCHAT> [<TEXT2TOKEN>] [<THINK>]` (or `<HISTORY>` with `history`). With
        `think`, the answer opens with `<think>` (every reasoning target starts so) and the
        reasoning gets at most `max_think_tokens`; if it has not closed by then, `<think end>` is
        put in its place (`think_forced_end`) and the reply follows, so a runaway reasoning cannot
        eat the reply. token2wav: a `token2wav.TokenToWav` to turn the speech tokens into audio.
        """
        import torch

        from echat.model.generate import generate, generate_text

        if speech and not self.has_speech_output:
            raise InferenceError("this model's config has no speech output; chat with speech=False")
        if history and think:
            raise InferenceError("a <HISTORY> turn has no reasoning; chat with think=False")
        task = tasks.chat_task(reasons=think, speaks=speech, history=bool(history)).tag
        prompt = self.prompt_ids(task, history=history, speech=speech)
        wav = self._waveform(audio, _describe(audio, 0))
        generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        ids = self.model.special_ids
        mode = "text+speech" if speech else "text"

        think_tokens: list[int] = []
        forced = False
        if think:
            # Phase 1: the reasoning, from the prompt plus the opening <think>, until <think end>.
            # Under the osum prompt profile the markers are plain text of several tokens: the
            # reasoning then runs until <|im_end|> and is cut where its text closes the trace.
            single = ids.think_start is not None
            start = [ids.think_start] if single else self.tokenizer.encode(THINK_START, add_special_tokens=False)
            opened = prompt + start
            reasoning, _ = generate_text(
                self.model, self._batch([_Request("chat", opened, wav)]), max_new_tokens=max_think_tokens,
                sampling=sampling, stop_ids=[ids.think_end] if single else [ids.im_end], generator=generator,
            )
            think_tokens, end = reasoning.token_ids[0], None
            if not single:
                think_tokens, end = self._cut_at_text(think_tokens, THINK_END)
            if end is None and ids.im_end in think_tokens:
                # The model closed its answer inside the reasoning: that is its answer, no reply follows.
                think_tokens = think_tokens[: think_tokens.index(ids.im_end)]
                text = self.tokenizer.decode([*start, *think_tokens], skip_special_tokens=False)
                return ChatResult(think=split_think(text)[0] or "", reply_text="", reply_emotion=reply_emotion_of(text),
                                  speech_tokens=[], text=text, finished=True)
            forced = end is None and not (single and reasoning.finished[0])
            if end is None:
                end = [ids.think_end] if single else self.tokenizer.encode(THINK_END, add_special_tokens=False)
            prompt = opened + think_tokens + end
        # Phase 2: the reply (and its speech) after the closed reasoning.
        result = generate(
            self.model, self._batch([_Request("chat", prompt, wav)]), mode=mode,
            max_text_tokens=max_reply_tokens, max_speech_tokens=max_speech_tokens,
            text_sampling=sampling, speech_sampling=speech_sampling, generator=generator,
        )
        reply = result.text.texts[0].strip()
        codes = list(result.speech.codes[0]) if result.speech is not None else []
        finished = result.text.finished[0] and (result.speech is None or result.speech.finished[0])
        think_text = self.tokenizer.decode(think_tokens, skip_special_tokens=False).strip() if think else ""
        full = wrap_think(think_text) + reply if think else reply
        waveform = sample_rate = None
        if token2wav is not None and codes:
            waveform, sample_rate = token2wav.synthesize(codes)
        return ChatResult(
            think=think_text, reply_text=reply, reply_emotion=reply_emotion_of(think_text), speech_tokens=codes,
            waveform=waveform, sample_rate=sample_rate, text=full, think_forced_end=forced, finished=finished,
        )


def _per_input_history(history: Any, n: int) -> list[list[dict[str, str]] | None]:
    if not history:
        return [None] * n
    if all(isinstance(t, dict) for t in history):
        return [list(history)] * n
    history = list(history)
    if len(history) != n:
        raise InferenceError(f"{len(history)} histories for {n} inputs")
    return history
