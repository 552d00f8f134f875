"""The OSUM / OSUM-EChat model: Whisper encoder -> adapter -> Qwen2-family causal LM (+ speech tokens).

Modules (and parameter groups, see `config.GROUPS`):

    encoder        WhisperSpeechEncoder (transformers WhisperEncoder, variable-length input)
    adapter        SpeechAdapter: causal Conv1d x3 (strides 1/2/2) -> 4 transformer blocks -> Linear
    speech_bounds  Embedding(2, H): row 0 begins, row 1 ends the speech frames in the sequence
    llm            AutoModelForCausalLM (Qwen2); wrapped by peft LoRA when the config has llm.lora
    speech_embed   Embedding(4097, H): CosyVoice codes 0..4095, and 4096 = the speech start/end marker
    speech_head    Linear(H, 4097): codes 0..4095, and 4096 = end of speech

How OSUM-EChat uses the speech-token ids (`llmasr_model_instruct_version.py`, `speech_token_num: 4097`):
its `speech_token_emded` is Embedding(4097 + 2, H) and `speech_head` Linear(H, 4097). Id 4096
(`speech_token_num - 1`) is the marker: the data processor wraps a reply's codes as
[4096, codes..., 4096], generation of TTS starts from the embedding of 4096, and stops at the head's
4096 (`S2SStopCriteria(speech_eos_id=speech_token_num - 1)`). Ids 4097 and 4098 are not speech
tokens: `_add_bos_eos(speech_token_num, speech_token_num + 1, ...)` embeds them before and after
the encoder frames of the user's speech. Here those two rows are their own module, `speech_bounds`
(the same parameters: 4099 x H in total), so a config without speech output (OSUM) has them too;
model/wenet_keys.py splits the reference table when loading. New rows start like the LLM's own
embeddings (normal, std = the LLM's initializer_range).

Sequence and targets (the batch contract, model/batch.py): the one `<|audio|>` token of a sample
is replaced by [begin, valid speech frames, end] (labels -100 there). When the sample has speech
targets, its reply is laid out with the speech stream [marker, codes..., marker] embedded by
`speech_embed`: after the text (its last text token is `<|im_end|>`), or, with
`speech_output.streaming`, interleaved with the reply text in blocks (6 text tokens, 18 speech
items, ...; `batch.interleave_reply`). Each item is the target of the position before it; the
final end marker is a target only. The start marker is a target only under the joint softmax
(OSUM-EChat predicts it; generation here always feeds it, which is the same token).

How targets are scored (`speech_output.joint_softmax`):

    split (False)  text targets by the LLM head over the text vocabulary, speech targets by the
                   speech head over 4097 classes: two softmaxes, two independent heads.
    joint (True)   OSUM-EChat's loss: in a sample with speech targets, every target (text and
                   speech) is scored by one softmax over [text logits ; speech logits], a speech
                   id s standing for class (text vocabulary size + s); a sample without speech
                   targets is scored by the LLM head alone, as the reference's text tasks are.
                   Text and speech then compete for probability mass at every position.

Generation switches heads by phase in both modes (text until `<|im_end|>`, then speech; or by the
streaming schedule), as the reference's decoder does: the joint softmax restricted to one part of
the vocabulary is exactly that part's own softmax, so decoding needs no change (model/generate.py).

    loss        = (sum of text CE + sum of speech CE) / (text targets + speech targets)
                  (a token-level mean, as the reference's single mean CE over all targets)
    text_loss   = mean CE over text targets      (None when the batch has none)
    speech_loss = mean CE over speech targets    (None when the batch has none)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from echat.model.adapter import SpeechAdapter
from echat.model.batch import IGNORE_INDEX, Batch, interleave_reply
from echat.model.config import GROUPS, STAGES, ModelConfig, load_config
from echat.model.encoder import WhisperSpeechEncoder, build_encoder, load_encoder, padding_mask

# Whisper's sinusoidal position table is fixed (a buffer in OpenAI's and WeNet's code): never trained.
ALWAYS_FROZEN = ("encoder.embed_positions.weight",)


@dataclass
class OSUMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    speech_loss: torch.Tensor | None = None
    n_text_tokens: int | None = None  # text targets in the batch
    n_speech_tokens: int | None = None  # speech targets in the batch
    logits: torch.Tensor | None = None  # (B, L', vocab) when forward(return_logits=True)
    speech_logits: torch.Tensor | None = None  # (B, L', codebook + 1), speech-output configs only


@dataclass
class Assembled:
    """The LLM input of a batch after splicing: everything right-padded to the longest sample."""

    embeds: torch.Tensor  # (B, L', H)
    attention_mask: torch.Tensor  # (B, L') int64
    lengths: torch.Tensor  # (B,)
    text_targets: torch.Tensor  # (B, L'): the text id the hidden state at each position predicts, or -100
    speech_targets: torch.Tensor  # (B, L'): the speech id it predicts (0..codebook), or -100
    joint: torch.Tensor  # (B,) bool: the sample's targets are scored by the joint softmax


class OSUMEChatModel(nn.Module):
    def __init__(self, config: ModelConfig, encoder: WhisperSpeechEncoder, adapter: SpeechAdapter, llm: nn.Module):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.adapter = adapter
        self.llm = llm
        hidden = config.llm_width
        self.speech_bounds = nn.Embedding(2, hidden)
        self.codebook_size = config.speech_output.codebook_size if config.speech_output else 0
        if config.speech_output is not None:
            self.speech_embed = nn.Embedding(self.codebook_size + 1, hidden)
            self.speech_head = nn.Linear(hidden, self.codebook_size + 1)
        else:
            self.speech_embed = None
            self.speech_head = None
        self._init_new_modules()
        self.tokenizer: Any = None
        self.special_ids = None  # tokenizer.SpecialTokenIds, set by bind_tokenizer

    # ------------------------------------------------------------ structure

    @property
    def speech_marker(self) -> int:
        """The speech start/end id (4096 for CosyVoice's 4096 codes)."""
        return self.codebook_size

    @property
    def causal_lm(self) -> nn.Module:
        """The transformers causal LM inside (under the peft wrapper when LoRA is on)."""
        get_base = getattr(self.llm, "get_base_model", None)
        return get_base() if callable(get_base) else self.llm

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.model

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.causal_lm.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    def _init_new_modules(self) -> None:
        std = float(getattr(self.causal_lm.config, "initializer_range", 0.02))
        with torch.no_grad():
            for module in (self.speech_bounds, self.speech_embed):
                if module is not None and module.weight.device.type != "meta":
                    module.weight.normal_(0.0, std)
            if self.speech_head is not None and self.speech_head.weight.device.type != "meta":
                self.speech_head.weight.normal_(0.0, std)
                self.speech_head.bias.zero_()

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Remember the tokenizer and the special ids the splice and generation need."""
        from echat.model.tokenizer import special_token_ids

        rows = self.embed_tokens.num_embeddings
        if len(tokenizer) > rows:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the LLM only {rows} embedding rows")
        self.tokenizer = tokenizer
        self.special_ids = special_token_ids(tokenizer)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        self.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.config.llm.lora is not None:
            # Frozen embeddings under LoRA: inputs must require grad for checkpointed blocks to backprop.
            self.causal_lm.enable_input_require_grads()

    # ------------------------------------------------------------ speech input

    def encode_speech(self, features: torch.Tensor, feature_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, n_mels, T) log-mel -> ((b, T', H) LLM-width speech embeddings at 12.5 Hz, (b,) valid lengths)."""
        max_len = int(feature_lengths.max())
        frames, lengths = self.encoder(features[:, :, :max_len], feature_lengths)
        return self.adapter(frames, lengths)

    # ------------------------------------------------------------ splicing

    def assemble(self, batch: Batch, with_speech_targets: bool = True) -> Assembled:
        """Splice speech into the token embeddings and lay out the text and speech targets."""
        device = self.embed_tokens.weight.device
        input_ids = batch.input_ids.to(device)
        attention = batch.attention_mask.to(device).bool()
        labels = batch.labels.to(device)
        feature_lengths = batch.feature_lengths.to(device)
        bsz, width = input_ids.shape
        lengths = attention.sum(1)
        if not torch.equal(attention, padding_mask(lengths, width)):
            raise ValueError("attention_mask must be right-padded: ones for the tokens, then zeros")
        if bool((lengths == 0).any()):
            raise ValueError("every sample needs at least one token")
        rows = self.embed_tokens.num_embeddings
        real_ids = input_ids[attention]
        if bool((real_ids < 0).any()) or bool((real_ids >= rows).any()):
            raise ValueError(f"input_ids must be in 0..{rows - 1}")
        real_labels = labels[attention]
        if bool(((real_labels != IGNORE_INDEX) & ((real_labels < 0) | (real_labels >= rows))).any()):
            raise ValueError(f"labels must be {IGNORE_INDEX} or in 0..{rows - 1}")

        has_speech = feature_lengths > 0
        speech_rows: dict[int, torch.Tensor] = {}
        if bool(has_speech.any()):
            if self.special_ids is None:
                raise RuntimeError("no tokenizer bound: call model.bind_tokenizer(tokenizer) (build_model does)")
            idx = has_speech.nonzero().flatten()
            speech, speech_lengths = self.encode_speech(batch.features.to(device)[idx], feature_lengths[idx])
            for k, i in enumerate(idx.tolist()):
                speech_rows[i] = speech[k, : int(speech_lengths[k])]
        audio_id = self.special_ids.audio if self.special_ids is not None else None

        text_embeds = self.embed_tokens(input_ids.masked_fill(~attention, 0))
        bounds = self.speech_bounds.weight.to(text_embeds.dtype)
        n_codes = batch.speech_token_lengths.to(device) if with_speech_targets else torch.zeros(bsz, dtype=torch.long, device=device)
        speech_tokens = batch.speech_tokens.to(device)
        ignore = lambda n: torch.full((n,), IGNORE_INDEX, dtype=torch.long, device=device)  # noqa: E731

        seq_embeds, seq_text, seq_speech, seq_joint = [], [], [], []
        for i in range(bsz):
            n = int(lengths[i])
            ids, emb, lab = input_ids[i, :n], text_embeds[i, :n], labels[i, :n]
            where = (ids == audio_id).nonzero().flatten() if audio_id is not None else ids[:0]
            if i in speech_rows:
                if len(where) != 1:
                    raise ValueError(f"sample {i} has speech input but {len(where)} <|audio|> tokens (needs exactly 1)")
                p, sp = int(where[0]), speech_rows[i].to(emb.dtype)
                parts = [emb[:p], bounds[0:1], sp, bounds[1:2], emb[p + 1:]]
                labs = [lab[:p], ignore(sp.shape[0] + 2), lab[p + 1:]]
            else:
                if len(where):
                    raise ValueError(f"sample {i} has an <|audio|> token but feature_lengths 0")
                parts, labs = [emb], [lab]
            # Per input position: the text label and the speech label it carries (at most one of them
            # is set); `final` is the target after the last input (the speech end marker).
            embeds, text_labels = torch.cat(parts), torch.cat(labs)
            speech_labels, final = ignore(embeds.shape[0]), IGNORE_INDEX
            s = int(n_codes[i])
            if s > 0:
                if self.speech_embed is None:
                    raise ValueError(f"sample {i} has speech-token targets but config {self.config.name!r} has no speech output")
                codes = speech_tokens[i, :s]
                if bool(((codes < 0) | (codes >= self.codebook_size)).any()):
                    raise ValueError(f"sample {i}: speech tokens must be in 0..{self.codebook_size - 1}")
                embeds, text_labels, speech_labels, final = self._lay_out_reply(embeds, text_labels, codes)
            # Next-item targets: the hidden state at t predicts the item at t + 1.
            seq_embeds.append(embeds)
            seq_text.append(torch.cat([text_labels[1:], ignore(1)]))
            seq_speech.append(torch.cat([speech_labels[1:], torch.full((1,), final, dtype=torch.long, device=device)]))
            seq_joint.append(s > 0 and self.joint_softmax)

        out_lengths = torch.tensor([e.shape[0] for e in seq_embeds], device=device)
        pad = nn.utils.rnn.pad_sequence
        return Assembled(
            embeds=pad(seq_embeds, batch_first=True),
            attention_mask=padding_mask(out_lengths, int(out_lengths.max())).long(),
            lengths=out_lengths,
            text_targets=pad(seq_text, batch_first=True, padding_value=IGNORE_INDEX),
            speech_targets=pad(seq_speech, batch_first=True, padding_value=IGNORE_INDEX),
            joint=torch.tensor(seq_joint, dtype=torch.bool, device=device),
        )

    def _lay_out_reply(
        self, embeds: torch.Tensor, text_labels: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """Add the speech stream [marker, codes..., marker] to one sample's text (the batch contract).

        Returns the input embeddings, the text and speech label of each input, and the target
        after the last input. Without streaming the stream follows all the text; with it, the
        reply's text (after any reasoning) and the stream interleave (`batch.interleave_reply`).
        """
        device = embeds.device
        marker = torch.full((1,), self.speech_marker, dtype=torch.long, device=device)
        stream = torch.cat([marker, codes, marker])
        stream_labels = stream.clone()
        if not self.joint_softmax:
            stream_labels[0] = IGNORE_INDEX  # the start marker is fed by generation, not predicted
        stream_embeds = self.speech_embed(stream).to(embeds.dtype)
        start = self._interleave_start(text_labels)
        n_text, n_stream = embeds.shape[0] - start, stream.shape[0]
        layout = self.config.speech_output.streaming
        if start < embeds.shape[0] and layout is not None:
            order = interleave_reply(n_text, n_stream, layout.text_tokens, layout.speech_tokens)
        else:
            order = [False] * n_text + [True] * n_stream
        # Gather the reply's items (text first in `body`, then the stream) in their layout order.
        index, next_text, next_speech = [], 0, n_text
        for is_speech in order:
            if is_speech:
                index.append(next_speech)
                next_speech += 1
            else:
                index.append(next_text)
                next_text += 1
        final = IGNORE_INDEX
        if order[-1]:  # the end marker comes last: it is a target, never an input
            final, index = int(stream_labels[-1]), index[:-1]
        index_t = torch.tensor(index, dtype=torch.long, device=device)
        ignore = lambda n: torch.full((n,), IGNORE_INDEX, dtype=torch.long, device=device)  # noqa: E731
        body_embeds = torch.cat([embeds[start:], stream_embeds])[index_t]
        body_text = torch.cat([text_labels[start:], ignore(n_stream)])[index_t]
        body_speech = torch.cat([ignore(n_text), stream_labels])[index_t]
        return (
            torch.cat([embeds[:start], body_embeds]),
            torch.cat([text_labels[:start], body_text]),
            torch.cat([ignore(start), body_speech]),
            final,
        )

    def _interleave_start(self, text_labels: torch.Tensor) -> int:
        """Where the speech stream joins the text: the end of the text without streaming; with it,
        the first reply token after any `<think>...<think end>` reasoning (which is never spoken).
        A sample with no labelled text (<TEXT2TOKEN>) has no reply text: the end, too."""
        total = text_labels.shape[0]
        if self.config.speech_output.streaming is None:
            return total
        labelled = (text_labels != IGNORE_INDEX).nonzero().flatten()
        if len(labelled) == 0:
            return total
        start = int(labelled[0])
        end_ids = self._think_end_ids()
        width = len(end_ids)
        reply = text_labels[start:]
        if width and reply.shape[0] >= width:
            pattern = torch.tensor(end_ids, dtype=reply.dtype, device=reply.device)
            hits = (reply.unfold(0, width, 1) == pattern).all(1).nonzero().flatten()
            if len(hits):
                start += int(hits[0]) + width
        return start

    def _think_end_ids(self) -> list[int]:
        """The token ids of `<think end>`: one special token in our tokenizers, several ordinary
        ones in OSUM's (its streaming code looks for that run of ids the same way)."""
        if self.special_ids is None:
            return []
        if self.special_ids.think_end is not None:
            return [self.special_ids.think_end]
        from echat.schemas.reasoning import THINK_END

        return list(self.tokenizer(THINK_END, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------ forward

    @property
    def joint_softmax(self) -> bool:
        """Whether speech samples are scored by one softmax over [text vocabulary ; speech ids]."""
        return bool(self.config.speech_output is not None and self.config.speech_output.joint_softmax)

    @property
    def text_vocab_size(self) -> int:
        """Classes of the LLM head: a speech id s is class text_vocab_size + s of the joint softmax."""
        return int(self.lm_head.weight.shape[0])

    def joint_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[text logits ; speech logits] over the last dimension: the joint softmax's classes."""
        return torch.cat([self.lm_head(hidden), self.speech_head(hidden)], dim=-1)

    def forward(self, batch: Batch, return_logits: bool = False) -> OSUMOutput:
        inputs = self.assemble(batch)
        hidden = self.decoder(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, use_cache=False
        ).last_hidden_state

        text_mask = inputs.text_targets != IGNORE_INDEX
        speech_mask = inputs.speech_targets != IGNORE_INDEX
        n_text, n_speech = int(text_mask.sum()), int(speech_mask.sum())
        joint_mask = inputs.joint[:, None] & (text_mask | speech_mask)
        ce = nn.functional.cross_entropy
        text_sum = speech_sum = None
        split_text, split_speech = text_mask & ~joint_mask, speech_mask & ~joint_mask
        if bool(split_text.any()):
            logits = self.lm_head(hidden[split_text]).float()
            text_sum = ce(logits, inputs.text_targets[split_text], reduction="sum")
        if bool(split_speech.any()):
            logits = self.speech_head(hidden[split_speech]).float()
            speech_sum = ce(logits, inputs.speech_targets[split_speech], reduction="sum")
        if bool(joint_mask.any()):
            is_speech = speech_mask[joint_mask]
            targets = torch.where(
                is_speech, inputs.speech_targets[joint_mask] + self.text_vocab_size, inputs.text_targets[joint_mask]
            )
            per_target = ce(self.joint_logits(hidden[joint_mask]).float(), targets, reduction="none")
            text_sum = _add(text_sum, per_target[~is_speech].sum() if bool((~is_speech).any()) else None)
            speech_sum = _add(speech_sum, per_target[is_speech].sum() if bool(is_speech.any()) else None)
        if n_text + n_speech:
            total = sum(x for x in (text_sum, speech_sum) if x is not None)
            loss = total / (n_text + n_speech)
        else:
            loss = hidden.sum() * 0.0  # nothing to learn in this batch; keeps the graph for backward
        out = OSUMOutput(
            loss=loss,
            text_loss=text_sum / n_text if n_text else None,
            speech_loss=speech_sum / n_speech if n_speech else None,
            n_text_tokens=n_text,
            n_speech_tokens=n_speech,
        )
        if return_logits:
            out.logits = self.lm_head(hidden)
            if self.speech_head is not None:
                out.speech_logits = self.speech_head(hidden)
        return out


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Sum of two partial losses, either of which may be absent."""
    if a is None:
        return b
    return a if b is None else a + b


# ---------------------------------------------------------------- building


def _llm_config(architecture: dict[str, Any]):
    from transformers import AutoConfig

    arch = dict(architecture)
    return AutoConfig.for_model(arch.pop("model_type"), **arch)


def check_architecture(loaded: Any, expected: dict[str, Any], where: str) -> None:
    """Every field the YAML gives must match the checkpoint's config (rope dicts: given sub-keys)."""
    wrong = []
    for key, want in expected.items():
        have = getattr(loaded, key, None)
        if isinstance(want, dict) and isinstance(have, dict):
            if any(have.get(k) != v for k, v in want.items()):
                wrong.append(f"{key}: config {want}, checkpoint {have}")
        elif have != want:
            wrong.append(f"{key}: config {want!r}, checkpoint {have!r}")
    if wrong:
        raise ValueError(f"{where} checkpoint does not match the model config: " + "; ".join(wrong))


def special_token_rows(tokenizer: Any) -> list[int]:
    """The embedding rows of the special tokens the tokenizer carries for its prompt profile
    (tokenizer.profile_special_tokens: SPECIAL_TOKENS under `echat`): the rows a LoRA config trains
    (`llm.lora.trainable_tokens`). Every one of them is read or emitted in the prompts; the ones a
    pretrained LLM lacks (<|audio|>, <think end>, task tags) start as untrained spare rows. Derived
    from the token strings, so a checkpoint's saved tokenizer gives the rows it was trained with."""
    from echat.model.tokenizer import profile_special_tokens

    rows = []
    for token in profile_special_tokens(tokenizer):
        row = tokenizer.convert_tokens_to_ids(token)
        if row is None or tokenizer.convert_ids_to_tokens(row) != token:
            raise ValueError(f"tokenizer lacks the special token {token!r} (load it with tokenizer.load_tokenizer)")
        rows.append(int(row))
    return sorted(set(rows))


def _trainable_token_targets(llm: nn.Module, rows: list[int]) -> dict[str, list[int]]:
    """peft's `trainable_token_indices` for the LLM's input embedding and its LM head (by module
    name). With tied weights peft ties the head's rows to the embedding's; untied, the head gets its
    own trainable rows, which is what lets the model emit the tokens."""
    names = {id(module): name for name, module in llm.named_modules()}
    targets = {names[id(llm.get_input_embeddings())]: list(rows)}
    head = llm.get_output_embeddings()
    if head is not None and id(head) in names:
        targets[names[id(head)]] = list(rows)
    return targets


def _expose_table_size(llm: nn.Module) -> None:
    """peft's trainable-token wrapper forwards only `weight` of the table it wraps; the model also
    reads `num_embeddings` / `embedding_dim` (bind_tokenizer, assemble), so give the wrapper them."""
    embed = llm.get_input_embeddings()
    base = getattr(getattr(embed, "token_adapter", None), "base_layer", None)
    if base is not None:
        embed.num_embeddings, embed.embedding_dim = base.num_embeddings, base.embedding_dim


def _build_parts(
    cfg: ModelConfig, load_weights: bool, dtype: torch.dtype, token_rows: list[int] | None = None
) -> OSUMEChatModel:
    """The model's modules. token_rows: the special-token rows a LoRA config trains (None: none)."""
    from transformers import AutoModelForCausalLM

    if load_weights and cfg.encoder.name_or_path:
        encoder = load_encoder(cfg.encoder.name_or_path, dtype=dtype)
        check_architecture(encoder.config, cfg.encoder.architecture, f"encoder {cfg.encoder.name_or_path}")
    else:
        encoder = build_encoder(cfg.encoder.architecture)

    adapter = SpeechAdapter(
        cfg.encoder_width, cfg.llm_width,
        conv_kernel=cfg.adapter.conv_kernel, conv_strides=cfg.adapter.conv_strides,
        num_blocks=cfg.adapter.num_blocks, attention_heads=cfg.adapter.attention_heads,
        ffn_dim=cfg.adapter.ffn_dim, dropout=cfg.adapter.dropout, attention_dropout=cfg.adapter.attention_dropout,
    )

    if load_weights and cfg.llm.name_or_path:
        llm = AutoModelForCausalLM.from_pretrained(cfg.llm.name_or_path, dtype=dtype)
        check_architecture(llm.config, cfg.llm.architecture, f"llm {cfg.llm.name_or_path}")
    else:
        llm = AutoModelForCausalLM.from_config(_llm_config(cfg.llm.architecture), dtype=dtype)
    if cfg.llm.lora is not None:
        from peft import LoraConfig, TaskType, get_peft_model

        lora = cfg.llm.lora
        token_targets = _trainable_token_targets(llm, token_rows) if lora.trainable_tokens and token_rows else None
        with warnings.catch_warnings():  # peft calls a transformers API that v5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            llm = get_peft_model(llm, LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules), trainable_token_indices=token_targets,
            ))
        if token_targets:
            _expose_table_size(llm)
    return OSUMEChatModel(cfg, encoder, adapter, llm).to(dtype)


def build_model(
    config: ModelConfig | str | Path,
    device: str | torch.device = "cpu",
    load_weights: bool = False,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
) -> OSUMEChatModel:
    """Build the model a config describes.

    device="meta": no memory, no weights, seconds even for 7B (parameter counting).
    load_weights=True: the encoder and LLM load from their `name_or_path` (hub id or local path;
    a part without one is randomly initialised), then `checkpoint` (if the config has one) is laid
    over the whole model. Otherwise every part is randomly initialised.
    tokenizer: None loads the config's tokenizer and binds it (not on meta); False binds none;
    or a tokenizer object to bind. A LoRA config with `trainable_tokens` trains the rows of the
    tokenizer's special tokens (special_token_rows), so the tokenizer shapes the model: built
    without one (tokenizer=False, or on meta) it has no trainable token rows.
    """
    cfg = load_config(config)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or getattr(torch, cfg.dtype)
    if str(device) == "meta":
        if load_weights:
            raise ValueError("load_weights=True cannot build on the meta device")
        with torch.device("meta"):
            return _build_parts(cfg, load_weights=False, dtype=dtype)
    if tokenizer is None:
        from echat.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg)
    token_rows = special_token_rows(tokenizer) if tokenizer is not False and cfg.llm.lora is not None else None
    model = _build_parts(cfg, load_weights=load_weights, dtype=dtype, token_rows=token_rows)
    if load_weights and cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint.path, cfg.checkpoint.format)
    if tokenizer is not False:
        model.bind_tokenizer(tokenizer)
    return model.to(device)


