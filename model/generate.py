"""Inference primitives: text generation after the speech prefix, then speech-token generation.

One KV cache carries a batch through three phases, as OSUM-EChat answers a spoken turn:

1. `prefill`: the prompt of a `Batch` (speech spliced in at `<|audio|>`, exactly as in training)
   goes through the LLM once.
2. `generate_text`: greedy or sampled text tokens from the LLM head until a stop token
   (`<|im_end|>` by default) or `max_new_tokens`.
3. `generate_speech`: the speech start marker (4096) is fed, then the speech head picks codes
   (fed back through the speech embedding) until it picks the end marker (4096) or
   `max_new_tokens`. Codes returned are 0..4095.

Samples of a batch stop at different steps. A stopped sample keeps its place: it is fed a masked
dummy step (attention 0), and every sample has its own position counter, so right padding and
early stops leave each sample's positions and attention exactly as if it ran alone.

`generate(model, batch, mode=...)` chains the phases: "text" (ASR, understanding, text chat),
"speech" (TTS: the prompt is followed directly by speech), "text+speech" (speech-to-speech chat).
The stop token that ends the text is fed before the speech marker, as in training, where speech
follows `<|im_end|>`. A model trained with `speech_output.streaming` answers "text+speech" in its
interleaved layout instead (`generate_interleaved`: a text block, a speech block, ...).

The heads follow the phase: the LLM head picks text, the speech head picks speech. That holds for
a model trained with the joint softmax too (`speech_output.joint_softmax`): OSUM-EChat's decoder
switches heads the same way, and a softmax over [text ; speech] logits restricted to one part is
that part's own softmax, so greedy picks and sampling (temperature, top-k, top-p) are unchanged.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from echat.model.batch import Batch


@dataclass(frozen=True)
class Sampling:
    """Greedy by default; do_sample=True draws after temperature, top-k (0: off), top-p (1.0: off)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.top_k < 0 or not 0 < self.top_p <= 1.0:
            raise ValueError("top_k must be >= 0 and top_p in (0, 1]")


@dataclass
class DecodeState:
    """Where a batch stands: its cache, attention over everything fed, and next positions."""

    cache: Any
    attention_mask: torch.Tensor  # (B, fed so far) int64
    positions: torch.Tensor  # (B,) next position id of each sample
    last_hidden: torch.Tensor  # (B, H) hidden state after each sample's last real input


@dataclass
class TextResult:
    token_ids: list[list[int]]  # generated ids per sample, without the stop token
    finished: list[bool]  # True: stopped at a stop token; False: reached max_new_tokens
    texts: list[str] = field(default_factory=list)  # decoded when the model has a tokenizer


@dataclass
class SpeechResult:
    codes: list[list[int]]  # speech codes per sample, 0..codebook-1, without the end marker
    finished: list[bool]  # True: the end marker was generated


