"""Model configs, parameter counts and `echat model-info`.

The expected counts are computed here from the configs' own numbers with the layer formulas of
each architecture (Whisper encoder, OSUM's adapter, Qwen2 with grouped-query attention, LoRA),
then compared with the model built on the meta device; and the totals are checked against the
published sizes (Whisper-medium encoder ~307M, Qwen2-7B ~7.6B, Qwen2.5-3B ~3.09B).
"""

from __future__ import annotations

import json

import pytest

from echat.model.config import ModelConfigError, config_from_dict, load_config
from test_model_arch_support import one_torch_thread  # noqa: F401 (autouse fixture)


# ---------------------------------------------------------------- the formulas


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def layer_norm(d: int) -> int:
    return 2 * d


def whisper_encoder_params(a: dict) -> int:
    d, ffn, mels = a["d_model"], a["encoder_ffn_dim"], a["num_mel_bins"]
    conv1 = mels * d * 3 + d
    conv2 = d * d * 3 + d
    positions = a["max_source_positions"] * d
    attention = linear(d, d) + linear(d, d, bias=False) + linear(d, d) + linear(d, d)  # k_proj has no bias
    layer = attention + layer_norm(d) + linear(d, ffn) + linear(ffn, d) + layer_norm(d)
    return conv1 + conv2 + positions + a["encoder_layers"] * layer + layer_norm(d)


def adapter_params(d: int, hidden: int, ad) -> int:
    convs = len(ad.conv_strides) * (d * d * ad.conv_kernel + d)
    block = 4 * linear(d, d) + linear(d, ad.ffn_dim) + linear(ad.ffn_dim, d) + 2 * layer_norm(d)
    transformer = linear(d, d) + layer_norm(d) + ad.num_blocks * block + layer_norm(d)
    return convs + transformer + linear(d, hidden)


