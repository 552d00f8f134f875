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
targets, [marker, codes...] embedded by `speech_embed` follow its last text token (`<|im_end|>`),
and the speech head learns to predict [codes..., marker] at those positions. Text is scored by the
LLM's head over its vocabulary, speech by the speech head over 4097 classes (the reference scores
both with one softmax over the concatenated vocabularies; separate softmaxes keep the heads
independent, and generation switches from text to speech at `<|im_end|>`).

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
from echat.model.batch import IGNORE_INDEX, Batch
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

        seq_embeds, seq_text, seq_speech = [], [], []
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
            speech_target = None
            s = int(n_codes[i])
            if s > 0:
                if self.speech_embed is None:
                    raise ValueError(f"sample {i} has speech-token targets but config {self.config.name!r} has no speech output")
                codes = speech_tokens[i, :s]
                if bool(((codes < 0) | (codes >= self.codebook_size)).any()):
                    raise ValueError(f"sample {i}: speech tokens must be in 0..{self.codebook_size - 1}")
                marker = torch.full((1,), self.speech_marker, dtype=torch.long, device=device)
                parts.append(self.speech_embed(torch.cat([marker, codes])).to(emb.dtype))
                labs.append(ignore(s + 1))
                speech_target = torch.cat([codes, marker])
            embeds = torch.cat(parts)
            total = embeds.shape[0]
            # Next-token targets: the hidden state at t predicts the label at t + 1.
            text_target = torch.cat([torch.cat(labs)[1:], ignore(1)])
            speech_full = ignore(total)
            if speech_target is not None:
                speech_full[total - speech_target.shape[0]:] = speech_target
            seq_embeds.append(embeds)
            seq_text.append(text_target)
            seq_speech.append(speech_full)

        out_lengths = torch.tensor([e.shape[0] for e in seq_embeds], device=device)
        pad = nn.utils.rnn.pad_sequence
        return Assembled(
            embeds=pad(seq_embeds, batch_first=True),
            attention_mask=padding_mask(out_lengths, int(out_lengths.max())).long(),
            lengths=out_lengths,
            text_targets=pad(seq_text, batch_first=True, padding_value=IGNORE_INDEX),
            speech_targets=pad(seq_speech, batch_first=True, padding_value=IGNORE_INDEX),
        )

    # ------------------------------------------------------------ forward

    def forward(self, batch: Batch, return_logits: bool = False) -> OSUMOutput:
        inputs = self.assemble(batch)
        hidden = self.decoder(
            inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask, use_cache=False
        ).last_hidden_state

        text_mask = inputs.text_targets != IGNORE_INDEX
        speech_mask = inputs.speech_targets != IGNORE_INDEX
        n_text, n_speech = int(text_mask.sum()), int(speech_mask.sum())
        ce = nn.functional.cross_entropy
        text_sum = speech_sum = None
        if n_text:
            logits = self.lm_head(hidden[text_mask]).float()
            text_sum = ce(logits, inputs.text_targets[text_mask], reduction="sum")
        if n_speech:
            logits = self.speech_head(hidden[speech_mask]).float()
            speech_sum = ce(logits, inputs.speech_targets[speech_mask], reduction="sum")
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


def _build_parts(cfg: ModelConfig, load_weights: bool, dtype: torch.dtype) -> OSUMEChatModel:
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
        with warnings.catch_warnings():  # peft calls a transformers API that v5 deprecates
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            llm = get_peft_model(llm, LoraConfig(
                task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules),
            ))
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
    or a tokenizer object to bind.
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
    model = _build_parts(cfg, load_weights=load_weights, dtype=dtype)
    if load_weights and cfg.checkpoint is not None:
        load_checkpoint(model, cfg.checkpoint.path, cfg.checkpoint.format)
    if tokenizer is None:
        from echat.model.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(cfg)
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


def group_of(name: str) -> str:
    """The parameter group (config.GROUPS) of a parameter name of OSUMEChatModel."""
    top = name.split(".", 1)[0]
    if top == "llm":
        return "lora" if ".lora_" in name else "llm"
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
