"""Fidelity to Whisper, to OSUM's checkpoints and to the reference loss (issue #12).

- a freshly built encoder holds Whisper's sinusoidal position table, as a plain WhisperEncoder does;
- a strict load of an OSUM-EChat state dict with every parameter AND persistent buffer of their
  model passes (the names and shapes come from a mirror of their module tree, below);
- a LoRA config trains the rows of the special tokens, and only those rows of the embedding;
- an accumulated step over unequal micro-batches has the gradient of one batch holding them all.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from echat.model.config import config_from_dict, load_config
from echat.model.distributed import DistContext
from echat.model.osum import build_model, set_trainable, special_token_rows
from test_model_arch_support import make_batch, one_torch_thread, prompt  # noqa: F401 (autouse fixture)

REPO_ROOT = Path(__file__).resolve().parents[1]
SINGLE = DistContext(0, 1, 0, torch.device("cpu"), None)


def _tiny_dict() -> dict:
    return yaml.safe_load((REPO_ROOT / "model/configs/tiny.yaml").read_text())


def tiny_lora_config(tie_word_embeddings: bool = True):
    """tiny.yaml with a `lora:` block as model/configs/osum.yaml has (smaller r), OSUM's stage rules."""
    data = _tiny_dict()
    osum = yaml.safe_load((REPO_ROOT / "model/configs/osum.yaml").read_text())
    data["name"] = "tiny-lora"
    data["llm"]["lora"] = {**osum["llm"]["lora"], "r": 4, "alpha": 16, "dropout": 0.0}
    data["llm"]["architecture"]["tie_word_embeddings"] = tie_word_embeddings
    data["stages"] = {"understanding": ["encoder", "adapter", "speech_bounds", "lora"],
                      "generation": ["lora", "speech_embed", "speech_head"], "empathy": ["speech_head"]}
    return config_from_dict(data)


# ---------------------------------------------------------------- 1. encoder position table


@pytest.mark.parametrize("d_model, positions", [(64, 1500), (32, 200)])
def test_fresh_encoder_holds_whispers_sinusoids(d_model, positions):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids

    from echat.model.encoder import build_encoder, whisper_config

    arch = {**_tiny_dict()["encoder"]["architecture"], "d_model": d_model, "max_source_positions": positions}
    ours = build_encoder(arch).embed_positions.weight
    plain = WhisperEncoder(whisper_config(arch)).embed_positions.weight
    assert ours.shape == (positions, d_model)
    assert torch.equal(ours, plain)
    assert torch.equal(ours, sinusoids(positions, d_model))
    assert not ours.requires_grad  # and it stays frozen, as in Whisper