HUB_PREFIX = "hf://"


def resolve_checkpoint_file(path: str) -> Path:
    """A local file, or a file in a Hugging Face Hub repository: `hf://owner/repo/path/in/repo`,
    or `owner/repo/path/in/repo` when no local folder `owner` exists.

    A relative path whose first folder exists here is a local path, so a mistyped local checkpoint
    is a not-found error, not a hub download of something else.
    """
    if path.startswith(HUB_PREFIX):
        return _hub_file(path[len(HUB_PREFIX):], path)
    local = Path(path)
    if local.is_file():
        return local
    parts = path.split("/")
    hub_shaped = len(parts) >= 3 and not local.is_absolute()
    if hub_shaped and not Path(parts[0]).exists():
        return _hub_file(path, path)
    why = f"read as a local path because the folder {parts[0]!r} exists here" if hub_shaped else "no such local file"
    raise FileNotFoundError(
        f"checkpoint not found: {path} ({why}; for a file on the Hugging Face Hub write {HUB_PREFIX}owner/repo/path/in/repo)"
    )


def _hub_file(spec: str, given: str) -> Path:
    parts = [p for p in spec.split("/") if p]
    if len(parts) < 3:
        raise FileNotFoundError(f"checkpoint {given}: a hub file is owner/repo/path/in/repo")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id="/".join(parts[:2]), filename="/".join(parts[2:])))


