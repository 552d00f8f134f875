"""The tiny model end to end: splicing, losses, training steps, encoder/adapter behaviour, loading."""

from __future__ import annotations

import math

import pytest
import torch

from echat.model.batch import IGNORE_INDEX
from echat.model.config import config_from_dict, load_config
from echat.model.osum import build_model, count_parameters
from test_model_arch_support import make_batch, one_torch_thread, prompt  # noqa: F401 (autouse fixture)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("tiny")


def mixed_batch(tok):
    return make_batch(tok, [
        {"prompt": prompt("Please transcribe the speech."), "target": "hello there<|im_end|>", "frames": 230},
        {"prompt": prompt("Read this: good morning", audio=False), "codes": [5, 17, 42, 4095]},
        {"prompt": prompt(), "target": "I hear you.<|im_end|>", "frames": 101, "codes": [7, 7, 300]},
    ])


def test_forward_gives_finite_losses_and_counts(model):
    batch = mixed_batch(model.tokenizer)
    out = model(batch)
    assert torch.isfinite(out.loss) and torch.isfinite(out.text_loss) and torch.isfinite(out.speech_loss)
    assert out.n_text_tokens == int((batch.labels != IGNORE_INDEX).sum())
    assert out.n_speech_tokens == 4 + 1 + 3 + 1  # codes, then the end marker, per sample
    total = (out.text_loss * out.n_text_tokens + out.speech_loss * out.n_speech_tokens) / (
        out.n_text_tokens + out.n_speech_tokens)
    assert torch.allclose(out.loss, total)
    # Untrained: about log(vocab) and log(4097)
    assert abs(out.speech_loss.item() - math.log(4097)) < 1.5


def test_splice_layout(model):
    batch = mixed_batch(model.tokenizer)
    inputs = model.assemble(batch)
    frames = model.adapter.output_lengths(model.encoder.output_lengths(batch.feature_lengths))
    text_tokens = batch.attention_mask.sum(1)
    speech_inputs = torch.where(batch.speech_token_lengths > 0, batch.speech_token_lengths + 1, 0)
    has_audio = (batch.feature_lengths > 0).long()
    # <|audio|> (1 token) -> begin + frames + end; speech targets add marker + codes
    assert inputs.lengths.tolist() == (text_tokens - has_audio + has_audio * (frames + 2) + speech_inputs).tolist()
    # sample 2: the speech head predicts the codes, then the end marker, at the last positions
    n = int(inputs.lengths[2])
    assert inputs.speech_targets[2, n - 4: n].tolist() == [7, 7, 300, 4096]
    assert (inputs.speech_targets[2, : n - 4] == IGNORE_INDEX).all()
    # the text target of the position before the marker is <|im_end|>, nothing after it
    im_end = model.special_ids.im_end
    assert int(inputs.text_targets[2, n - 6]) == im_end and (inputs.text_targets[2, n - 5:] == IGNORE_INDEX).all()
    # the speech begin/end vectors wrap the frames: find begin in sample 0
    begin = model.speech_bounds.weight[0]
    hits = (inputs.embeds[0] == begin).all(-1).nonzero().flatten().tolist()
    assert len(hits) == 1 and torch.equal(inputs.embeds[0, hits[0] + int(frames[0]) + 1], model.speech_bounds.weight[1])