def qwen2_params(a: dict) -> int:
    h, inter, vocab = a["hidden_size"], a["intermediate_size"], a["vocab_size"]
    kv = a["num_key_value_heads"] * (h // a["num_attention_heads"])
    attention = linear(h, h) + linear(h, kv) + linear(h, kv) + linear(h, h, bias=False)  # q/k/v biased, o not
    mlp = 2 * linear(h, inter, bias=False) + linear(inter, h, bias=False)
    layer = attention + mlp + 2 * h  # two RMSNorms (weight only)
    embeddings = vocab * h * (1 if a["tie_word_embeddings"] else 2)
    return embeddings + a["num_hidden_layers"] * layer + h


def lora_params(a: dict, lora) -> int:
    h, inter = a["hidden_size"], a["intermediate_size"]
    kv = a["num_key_value_heads"] * (h // a["num_attention_heads"])
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    per_layer = sum(lora.r * (shapes[t][0] + shapes[t][1]) for t in lora.target_modules)
    return a["num_hidden_layers"] * per_layer


def expected_counts(cfg) -> dict[str, int]:
    hidden = cfg.llm_width
    n = cfg.speech_output.codebook_size if cfg.speech_output else None
    return {
        "encoder": whisper_encoder_params(cfg.encoder.architecture),
        "adapter": adapter_params(cfg.encoder_width, hidden, cfg.adapter),
        "speech_bounds": 2 * hidden,
        "llm": qwen2_params(cfg.llm.architecture),
        "lora": lora_params(cfg.llm.architecture, cfg.llm.lora) if cfg.llm.lora else 0,
        "speech_embed": (n + 1) * hidden if n else 0,  # 4096 codes + the start/end marker
        "speech_head": linear(hidden, n + 1) if n else 0,  # 4096 codes + end
    }


# ---------------------------------------------------------------- counts


@pytest.mark.parametrize("name", ["osum", "osum-echat", "tiny"])
def test_model_info_counts_match_hand_computation(name, capsys):
    from echat.cli import main

    assert main(["model-info", "--config", name, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    cfg = load_config(name)
    want = expected_counts(cfg)
    assert info["parameters"] == want
    assert info["total"] == sum(want.values())
    position_table = cfg.encoder.architecture["max_source_positions"] * cfg.encoder_width
    by_stage = {
        stage: sum(want[g] for g in groups) - (position_table if "encoder" in groups else 0)
        for stage, groups in cfg.stages.items()
    }
    assert info["trainable"] == by_stage


def test_full_configs_match_published_sizes():
    osum, echat = expected_counts(load_config("osum")), expected_counts(load_config("osum-echat"))
    assert osum["encoder"] == echat["encoder"] == 307_216_384  # Whisper-medium encoder, ~307M
    assert 7.60e9 < osum["llm"] < 7.63e9  # Qwen2-7B: 7.62B
    assert 3.08e9 < echat["llm"] < 3.10e9  # Qwen2.5-3B: 3.09B, tied embeddings
    assert osum["lora"] == 15_138_816  # r=8 on q,k,v,o,gate,down of 28 layers
    assert 51.0e6 < osum["adapter"] < 52.5e6  # the reference's comment: "51.6M"
    assert echat["speech_embed"] + echat["speech_bounds"] == 4099 * 2048  # their Embedding(4097 + 2, H)
    assert echat["speech_head"] == 2048 * 4097 + 4097


def test_model_info_table_and_bad_config(capsys, tmp_path):
    from echat.cli import main

    assert main(["model-info", "--config", "osum-echat"]) == 0
    out = capsys.readouterr().out
    assert "speech head" in out and "total" in out and "understanding" in out
    assert "3,460,333,569" in out
    assert main(["model-info", "--config", "no-such-config"]) == 2
    assert "unknown model config 'no-such-config'; available: osum" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(load_config("tiny").to_yaml().replace("num_blocks: 1", "num_blocks: 1\n  num_blokcs: 2"))
    assert main(["model-info", "--config", str(bad)]) == 2
    assert "num_blokcs" in capsys.readouterr().err


# ---------------------------------------------------------------- config validation


def _tiny_dict() -> dict:
    return load_config("tiny").model_dump(mode="json")


def test_unknown_keys_are_named():
    data = _tiny_dict()
    data["adapter"]["kernel"] = 5
    with pytest.raises(ModelConfigError, match="unknown key 'adapter.kernel'"):
        config_from_dict(data)
    data = _tiny_dict()
    data["encoder"]["architecture"]["d_modle"] = 64
    with pytest.raises(ModelConfigError, match="d_modle"):
        config_from_dict(data)
    data = _tiny_dict()
    data["stages"]["warmup"] = ["adapter"]
    with pytest.raises(ModelConfigError, match="unknown stage 'warmup'"):
        config_from_dict(data)
    data = _tiny_dict()
    data["stages"]["understanding"] = ["lora"]
    with pytest.raises(ModelConfigError, match="does not have"):
        config_from_dict(data)
    data = _tiny_dict()
    del data["llm"]
    with pytest.raises(ModelConfigError, match="missing key 'llm'"):
        config_from_dict(data)


def test_config_round_trips_through_yaml(tmp_path):
    for name in ("osum", "osum-echat", "tiny"):
        cfg = load_config(name)
        path = tmp_path / f"{name}.yaml"
        path.write_text(cfg.to_yaml())
        assert load_config(path) == cfg


# ---------------------------------------------------------------- stages


def test_set_trainable_follows_the_stage_rules():
    from echat.model.osum import build_model, count_parameters, set_trainable, trainable_per_stage

    model = build_model("tiny", tokenizer=False)
    per_stage = trainable_per_stage(model)
    counts = count_parameters(model)
    got = set_trainable(model, "understanding")
    assert got["llm"] == got["speech_head"] == got["speech_embed"] == 0
    assert got["adapter"] == counts["adapter"] and got["speech_bounds"] == counts["speech_bounds"]
    assert not model.encoder.embed_positions.weight.requires_grad  # Whisper's fixed sinusoids
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == per_stage["understanding"]
    set_trainable(model, "generation")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.split(".")[0] in ("llm", "speech_embed", "speech_head") for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == per_stage["generation"]
    with pytest.raises(ValueError, match="unknown training stage"):
        set_trainable(model, "pretraining")


def test_lora_stage_trains_only_lora_in_the_llm():
    from echat.model.osum import build_model, set_trainable

    data = _tiny_dict()
    data["llm"]["lora"] = {"r": 4, "alpha": 16, "dropout": 0.0}
    data["stages"] = {"understanding": ["encoder", "adapter", "speech_bounds", "lora"],
                      "generation": ["lora", "speech_embed", "speech_head"], "empathy": ["lora"]}
    model = build_model(config_from_dict(data), tokenizer=False)
    set_trainable(model, "understanding")
    llm_trainable = [n for n, p in model.llm.named_parameters() if p.requires_grad]
    assert llm_trainable and all(".lora_" in n for n in llm_trainable)
    assert len(llm_trainable) == 2 * 6 * 2  # A and B, 6 target modules, 2 layers