def load_checkpoint(model: OSUMEChatModel, path: str | Path, fmt: str = "wenet") -> Any:
    """Lay a whole-model checkpoint over `model`: OSUM's WeNet names, or our own state dict."""
    file = resolve_checkpoint_file(str(path))
    if fmt == "wenet":
        from echat.model.wenet_keys import load_wenet_checkpoint

        return load_wenet_checkpoint(model, file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=True)
    return result


# ---------------------------------------------------------------- parameter groups and stages


def _unwrap(model: nn.Module) -> OSUMEChatModel:
    """The OSUMEChatModel itself, under a DDP wrapper if there is one (distributed.unwrap)."""
    from echat.model.distributed import unwrap

    inner = unwrap(model)
    if not isinstance(inner, OSUMEChatModel):
        raise TypeError(f"expected an OSUMEChatModel (or a DDP wrapper of one), got {type(model).__name__}")
    return inner


# peft's adapter parameters inside the LLM: LoRA matrices and the trainable special-token rows.
# Both are group `lora`: they train together, and the pretrained LLM does not hold them.
_LLM_ADAPTER_MARKS = (".lora_", ".trainable_tokens_delta.")


def group_of(name: str) -> str:
    """The parameter group (config.GROUPS) of a parameter name of OSUMEChatModel."""
    top = name.split(".", 1)[0]
    if top == "llm":
        return "lora" if any(mark in name for mark in _LLM_ADAPTER_MARKS) else "llm"
    if top in GROUPS:
        return top
    raise ValueError(f"parameter {name!r} belongs to no group")