def test_model_encoder_table_and_a_loaded_table_is_kept(tmp_path):
    from transformers.models.whisper.modeling_whisper import sinusoids

    from echat.model.encoder import build_encoder, load_encoder

    model = build_model("tiny", tokenizer=False)
    assert torch.equal(model.encoder.embed_positions.weight, sinusoids(1500, 64))
    # A checkpoint's own table wins over the sinusoids (initialisation skips loaded tensors).
    saved = build_encoder(_tiny_dict()["encoder"]["architecture"])
    with torch.no_grad():
        saved.embed_positions.weight.add_(0.5)
    saved.save_pretrained(tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert torch.equal(loaded.embed_positions.weight, saved.embed_positions.weight)


# ---------------------------------------------------------------- 2. OSUM checkpoint names
#
# A mirror of OSUM-EChat's `LLMASR_Model` module tree (ASLP-lab/OSUM f2bcfac,
# `wenet/osum_echat/llmasr_model_instruct_version.py` with adapter_type osum_echat,
# downsample_rate 4, and the WeNet modules it builds: `transformer/encoder.py`,
# `encoder_layer.py`, `attention.py`, `positionwise_feed_forward.py`, `subsampling.py`,
# `embedding.py`, `osum_echat/downsampler.py`). Only the attribute names, the module types and the
# buffers matter: torch's state_dict() then gives every parameter and persistent buffer name.


class _EspnetPositions(nn.Module):
    """embedding.PositionalEncoding ("abs_pos"): interleaved sin/cos, buffer pe (1, max_len, d)."""

    def __init__(self, d: int, max_len: int = 5000):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
        pe = torch.zeros(max_len, d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div), torch.cos(position * div)
        self.register_buffer("pe", pe[None])


class _WhisperPositions(nn.Module):
    """embedding.WhisperPositionalEncoding ("abs_pos_whisper"): [sin | cos], buffer pe (1, 30000, d)."""

    def __init__(self, d: int, max_len: int = 30000):
        super().__init__()
        inv = torch.exp(-(math.log(10000) / (d // 2 - 1)) * torch.arange(d // 2))
        t = torch.arange(max_len)[:, None] * inv[None, :]
        self.register_buffer("pe", torch.cat([torch.sin(t), torch.cos(t)], dim=1)[None])


class _Attention(nn.Module):  # attention.MultiHeadedAttention
    def __init__(self, d: int, key_bias: bool):
        super().__init__()
        self.linear_q, self.linear_v, self.linear_out = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.linear_k = nn.Linear(d, d, bias=key_bias)
        self.dropout = nn.Dropout(0.0)


class _FeedForward(nn.Module):  # positionwise_feed_forward.PositionwiseFeedForward
    def __init__(self, d: int, units: int):
        super().__init__()
        self.w_1, self.dropout, self.w_2 = nn.Linear(d, units), nn.Dropout(0.0), nn.Linear(units, d)


class _Layer(nn.Module):  # encoder_layer.TransformerEncoderLayer
    def __init__(self, d: int, units: int, key_bias: bool):
        super().__init__()
        self.self_attn, self.feed_forward = _Attention(d, key_bias), _FeedForward(d, units)
        self.norm1, self.norm2, self.dropout = nn.LayerNorm(d), nn.LayerNorm(d), nn.Dropout(0.0)


class _Conv1dSubsampling2(nn.Module):  # subsampling.Conv1dSubsampling2 ("conv1d2")
    def __init__(self, mels: int, d: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(mels, d, 3, padding=1), nn.GELU(), nn.Conv1d(d, d, 3, 2, padding=1), nn.GELU())
        self.pos_enc = _WhisperPositions(d)


class _LinearNoSubsampling(nn.Module):  # subsampling.LinearNoSubsampling ("linear")
    def __init__(self, d: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.Dropout(0.0))
        self.pos_enc = _EspnetPositions(d)


class _TransformerEncoder(nn.Module):  # transformer.encoder.TransformerEncoder
    def __init__(self, embed: nn.Module, d: int, units: int, blocks: int, key_bias: bool):
        super().__init__()
        self.embed = embed
        self.after_norm = nn.LayerNorm(d)
        self.encoders = nn.ModuleList(_Layer(d, units, key_bias) for _ in range(blocks))


class _Downsample4(nn.Module):  # downsampler.osum_echatConv1dSubsampling4
    def __init__(self, d: int):
        super().__init__()
        pad = lambda: nn.ConstantPad1d((2, 0), 0.0)  # noqa: E731
        self.conv = nn.Sequential(pad(), nn.Conv1d(d, d, 3, 1), nn.GELU(), pad(), nn.Conv1d(d, d, 3, 2), nn.GELU(),
                                  pad(), nn.Conv1d(d, d, 3, 2), nn.GELU())


class TheirModel(nn.Module):
    """LLMASR_Model for a model config of ours: encoder from their Whisper encoder_conf (conv1d2,
    abs_pos_whisper, key_bias false), adapter and LLM as their __init__ builds them."""

    def __init__(self, cfg, speech_token_num: int = 4097):
        super().__init__()
        from peft import LoraConfig, TaskType, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        enc, ad = cfg.encoder.architecture, cfg.adapter
        d, hidden = enc["d_model"], cfg.llm_width
        self.encoder = _TransformerEncoder(_Conv1dSubsampling2(enc["num_mel_bins"], d), d, enc["encoder_ffn_dim"],
                                           enc["encoder_layers"], key_bias=False)
        self.ln_speech = nn.LayerNorm(d)
        self.speech_transformer = _TransformerEncoder(_LinearNoSubsampling(d), d, ad.ffn_dim, ad.num_blocks, key_bias=True)
        arch = dict(cfg.llm.architecture)
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch))
        if cfg.llm.lora is not None:
            lora = cfg.llm.lora
            with warnings.catch_warnings():  # peft calls a transformers API that v5 deprecates
                warnings.simplefilter("ignore", FutureWarning)
                llm = get_peft_model(llm, LoraConfig(task_type=TaskType.CAUSAL_LM, r=lora.r, lora_alpha=lora.alpha,
                                                     lora_dropout=lora.dropout, target_modules=list(lora.target_modules)))
        self.llama_model = llm
        self.down_sample_2 = _Downsample4(d)
        self.speech_llama_proj = nn.Linear(d, hidden)
        self.speech_token_emded = nn.Embedding(speech_token_num + 2, hidden)
        self.speech_head = nn.Linear(hidden, speech_token_num)


def their_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of their state dict: weights random (seeded), buffers as their code computes them."""
    torch.manual_seed(seed)
    their = TheirModel(cfg)
    with torch.no_grad():
        for p in their.parameters():
            p.normal_(0.0, 0.5)  # no tensor keeps a default init that ours could match by accident
    return {k: v.clone() for k, v in their.state_dict().items()}


def _buffers(cfg) -> set[str]:
    their = TheirModel(cfg)
    params = {n for n, _ in their.named_parameters(remove_duplicate=False)}
    return {k for k in their.state_dict() if k not in params}


@pytest.mark.parametrize("lora", [False, True], ids=["osum-echat", "lora"])
def test_strict_load_of_every_parameter_and_buffer(lora):
    from echat.model.wenet_keys import load_wenet_checkpoint

    cfg = tiny_lora_config() if lora else load_config("tiny")
    assert _buffers(cfg) == {"encoder.embed.pos_enc.pe", "speech_transformer.embed.pos_enc.pe"}
    sd = their_state_dict(cfg)
    assert sd["encoder.embed.pos_enc.pe"].shape == (1, 30000, 64)
    assert sd["speech_transformer.embed.pos_enc.pe"].shape == (1, 5000, 64)

    model = build_model(cfg)  # with the tiny tokenizer: the LoRA model has trainable token rows
    report = load_wenet_checkpoint(model, sd, strict=True)
    assert report.missing == [] and report.unmapped == []
    assert "values checked" in report.skipped["speech_transformer.embed.pos_enc.pe"]

    ours = model.state_dict()
    llm = "llm.base_model.model." if lora else "llm."
    theirs = "llama_model.base_model.model." if lora else "llama_model."
    # Their Whisper table (first 1500 rows) is our position table, and both are Whisper's sinusoids.
    assert torch.equal(ours["encoder.embed_positions.weight"], sd["encoder.embed.pos_enc.pe"][0, :1500])
    assert torch.equal(ours["encoder.embed_positions.weight"], build_model(cfg, tokenizer=False).encoder.embed_positions.weight)
    # Their adapter table is what our adapter adds (it holds none): its rows equal the positions it computes.
    from echat.model.adapter import sinusoidal_positions

    assert torch.allclose(sd["speech_transformer.embed.pos_enc.pe"][0, :40],
                          sinusoidal_positions(40, 64, torch.device("cpu"), torch.float32), atol=1e-6)
    assert torch.equal(ours["encoder.conv2.weight"], sd["encoder.embed.conv.2.weight"])
    assert torch.equal(ours["encoder.layers.1.self_attn.k_proj.weight"], sd["encoder.encoders.1.self_attn.linear_k.weight"])
    assert torch.equal(ours["adapter.convs.1.bias"], sd["down_sample_2.conv.4.bias"])
    assert torch.equal(ours["adapter.blocks.0.self_attn.in_proj_bias"],
                       torch.cat([sd[f"speech_transformer.encoders.0.self_attn.linear_{x}.bias"] for x in "qkv"]))
    assert torch.equal(ours["speech_bounds.weight"], sd["speech_token_emded.weight"][4097:])
    assert torch.equal(ours["speech_embed.weight"], sd["speech_token_emded.weight"][:4097])
    assert torch.equal(ours["speech_head.bias"], sd["speech_head.bias"])
    assert torch.equal(ours[llm + "model.norm.weight"], sd[theirs + "model.norm.weight"])
    if lora:
        assert torch.equal(ours[llm + "model.layers.1.mlp.down_proj.lora_A.default.weight"],
                           sd[theirs + "model.layers.1.mlp.down_proj.lora_A.default.weight"])
        table = sd[theirs + "model.embed_tokens.weight"]
        assert torch.equal(ours[llm + "model.embed_tokens.token_adapter.base_layer.weight"], table)
        # The trainable special-token rows start from the checkpoint's rows, so the model reads
        # exactly the checkpoint's embedding table.
        rows = special_token_rows(model.tokenizer)
        assert torch.equal(ours[llm + "model.embed_tokens.token_adapter.trainable_tokens_delta.default"], table[rows])
        assert torch.equal(model.embed_tokens(torch.arange(table.shape[0])), table)
    else:
        assert torch.equal(ours[llm + "model.embed_tokens.weight"], sd[theirs + "model.embed_tokens.weight"])


def test_adapter_table_that_is_not_their_sinusoids_is_an_error_and_bf16_passes():
    from echat.model.wenet_keys import load_wenet_checkpoint

    cfg = load_config("tiny")
    sd = their_state_dict(cfg)
    bf16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}  # a bf16 checkpoint rounds the tables
    load_wenet_checkpoint(build_model(cfg, tokenizer=False), bf16, strict=True)
    sd["speech_transformer.embed.pos_enc.pe"] = sd["speech_transformer.embed.pos_enc.pe"] + 0.01
    with pytest.raises(ValueError, match="speech_transformer.embed.pos_enc.pe differs from the sinusoidal positions"):
        load_wenet_checkpoint(build_model(cfg, tokenizer=False), sd)


# ---------------------------------------------------------------- 3. LoRA trains the special-token rows


def _chat_batch(tok):
    return make_batch(tok, [
        {"prompt": prompt("<S2TCHAT> <THINK>"), "target": "<think>calm voice<think end>Hello.<|im_end|>", "frames": 120},
        {"prompt": prompt("<TRANSCRIBE> <AGE>"), "target": "good morning <ADULT><|im_end|>", "frames": 90},
    ])


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_lora_trains_the_special_token_rows_and_no_other(tied, tmp_path):
    from echat.model import checkpoint as ckpt
    from echat.model.train import accumulate_gradients, build_optimizer, build_scheduler
    from echat.model.train_config import OptimSection

    torch.manual_seed(0)
    cfg = tiny_lora_config(tie_word_embeddings=tied)
    model = build_model(cfg)
    from echat.model.tokenizer import SPECIAL_TOKENS

    rows = special_token_rows(model.tokenizer)
    assert len(rows) == len(set(SPECIAL_TOKENS)) and model.tokenizer.convert_tokens_to_ids("<think end>") in rows

    counts = set_trainable(model, "understanding")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")}
    deltas = {n for n in trained if ".trainable_tokens_delta." in n}
    assert deltas and trained - deltas and all(".lora_" in n for n in trained - deltas)
    assert counts["lora"] == sum(p.numel() for n, p in model.named_parameters() if n in trained)
    assert counts["llm"] == 0

    vocab = model.embed_tokens.num_embeddings
    everything = torch.arange(vocab)
    with torch.no_grad():
        embed_before = model.embed_tokens(everything).clone()
        head_before = model.lm_head(torch.eye(cfg.llm_width)).clone()  # column j: row j of the head
    optim = OptimSection(lr=1e-2, warmup_steps=1, weight_decay=0.0)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, max_steps=3)
    batch = _chat_batch(model.tokenizer)
    model.train()
    for _ in range(3):
        accumulate_gradients(model, [batch], SINGLE)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    with torch.no_grad():
        embed_after = model.embed_tokens(everything)
        head_after = model.lm_head(torch.eye(cfg.llm_width))
    special = torch.zeros(vocab, dtype=torch.bool)
    special[rows] = True
    changed = (embed_after != embed_before).any(dim=1)
    assert not changed[~special].any()  # every other row of the embedding is untouched
    used = torch.unique(batch.input_ids[batch.attention_mask.bool()])
    used_special = [int(i) for i in used if special[i] and int(i) != model.special_ids.audio]  # <|audio|> is replaced
    assert used_special and all(changed[i] for i in used_special)
    head_changed = (head_after != head_before).any(dim=0)
    assert not head_changed[~special].any()
    targets = torch.unique(batch.labels[batch.labels >= 0])
    assert all(head_changed[int(i)] for i in targets if special[int(i)])  # the model learns to emit them

    # A stage without lora freezes the rows; the checkpoint keeps them and reloads them.
    set_trainable(model, "empathy")
    assert not any(p.requires_grad for n, p in model.named_parameters() if n in deltas)
    set_trainable(model, "understanding")
    # A "trainable" checkpoint holds the rows under every name the state dict gives them (a tied
    # head's rows are the embedding's, under a second name).
    delta_keys = {k for k in model.state_dict() if ".trainable_tokens_delta." in k}
    assert len(delta_keys) == 2 and delta_keys <= ckpt.weights_to_keep(model, cfg, ("lora",))
    path = ckpt.save_checkpoint(
        tmp_path, 3, model, optimizer, scheduler, SINGLE,
        ckpt.SaveInputs(train_config_yaml="{}\n", model_config=cfg, weights="full", counters={},
                        rank_state={}, tokenizer=model.tokenizer), keep_last=1)
    reloaded, _, _ = ckpt.load_for_inference(path, "cpu")
    with torch.no_grad():
        assert torch.equal(reloaded.embed_tokens(everything), embed_after)
        assert torch.equal(reloaded.lm_head(torch.eye(cfg.llm_width)), head_after)


# ---------------------------------------------------------------- 4. token-weighted accumulation


def _take(batch, index: list[int]):
    """The samples `index` of a batch as a batch of their own, trimmed to their own longest sample."""
    from echat.model.batch import Batch

    idx = torch.tensor(index)
    width = int(batch.attention_mask[idx].sum(1).max())
    frames = max(int(batch.feature_lengths[idx].max()), 1)
    codes = int(batch.speech_token_lengths[idx].max())
    return Batch(batch.features[idx][:, :, :frames], batch.feature_lengths[idx], batch.input_ids[idx][:, :width],
                 batch.attention_mask[idx][:, :width], batch.labels[idx][:, :width], batch.speech_tokens[idx][:, :codes],
                 batch.speech_token_lengths[idx], tasks=[batch.tasks[i] for i in index], keys=[batch.keys[i] for i in index])


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_accumulated_step_has_the_gradient_of_one_batch_holding_both():
    from echat.model.train import accumulate_gradients

    torch.manual_seed(0)
    model = build_model("tiny").train()  # the tiny config has no dropout: train mode is deterministic
    tok = model.tokenizer
    both = make_batch(tok, [
        {"prompt": prompt("Transcribe."), "target": "hi<|im_end|>", "frames": 60},
        {"prompt": prompt("Please transcribe the speech."), "target": "good morning to all of you, how are you today?<|im_end|>",
         "frames": 230},
        {"prompt": prompt(), "target": "I hear you, that sounds hard. Tell me more.<|im_end|>", "frames": 140,
         "codes": list(range(100, 140))},
        {"prompt": prompt("Read this: good evening", audio=False), "codes": list(range(7, 70))},
    ])
    small, large = _take(both, [0]), _take(both, [1, 2, 3])

    reference = model(both)
    reference.loss.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    totals, step_targets = accumulate_gradients(model, [small, large], SINGLE)
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    n_small = model(small).n_text_tokens + model(small).n_speech_tokens
    assert step_targets == reference.n_text_tokens + reference.n_speech_tokens and n_small < step_targets / 10
    assert float(totals[0] / step_targets) == pytest.approx(reference.loss.item(), rel=1e-5)
    assert set(got) == set(want)
    for name, grad in want.items():
        assert torch.allclose(got[name], grad, rtol=1e-4, atol=1e-7), name

    # The per-micro-batch mean it replaces weighs the small micro-batch's tokens ~10x: it differs.
    for part in (small, large):
        (model(part).loss / 2).backward()
    mean_of_means = _grads(model)
    assert not all(torch.allclose(mean_of_means[n], g, rtol=1e-2, atol=1e-6) for n, g in want.items())
