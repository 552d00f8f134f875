"""Loading OSUM / OSUM-EChat checkpoints that carry WeNet module names.

The synthetic checkpoints below are written from the reference model code (ASLP-lab/OSUM,
`llmasr_model_instruct_version.py` and WeNet's TransformerEncoder / Whisper conversion): their
key names and shapes, for the tiny config's sizes, with random values. The expectations say, in
their terms, where each tensor must land; they do not reuse the mapping code.
"""

from __future__ import annotations

import math

import pytest
import torch

from echat.model.config import config_from_dict, load_config
from echat.model.osum import build_model
from echat.model.wenet_keys import load_wenet_checkpoint
from test_model_arch_support import one_torch_thread  # noqa: F401 (autouse fixture)

SPEECH_TOKEN_NUM = 4097  # their config: 4096 codes + 1


def wenet_state_dict(cfg, lora: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """An LLMASR_Model state dict (their names and shapes) for the sizes of `cfg`."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def t(name, *shape):
        sd[name] = torch.randn(*shape, generator=g)

    enc = cfg.encoder.architecture
    d, ffn, mels = enc["d_model"], enc["encoder_ffn_dim"], enc["num_mel_bins"]
    t("encoder.embed.conv.0.weight", d, mels, 3); t("encoder.embed.conv.0.bias", d)
    t("encoder.embed.conv.2.weight", d, d, 3); t("encoder.embed.conv.2.bias", d)
    t("encoder.embed.pos_enc.pe", 1, enc["max_source_positions"], d)
    for n in range(enc["encoder_layers"]):
        p = f"encoder.encoders.{n}."
        for lin in ("linear_q", "linear_v", "linear_out"):
            t(p + f"self_attn.{lin}.weight", d, d); t(p + f"self_attn.{lin}.bias", d)
        t(p + "self_attn.linear_k.weight", d, d)  # key_bias: false in their encoder_conf
        t(p + "feed_forward.w_1.weight", ffn, d); t(p + "feed_forward.w_1.bias", ffn)
        t(p + "feed_forward.w_2.weight", d, ffn); t(p + "feed_forward.w_2.bias", d)
        for norm in ("norm1", "norm2"):
            t(p + f"{norm}.weight", d); t(p + f"{norm}.bias", d)
    t("encoder.after_norm.weight", d); t("encoder.after_norm.bias", d)
    t("ln_speech.weight", d); t("ln_speech.bias", d)

    ad, hidden = cfg.adapter, cfg.llm_width
    for i in (1, 4, 7):  # Sequential(pad, conv, GELU) x 3
        t(f"down_sample_2.conv.{i}.weight", d, d, 3); t(f"down_sample_2.conv.{i}.bias", d)
    t("speech_transformer.embed.out.0.weight", d, d); t("speech_transformer.embed.out.0.bias", d)
    t("speech_transformer.embed.out.1.weight", d); t("speech_transformer.embed.out.1.bias", d)
    for n in range(ad.num_blocks):
        p = f"speech_transformer.encoders.{n}."
        for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
            t(p + f"self_attn.{lin}.weight", d, d); t(p + f"self_attn.{lin}.bias", d)
        t(p + "feed_forward.w_1.weight", ad.ffn_dim, d); t(p + "feed_forward.w_1.bias", ad.ffn_dim)
        t(p + "feed_forward.w_2.weight", d, ad.ffn_dim); t(p + "feed_forward.w_2.bias", d)
        for norm in ("norm1", "norm2"):
            t(p + f"{norm}.weight", d); t(p + f"{norm}.bias", d)
    t("speech_transformer.after_norm.weight", d); t("speech_transformer.after_norm.bias", d)
    t("speech_llama_proj.weight", hidden, d); t("speech_llama_proj.bias", hidden)

    a = cfg.llm.architecture
    inter, vocab = a["intermediate_size"], a["vocab_size"]
    kv = a["num_key_value_heads"] * hidden // a["num_attention_heads"]
    root = "llama_model.base_model.model." if lora else "llama_model."
    t(root + "model.embed_tokens.weight", vocab, hidden)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    targets = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    for n in range(a["num_hidden_layers"]):
        p = f"{root}model.layers.{n}."
        for mod, (out_f, in_f) in shapes.items():
            wrapped = lora and mod in targets
            t(p + mod + (".base_layer.weight" if wrapped else ".weight"), out_f, in_f)
            if mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                t(p + mod + (".base_layer.bias" if wrapped else ".bias"), out_f)
            if wrapped:
                r = cfg.llm.lora.r
                t(p + mod + ".lora_A.default.weight", r, in_f); t(p + mod + ".lora_B.default.weight", out_f, r)
        t(p + "input_layernorm.weight", hidden); t(p + "post_attention_layernorm.weight", hidden)
    t(root + "model.norm.weight", hidden)
    sd[root + "lm_head.weight"] = sd[root + "model.embed_tokens.weight"]  # tied, as Qwen2.5-3B
    t("speech_token_emded.weight", SPEECH_TOKEN_NUM + 2, hidden)
    if cfg.speech_output is not None:
        t("speech_head.weight", SPEECH_TOKEN_NUM, hidden); t("speech_head.bias", SPEECH_TOKEN_NUM)
        sd["llama_model.speech_token_emded.weight"] = sd["speech_token_emded.weight"]  # inference alias
    return sd


def expected_sources(cfg, sd, lora=False) -> dict[str, torch.Tensor]:
    """Our key -> the tensor it must hold, written from their names."""
    want: dict[str, torch.Tensor] = {
        "encoder.conv1.weight": sd["encoder.embed.conv.0.weight"], "encoder.conv2.bias": sd["encoder.embed.conv.2.bias"],
        "encoder.embed_positions.weight": sd["encoder.embed.pos_enc.pe"][0],
        "encoder.layer_norm.weight": sd["encoder.after_norm.weight"],
        "encoder.layers.1.self_attn.q_proj.weight": sd["encoder.encoders.1.self_attn.linear_q.weight"],
        "encoder.layers.1.self_attn.k_proj.weight": sd["encoder.encoders.1.self_attn.linear_k.weight"],
        "encoder.layers.0.self_attn.out_proj.bias": sd["encoder.encoders.0.self_attn.linear_out.bias"],
        "encoder.layers.0.self_attn_layer_norm.weight": sd["encoder.encoders.0.norm1.weight"],
        "encoder.layers.0.final_layer_norm.bias": sd["encoder.encoders.0.norm2.bias"],
        "encoder.layers.1.fc1.weight": sd["encoder.encoders.1.feed_forward.w_1.weight"],
        "encoder.layers.1.fc2.bias": sd["encoder.encoders.1.feed_forward.w_2.bias"],
        "adapter.convs.0.weight": sd["down_sample_2.conv.1.weight"],
        "adapter.convs.2.bias": sd["down_sample_2.conv.7.bias"],
        "adapter.input_proj.weight": sd["speech_transformer.embed.out.0.weight"],
        "adapter.input_norm.bias": sd["speech_transformer.embed.out.1.bias"],
        "adapter.blocks.0.self_attn.in_proj_weight": torch.cat(
            [sd[f"speech_transformer.encoders.0.self_attn.linear_{x}.weight"] for x in "qkv"]),
        "adapter.blocks.0.self_attn.in_proj_bias": torch.cat(
            [sd[f"speech_transformer.encoders.0.self_attn.linear_{x}.bias"] for x in "qkv"]),
        "adapter.blocks.0.linear1.weight": sd["speech_transformer.encoders.0.feed_forward.w_1.weight"],
        "adapter.blocks.0.norm2.weight": sd["speech_transformer.encoders.0.norm2.weight"],
        "adapter.final_norm.weight": sd["speech_transformer.after_norm.weight"],
        "adapter.proj.weight": sd["speech_llama_proj.weight"],
        "speech_bounds.weight": sd["speech_token_emded.weight"][SPEECH_TOKEN_NUM:],
    }
    if lora:
        root, ours = "llama_model.base_model.model.", "llm.base_model.model."
        want[ours + "model.layers.1.self_attn.q_proj.base_layer.weight"] = sd[root + "model.layers.1.self_attn.q_proj.base_layer.weight"]
        want[ours + "model.layers.1.mlp.down_proj.lora_B.default.weight"] = sd[root + "model.layers.1.mlp.down_proj.lora_B.default.weight"]
        want[ours + "model.layers.0.mlp.up_proj.weight"] = sd[root + "model.layers.0.mlp.up_proj.weight"]
    else:
        root, ours = "llama_model.", "llm."
        want[ours + "model.layers.1.self_attn.k_proj.bias"] = sd[root + "model.layers.1.self_attn.k_proj.bias"]
        want[ours + "model.layers.0.mlp.gate_proj.weight"] = sd[root + "model.layers.0.mlp.gate_proj.weight"]
    want[ours + "model.embed_tokens.weight"] = sd[root + "model.embed_tokens.weight"]
    want[ours + "model.norm.weight"] = sd[root + "model.norm.weight"]
    if cfg.speech_output is not None:
        want["speech_embed.weight"] = sd["speech_token_emded.weight"][:SPEECH_TOKEN_NUM]
        want["speech_head.weight"] = sd["speech_head.weight"]
        want["speech_head.bias"] = sd["speech_head.bias"]
    return want


def wenet_adapter_reference(sd: dict[str, torch.Tensor], frames: torch.Tensor, heads: int, blocks: int) -> torch.Tensor:
    """OSUM-EChat's adapter computed straight from their tensors (one unpadded sample, eval mode)."""
    F = torch.nn.functional
    x = frames.transpose(1, 2)
    for i, stride in ((1, 1), (4, 2), (7, 2)):
        x = F.gelu(F.conv1d(F.pad(x, (2, 0)), sd[f"down_sample_2.conv.{i}.weight"], sd[f"down_sample_2.conv.{i}.bias"], stride))
    x = x.transpose(1, 2)
    p = "speech_transformer."
    d = x.shape[-1]
    x = F.layer_norm(F.linear(x, sd[p + "embed.out.0.weight"], sd[p + "embed.out.0.bias"]), (d,),
                     sd[p + "embed.out.1.weight"], sd[p + "embed.out.1.bias"], 1e-5)
    pos = torch.arange(x.shape[1], dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * -(math.log(10000.0) / d))
    pe = torch.zeros(x.shape[1], d)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    x = x * math.sqrt(d) + pe
    for n in range(blocks):
        b = f"{p}encoders.{n}."
        lin = lambda name, v: F.linear(v, sd[b + name + ".weight"], sd[b + name + ".bias"])  # noqa: E731
        h = F.layer_norm(x, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-5)
        q, k, v = (lin(f"self_attn.linear_{c}", h).view(1, -1, heads, d // heads).transpose(1, 2) for c in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
        x = x + lin("self_attn.linear_out", att.transpose(1, 2).reshape(1, -1, d))
        h = F.layer_norm(x, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-5)
        x = x + lin("feed_forward.w_2", F.relu(lin("feed_forward.w_1", h)))
    x = F.layer_norm(x, (d,), sd[p + "after_norm.weight"], sd[p + "after_norm.bias"], 1e-5)
    return F.linear(x, sd["speech_llama_proj.weight"], sd["speech_llama_proj.bias"])


def _lora_config(speech_output: bool):
    data = load_config("tiny").model_dump(mode="json")
    data["llm"]["lora"] = {"r": 4, "alpha": 16, "dropout": 0.0}
    if not speech_output:
        data["speech_output"] = None
    data["stages"] = {s: ["lora"] for s in ("understanding", "generation", "empathy")}
    return config_from_dict(data)


def test_osum_echat_checkpoint_fills_every_parameter():
    cfg = load_config("tiny")
    model = build_model(cfg, tokenizer=False).eval()
    sd = wenet_state_dict(cfg)
    report = load_wenet_checkpoint(model, sd)
    assert report.missing == [] and report.unmapped == []
    assert set(report.skipped) == {"ln_speech.weight", "ln_speech.bias", "llama_model.speech_token_emded.weight"}
    ours = model.state_dict()
    for name, tensor in expected_sources(cfg, sd).items():
        assert torch.equal(ours[name], tensor), name
    # Every parameter got a checkpoint value: none still equals a fresh model's initialisation
    fresh = build_model(cfg, tokenizer=False).state_dict()
    assert not [k for k in ours if torch.equal(ours[k], fresh[k])]
    # The adapter now computes what their adapter computes
    frames = torch.randn(1, 37, cfg.encoder_width)
    with torch.no_grad():
        got, lengths = model.adapter(frames, torch.tensor([37]))
        want = wenet_adapter_reference(sd, frames, cfg.adapter.attention_heads, cfg.adapter.num_blocks)
    assert lengths.tolist() == [10] and torch.allclose(got, want, atol=1e-4)


def test_osum_lora_checkpoint_with_peft_names():
    cfg = _lora_config(speech_output=False)
    model = build_model(cfg, tokenizer=False)
    sd = wenet_state_dict(cfg, lora=True)
    report = load_wenet_checkpoint(model, sd, strict=True)
    assert report.missing == [] and report.unmapped == []
    assert any("speech-token rows" in why for why in report.skipped.values())
    ours = model.state_dict()
    for name, tensor in expected_sources(cfg, sd, lora=True).items():
        assert torch.equal(ours[name], tensor), name


def test_lora_checkpoint_into_full_model_reports_lora_as_unmapped():
    cfg = _lora_config(speech_output=True)
    sd = wenet_state_dict(cfg, lora=True)
    model = build_model("tiny", tokenizer=False)
    report = load_wenet_checkpoint(model, sd)
    assert report.missing == []  # the base weights land in the plain LLM (peft's wrapping removed)
    assert report.unmapped and all(".lora_" in k for k in report.unmapped)
    with pytest.raises(ValueError, match="strict"):
        load_wenet_checkpoint(model, sd, strict=True)


def test_shape_mismatch_loads_nothing(tmp_path):
    cfg = load_config("tiny")
    model = build_model(cfg, tokenizer=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = cfg.model_dump(mode="json")
    data["adapter"]["ffn_dim"] = 96
    sd = wenet_state_dict(config_from_dict(data))
    with pytest.raises(ValueError, match="nothing loaded"):
        load_wenet_checkpoint(model, sd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loads_from_a_file_with_ddp_prefix(tmp_path):
    cfg = load_config("tiny")
    sd = {f"module.{k}": v for k, v in wenet_state_dict(cfg, seed=3).items()}
    path = tmp_path / "step_5000.pt"
    torch.save(sd, path)
    model = build_model(cfg, tokenizer=False)
    report = load_wenet_checkpoint(model, path)
    assert report.missing == [] and report.unmapped == []
    assert torch.equal(model.speech_head.bias, sd["module.speech_head.bias"])
    # and through the config's checkpoint entry, as build_model(load_weights=True) does
    data = cfg.model_dump(mode="json")
    data["checkpoint"] = {"path": str(path), "format": "wenet"}
    loaded = build_model(config_from_dict(data), load_weights=True, tokenizer=False)
    assert torch.equal(loaded.adapter.proj.weight, sd["module.speech_llama_proj.weight"])


def test_untied_lm_head_into_a_tied_model_is_an_error():
    cfg = load_config("tiny")
    sd = wenet_state_dict(cfg)
    sd["llama_model.lm_head.weight"] = sd["llama_model.lm_head.weight"] + 1.0
    with pytest.raises(ValueError, match="ties"):
        load_wenet_checkpoint(build_model(cfg, tokenizer=False), sd)


def test_checkpoint_paths_go_to_the_hub_only_when_they_can_mean_it(tmp_path, monkeypatch):
    """A mistyped local checkpoint (its first folder exists here) is a clear not-found error, never
    a hub download; `hf://owner/repo/file` always means the hub; owner/repo/file does when no local
    folder `owner` exists. No network: the download function is replaced."""
    import huggingface_hub

    from echat.model.osum import resolve_checkpoint_file

    downloads = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: downloads.append((repo_id, filename)) or str(tmp_path / "got.pt"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "stage1").mkdir(parents=True)
    (tmp_path / "runs" / "stage1" / "model.pt").write_bytes(b"x")

    assert resolve_checkpoint_file("runs/stage1/model.pt").resolve() == (tmp_path / "runs" / "stage1" / "model.pt").resolve()
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: runs/stage1/modle\.pt \(read as a local path "
                                                r"because the folder 'runs' exists here; .*hf://owner/repo"):
        resolve_checkpoint_file("runs/stage1/modle.pt")
    with pytest.raises(FileNotFoundError, match="no such local file"):
        resolve_checkpoint_file(str(tmp_path / "elsewhere" / "x" / "model.pt"))
    assert downloads == []

    assert resolve_checkpoint_file("hf://runs/stage1/model.pt") == tmp_path / "got.pt"  # explicit: the hub
    assert resolve_checkpoint_file("ASLP-lab/OSUM-EChat/language_think_final.pt") == tmp_path / "got.pt"
    assert downloads == [("runs/stage1", "model.pt"), ("ASLP-lab/OSUM-EChat", "language_think_final.pt")]