def named_parameters_by_group(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters per group, each tensor once (tied embeddings count once, under `llm`)."""
    model = _unwrap(model)
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {g: [] for g in GROUPS}
    for name, param in model.named_parameters():  # named_parameters() already skips tied duplicates
        groups[group_of(name)].append((name, param))
    return groups


def count_parameters(model: nn.Module) -> dict[str, int]:
    return {g: sum(p.numel() for _, p in params) for g, params in named_parameters_by_group(model).items()}


def trainable_names(model: nn.Module, stage: str) -> list[str]:
    model = _unwrap(model)
    if stage not in STAGES:
        raise ValueError(f"unknown training stage {stage!r}; known: {', '.join(STAGES)}")
    wanted = set(model.config.stages[stage])
    return [
        name
        for group, params in named_parameters_by_group(model).items()
        if group in wanted
        for name, _ in params
        if name not in ALWAYS_FROZEN
    ]


def set_trainable(model: nn.Module, stage: str) -> dict[str, int]:
    """Freeze everything, then unfreeze the groups the config's `stages[stage]` names.

    Returns trainable parameters per group. The Whisper position table always stays frozen.
    """
    inner = _unwrap(model)
    names = set(trainable_names(inner, stage))
    counts = {g: 0 for g in GROUPS}
    for group, params in named_parameters_by_group(inner).items():
        for name, param in params:
            param.requires_grad_(name in names)
            if name in names:
                counts[group] += param.numel()
    return counts


def trainable_per_stage(model: nn.Module) -> dict[str, int]:
    """Trainable parameter count of every stage, without touching requires_grad."""
    inner = _unwrap(model)
    sizes = {name: p.numel() for name, p in inner.named_parameters()}
    return {stage: sum(sizes[n] for n in trainable_names(inner, stage)) for stage in STAGES}


def describe(config: ModelConfig | str | Path) -> dict[str, Any]:
    """Build on the meta device and report parameters per group, total and trainable per stage."""
    cfg = load_config(config)
    started = time.perf_counter()
    model = build_model(cfg, device="meta")
    seconds = time.perf_counter() - started
    counts = count_parameters(model)
    return {
        "name": cfg.name,
        "description": cfg.description,
        "dtype": cfg.dtype,
        "parameters": counts,
        "total": sum(counts.values()),
        "trainable": trainable_per_stage(model),
        "build_seconds": round(seconds, 2),
    }