@dataclass
class Generation:
    text: TextResult | None
    speech: SpeechResult | None
    blocks: list[list["Block"]] | None = None  # per sample, the interleaved reply (streaming only)


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    logits = logits.float()
    if not sampling.do_sample:
        return logits.argmax(-1)
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long, device=logits.device)  # the warpers ignore them
    if sampling.temperature != 1.0:
        logits = TemperatureLogitsWarper(sampling.temperature)(dummy_ids, logits)
    if sampling.top_k > 0:
        logits = TopKLogitsWarper(sampling.top_k)(dummy_ids, logits)
    if sampling.top_p < 1.0:
        logits = TopPLogitsWarper(sampling.top_p)(dummy_ids, logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_kwarg(decoder: Any) -> str:
    """transformers 5.x renames `past_key_values` to `cache` (the old name goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


@torch.inference_mode()
def prefill(model: Any, batch: Batch) -> DecodeState:
    """Run the prompt of `batch` (no targets: its labels and speech tokens are ignored)."""
    from transformers import DynamicCache

    inputs = model.assemble(batch, with_speech_targets=False)
    cache = DynamicCache(config=model.causal_lm.config)  # updated in place by every call
    out = model.decoder(
        inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, use_cache=True,
        **{_cache_kwarg(model.decoder): cache},
    )
    rows = torch.arange(inputs.embeds.shape[0], device=inputs.embeds.device)
    return DecodeState(
        cache=cache,
        attention_mask=inputs.attention_mask,
        positions=inputs.lengths.clone(),
        last_hidden=out.last_hidden_state[rows, inputs.lengths - 1],
    )


@torch.inference_mode()
def _feed(model: Any, state: DecodeState, embeds: torch.Tensor, fed: torch.Tensor) -> None:
    """Feed one step: embeds (B, H); `fed` (B,) bool marks the samples whose step is real."""
    state.attention_mask = torch.cat([state.attention_mask, fed.long()[:, None]], dim=1)
    out = model.decoder(
        inputs_embeds=embeds[:, None, :],
        attention_mask=state.attention_mask,
        position_ids=state.positions[:, None],
        use_cache=True,
        **{_cache_kwarg(model.decoder): state.cache},
    )
    new_hidden = out.last_hidden_state[:, -1]
    state.last_hidden = torch.where(fed[:, None], new_hidden, state.last_hidden)
    state.positions = state.positions + fed.long()


@torch.inference_mode()
def generate_text(
    model: Any,
    batch_or_state: Batch | DecodeState,
    max_new_tokens: int = 256,
    sampling: Sampling | None = None,
    stop_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
    feed_final: bool = False,
) -> tuple[TextResult, DecodeState]:
    """Text tokens from the LLM head. `feed_final`: also feed the last tokens (to continue with speech)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    sampling = sampling or Sampling()
    state = prefill(model, batch_or_state) if isinstance(batch_or_state, Batch) else batch_or_state
    if stop_ids is None:
        if model.special_ids is None:
            raise RuntimeError("no tokenizer bound: pass stop_ids or call model.bind_tokenizer(tokenizer)")
        stop_ids = [model.special_ids.im_end]
    stops = torch.tensor(sorted(set(stop_ids)), device=state.last_hidden.device)
    pad_id = model.special_ids.pad if model.special_ids is not None else 0
    bsz = state.last_hidden.shape[0]
    active = torch.ones(bsz, dtype=torch.bool, device=state.last_hidden.device)
    tokens: list[list[int]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    for step in range(max_new_tokens):
        chosen = _choose(model.lm_head(state.last_hidden), sampling, generator)
        stopped = active & torch.isin(chosen, stops)
        for i in active.nonzero().flatten().tolist():
            if bool(stopped[i]):
                finished[i] = True
            else:
                tokens[i].append(int(chosen[i]))
        last = step == max_new_tokens - 1 or bool((active & ~stopped).sum() == 0)
        if not last or feed_final:
            ids = torch.where(active, chosen, torch.full_like(chosen, pad_id))
            _feed(model, state, model.embed_tokens(ids), active)
        active = active & ~stopped
        if last:
            break
    texts = [model.tokenizer.decode(t, skip_special_tokens=False) for t in tokens] if model.tokenizer is not None else []
    return TextResult(token_ids=tokens, finished=finished, texts=texts), state


@torch.inference_mode()
def generate_speech(
    model: Any,
    batch_or_state: Batch | DecodeState,
    max_new_tokens: int = 1500,
    sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
) -> SpeechResult:
    """Feed the speech start marker, then codes from the speech head until the end marker."""
    if model.speech_head is None:
        raise ValueError(f"config {model.config.name!r} has no speech output")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    sampling = sampling or Sampling()
    state = prefill(model, batch_or_state) if isinstance(batch_or_state, Batch) else batch_or_state
    device = state.last_hidden.device
    bsz = state.last_hidden.shape[0]
    marker = torch.full((bsz,), model.speech_marker, dtype=torch.long, device=device)
    active = torch.ones(bsz, dtype=torch.bool, device=device)
    _feed(model, state, model.speech_embed(marker), active)
    codes: list[list[int]] = [[] for _ in range(bsz)]
    finished = [False] * bsz
    for step in range(max_new_tokens):
        chosen = _choose(model.speech_head(state.last_hidden), sampling, generator)
        ended = active & (chosen == model.speech_marker)
        for i in active.nonzero().flatten().tolist():
            if bool(ended[i]):
                finished[i] = True
            else:
                codes[i].append(int(chosen[i]))
        active = active & ~ended
        if step == max_new_tokens - 1 or not bool(active.any()):
            break
        _feed(model, state, model.speech_embed(torch.where(active, chosen, marker)), active)
    return SpeechResult(codes=codes, finished=finished)


@dataclass
class Block:
    """One block of an interleaved (streaming) reply: text ids or speech codes, as generated."""

    kind: str  # "text" or "speech"
    ids: list[int]  # text ids without <|im_end|>, or speech codes 0..codebook-1 without the markers


@dataclass
class _Schedule:
    """One sample's place in the streaming schedule, advanced one generated item at a time."""

    text_block: int
    speech_block: int
    max_text: int
    max_speech: int
    in_speech: bool = False  # the next item is speech
    in_block: int = 0  # items of the current block so far
    text_done: bool = False
    speech_done: bool = False
    speech_started: bool = False  # the start marker has been fed
    done: bool = False
    text_finished: bool = False  # the text ended with the stop token
    speech_finished: bool = False  # the speech ended with its end marker
    tokens: list[int] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)

    def _keep(self, kind: str, item: int) -> None:
        if not self.blocks or self.blocks[-1].kind != kind:
            self.blocks.append(Block(kind, []))
        self.blocks[-1].ids.append(item)

    def text(self, token: int, stop: bool) -> None:
        if stop:
            self.text_done = self.text_finished = True
        else:
            self.tokens.append(token)
            self._keep("text", token)
            self.text_done = len(self.tokens) >= self.max_text
        self.in_block += 1
        if self.text_done or self.in_block == self.text_block:
            self.in_block = 0
            if not self.speech_done:
                self.in_speech = True
            elif self.text_done:
                self.done = True
            # else: the speech has ended, and the text goes on unbroken

    def speech(self, code: int | None, end: bool) -> None:
        """code None: the start marker, which is fed, not chosen."""
        if code is None:
            self.speech_started = True
        elif end:
            self.speech_done = self.speech_finished = True
        else:
            self.codes.append(code)
            self._keep("speech", code)
            self.speech_done = len(self.codes) >= self.max_speech
        self.in_block += 1
        if self.speech_done:
            self.in_block, self.in_speech, self.done = 0, False, self.text_done
        elif self.in_block == self.speech_block and not self.text_done:
            self.in_block, self.in_speech = 0, False


@torch.inference_mode()
def generate_interleaved(
    model: Any,
    batch_or_state: Batch | DecodeState,
    text_block: int,
    speech_block: int,
    max_text_tokens: int = 256,
    max_speech_tokens: int = 1500,
    text_sampling: Sampling | None = None,
    speech_sampling: Sampling | None = None,
    stop_ids: list[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[TextResult, SpeechResult, list[list[Block]]]:
    """A streaming reply: `text_block` text tokens, then `speech_block` speech items, and so on.

    The schedule is the training layout's (`batch.interleave_reply`): a text block ends early at
    the stop token (`<|im_end|>`), which ends the text; from then on the speech runs to its end
    marker. The first speech item is the start marker, fed here (it counts toward the first speech
    block, as in training); a speech that ends first leaves the rest of the text to run unbroken.
    `max_text_tokens` / `max_speech_tokens` cap each stream (text tokens without the stop token,
    codes without the markers); a capped stream is unfinished.
    """
    if model.speech_head is None:
        raise ValueError(f"config {model.config.name!r} has no speech output")
    if min(max_text_tokens, max_speech_tokens, text_block, speech_block) < 1:
        raise ValueError("max_text_tokens, max_speech_tokens and the block sizes must be >= 1")
    text_sampling, speech_sampling = text_sampling or Sampling(), speech_sampling or Sampling()
    state = prefill(model, batch_or_state) if isinstance(batch_or_state, Batch) else batch_or_state
    if stop_ids is None:
        if model.special_ids is None:
            raise RuntimeError("no tokenizer bound: pass stop_ids or call model.bind_tokenizer(tokenizer)")
        stop_ids = [model.special_ids.im_end]
    stops = set(stop_ids)
    device = state.last_hidden.device
    marker = model.speech_marker
    pad_id = model.special_ids.pad if model.special_ids is not None else 0
    runs = [_Schedule(text_block, speech_block, max_text_tokens, max_speech_tokens) for _ in range(state.last_hidden.shape[0])]

    while not all(r.done for r in runs):
        # Each sample's next item: a text token, a speech code, or the start marker (fed, not chosen).
        chosen = [marker if r.in_speech else pad_id for r in runs]
        text_rows = [i for i, r in enumerate(runs) if not r.done and not r.in_speech]
        speech_rows = [i for i, r in enumerate(runs) if not r.done and r.in_speech and r.speech_started]
        heads = ((text_rows, model.lm_head, text_sampling), (speech_rows, model.speech_head, speech_sampling))
        for rows, head, sampling in heads:
            if rows:
                for i, c in zip(rows, _choose(head(state.last_hidden[rows]), sampling, generator).tolist()):
                    chosen[i] = c
        as_speech = [r.in_speech for r in runs]
        for i, r in enumerate(runs):
            if r.done:
                continue
            if not r.in_speech:
                r.text(chosen[i], stop=chosen[i] in stops)
            elif not r.speech_started:
                r.speech(None, end=False)
            else:
                r.speech(chosen[i], end=chosen[i] == marker)
        fed = torch.tensor([not r.done for r in runs], dtype=torch.bool, device=device)
        if not bool(fed.any()):
            break
        ids = torch.tensor(chosen, dtype=torch.long, device=device)
        is_speech = torch.tensor(as_speech, dtype=torch.bool, device=device)
        text_embeds = model.embed_tokens(torch.where(is_speech, pad_id, ids))
        speech_embeds = model.speech_embed(torch.where(is_speech, ids, marker)).to(text_embeds.dtype)
        _feed(model, state, torch.where(is_speech[:, None], speech_embeds, text_embeds), fed)
    tokens = [r.tokens for r in runs]
    texts = [model.tokenizer.decode(t, skip_special_tokens=False) for t in tokens] if model.tokenizer is not None else []
    return (
        TextResult(token_ids=tokens, finished=[r.text_finished for r in runs], texts=texts),
        SpeechResult(codes=[r.codes for r in runs], finished=[r.speech_finished for r in runs]),
        [r.blocks for r in runs],
    )


@torch.inference_mode()
def generate(
    model: Any,
    batch: Batch,
    mode: str = "text",
    max_text_tokens: int = 256,
    max_speech_tokens: int = 1500,
    text_sampling: Sampling | None = None,
    speech_sampling: Sampling | None = None,
    generator: torch.Generator | None = None,
    streaming: bool | None = None,
) -> Generation:
    """mode: "text" (understanding, text chat), "speech" (TTS), "text+speech" (speech-to-speech chat).

    streaming: None follows the model config (`speech_output.streaming`); True needs a config with
    a streaming layout; False answers "text+speech" as text, then speech, whatever the config.
    """
    if mode not in ("text", "speech", "text+speech"):
        raise ValueError(f"mode must be 'text', 'speech' or 'text+speech', not {mode!r}")
    speech_config = getattr(model.config, "speech_output", None)
    layout = speech_config.streaming if speech_config is not None else None
    if streaming and layout is None:
        raise ValueError(f"streaming generation needs speech_output.streaming in config {model.config.name!r}")
    interleave = mode == "text+speech" and layout is not None and streaming is not False
    was_training = model.training
    model.eval()
    try:
        state = prefill(model, batch)
        text = speech = None
        if interleave:
            text, speech, blocks = generate_interleaved(
                model, state, layout.text_tokens, layout.speech_tokens, max_text_tokens, max_speech_tokens,
                text_sampling, speech_sampling, generator=generator,
            )
            return Generation(text=text, speech=speech, blocks=blocks)
        if mode in ("text", "text+speech"):
            text, state = generate_text(
                model, state, max_text_tokens, text_sampling, generator=generator, feed_final=mode == "text+speech"
            )
        if mode in ("speech", "text+speech"):
            speech = generate_speech(model, state, max_speech_tokens, speech_sampling, generator=generator)
        return Generation(text=text, speech=speech)
    finally:
        model.train(was_training)