@pytest.mark.slow
def test_backward_reaches_every_module_and_training_lowers_the_loss(model):
    batch = mixed_batch(model.tokenizer)
    out = model(batch)
    out.loss.backward()
    for name in ("encoder.conv1.weight", "adapter.convs.0.weight", "adapter.proj.weight", "speech_bounds.weight",
                 "speech_embed.weight", "speech_head.weight", "llm.model.layers.0.self_attn.q_proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out.loss.item()
    for _ in range(25):
        opt.zero_grad()
        loss = model(batch).loss
        loss.backward()
        opt.step()
    final = model(batch)
    assert final.loss.item() < 0.5 * first
    assert final.text_loss.item() < out.text_loss.item() and final.speech_loss.item() < out.speech_loss.item()


def test_batch_without_targets_gives_zero_loss_that_backpropagates(model):
    batch = make_batch(model.tokenizer, [{"prompt": prompt("transcribe"), "frames": 40}])
    out = model(batch)
    assert out.loss.item() == 0.0 and out.text_loss is None and out.speech_loss is None
    out.loss.backward()


def test_bad_batches_are_rejected(model):
    tok = model.tokenizer
    two_audio = make_batch(tok, [{"prompt": prompt("<|audio|>"), "target": "x", "frames": 30}])
    with pytest.raises(ValueError, match="2 <\\|audio\\|> tokens"):
        model(two_audio)
    orphan = make_batch(tok, [{"prompt": prompt(), "target": "x"}])
    with pytest.raises(ValueError, match="feature_lengths 0"):
        model(orphan)
    bad_code = make_batch(tok, [{"prompt": prompt(audio=False), "codes": [4096]}])
    with pytest.raises(ValueError, match="0..4095"):
        model(bad_code)
    left = mixed_batch(tok)
    left.attention_mask = left.attention_mask.flip(1)
    with pytest.raises(ValueError, match="right-padded"):
        model(left)
    data = load_config("tiny").model_dump(mode="json")
    data["speech_output"] = None
    data["stages"] = {s: ["adapter"] for s in ("understanding", "generation", "empathy")}
    no_speech = build_model(config_from_dict(data))
    with pytest.raises(ValueError, match="no speech output"):
        no_speech(make_batch(tok, [{"prompt": prompt(audio=False), "codes": [1, 2]}]))


# ---------------------------------------------------------------- encoder and adapter


def test_encoder_matches_whisper_on_30s_and_is_padding_invariant(model):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    enc = model.encoder.eval()
    full = torch.randn(1, 80, 3000)
    ours, lengths = enc(full, torch.tensor([3000]))
    reference = WhisperEncoder.forward(enc, full).last_hidden_state  # transformers' own 30 s path
    assert lengths.tolist() == [1500]
    assert torch.allclose(ours, reference, atol=1e-5)

    feats = torch.zeros(2, 80, 301)
    feats[0] = torch.randn(80, 301)
    feats[1, :, :128] = torch.randn(80, 128)
    batched, lengths = enc(feats, torch.tensor([301, 128]))
    assert lengths.tolist() == [151, 64]  # (L + 1) // 2
    alone, _ = enc(feats[1:, :, :128], torch.tensor([128]))
    assert torch.allclose(batched[1, :64], alone[0], atol=1e-5)

    with pytest.raises(ValueError, match="30 s"):
        enc(torch.zeros(1, 80, 3002), torch.tensor([3002]))


def test_adapter_downsamples_by_four_and_is_causal(model):
    ad = model.adapter.eval()
    lengths = torch.tensor([1, 2, 3, 4, 5, 8, 9, 150])
    assert ad.output_lengths(lengths).tolist() == [math.ceil(math.ceil(n / 2) / 2) for n in lengths.tolist()]
    x = torch.randn(2, 40, 64)
    x[1, 21:] = 0.0
    out, out_lengths = ad(x, torch.tensor([40, 21]))
    assert out.shape == (2, 10, model.config.llm_width) and out_lengths.tolist() == [10, 6]
    alone, _ = ad(x[1:, :21], torch.tensor([21]))
    assert torch.allclose(out[1, :6], alone[0], atol=1e-5)


def test_speech_embeddings_do_not_depend_on_batch_padding(model):
    model.eval()
    batch = mixed_batch(model.tokenizer)
    speech, lengths = model.encode_speech(batch.features[[0, 2]], batch.feature_lengths[[0, 2]])
    alone, alone_len = model.encode_speech(batch.features[[2]], batch.feature_lengths[[2]])
    assert int(lengths[1]) == int(alone_len[0])
    assert torch.allclose(speech[1, : int(lengths[1])], alone[0, : int(alone_len[0])], atol=1e-5)


# ---------------------------------------------------------------- loading real weights


def _save_pretrained_parts(tmp_path, cfg):
    from transformers import AutoConfig, AutoModelForCausalLM, WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(1)
    arch = dict(cfg.encoder.architecture)
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        **arch, decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, vocab_size=120,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, max_target_positions=32,
    )).eval()
    whisper.save_pretrained(tmp_path / "whisper")
    llm_arch = dict(cfg.llm.architecture)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(llm_arch.pop("model_type"), **llm_arch)).eval()
    llm.save_pretrained(tmp_path / "qwen2")
    return whisper, llm


def test_save_load_round_trip_through_the_real_loaders(tmp_path):
    cfg = load_config("tiny")
    whisper, llm = _save_pretrained_parts(tmp_path, cfg)
    data = cfg.model_dump(mode="json")
    data["encoder"]["name_or_path"] = str(tmp_path / "whisper")
    data["llm"]["name_or_path"] = str(tmp_path / "qwen2")
    model = build_model(config_from_dict(data), load_weights=True, tokenizer=False).eval()

    feats = torch.randn(1, 80, 3000)
    with torch.no_grad():
        want = whisper.model.encoder(feats).last_hidden_state
        got, _ = model.encoder(feats, torch.tensor([3000]))
        assert torch.allclose(got, want, atol=1e-5)
        ids = torch.randint(0, 1000, (2, 9))
        assert torch.allclose(model.causal_lm(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-5)

    # LoRA on top of loaded weights keeps the base weights; B starts at zero so outputs agree
    data["llm"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.0}
    lora_model = build_model(config_from_dict(data), load_weights=True, tokenizer=False).eval()
    with torch.no_grad():
        assert torch.allclose(lora_model.causal_lm(input_ids=ids).logits, llm(input_ids=ids).logits, atol=1e-5)
    assert count_parameters(lora_model)["lora"] > 0

    # The encoder loader also reads a bare saved encoder (our own save_pretrained)
    model.encoder.save_pretrained(tmp_path / "encoder_only")
    from echat.model.encoder import load_encoder

    again = load_encoder(tmp_path / "encoder_only")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.encoder.state_dict().values()))


def test_loaded_architecture_must_match_the_config(tmp_path):
    cfg = load_config("tiny")
    _save_pretrained_parts(tmp_path, cfg)
    data = cfg.model_dump(mode="json")
    data["llm"]["name_or_path"] = str(tmp_path / "qwen2")
    data["llm"]["architecture"]["num_hidden_layers"] = 3
    with pytest.raises(ValueError, match="num_hidden_layers: config 3, checkpoint 2"):
        build_model(config_from_dict(data), load_weights=True, tokenizer=False)
    data = cfg.model_dump(mode="json")
    data["encoder"]["name_or_path"] = str(tmp_path / "qwen2")  # not a Whisper checkpoint
    with pytest.raises(ValueError, match=r"qwen2: a qwen2 checkpoint, not a Whisper one"):
        build_model(config_from_dict(data), load_weights=True, tokenizer=False)


def test_meta_build_of_full_config_is_weightless():
    model = build_model("osum-echat", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    with pytest.raises(ValueError, match="meta"):
        build_model("osum-echat", device="meta", load_weights=True)
