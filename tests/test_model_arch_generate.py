"""Generation on the tiny model: cache-consistent decoding, stop rules, and a learned reply."""

from __future__ import annotations

import pytest
import torch

from echat.model.generate import Sampling, _feed, generate, generate_speech, generate_text, prefill
from echat.model.osum import build_model
from test_model_arch_support import make_batch, one_torch_thread, prompt  # noqa: F401 (autouse fixture)


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return build_model("tiny").eval()


def test_incremental_decoding_matches_the_full_forward(model):
    """Prefill + one token at a time (with right padding and per-sample positions) = one full pass."""
    tok = model.tokenizer
    targets = ["good morning to you<|im_end|>", "yes<|im_end|>"]
    full = make_batch(tok, [
        {"prompt": prompt("Transcribe this."), "target": targets[0], "frames": 160},
        {"prompt": prompt("hi", audio=False), "target": targets[1]},
    ])
    prompts = make_batch(tok, [
        {"prompt": prompt("Transcribe this."), "frames": 160},
        {"prompt": prompt("hi", audio=False)},
    ])
    prompts.features = full.features
    with torch.no_grad():
        inputs = model.assemble(full)
        hidden = model.decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask).last_hidden_state
    state = prefill(model, prompts)
    target_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in targets]
    prompt_len = state.positions.clone()
    for step in range(max(len(t) for t in target_ids)):
        fed = torch.tensor([step < len(t) for t in target_ids])
        ids = torch.tensor([t[step] if step < len(t) else tok.pad_token_id for t in target_ids])
        _feed(model, state, model.embed_tokens(ids), fed)
        for i, t in enumerate(target_ids):
            if step < len(t):
                assert torch.allclose(state.last_hidden[i], hidden[i, int(prompt_len[i]) + step], atol=1e-4)


def test_text_generation_stops_at_max_length_or_stop_token(model):
    batch = make_batch(model.tokenizer, [{"prompt": prompt("Transcribe."), "frames": 80},
                                         {"prompt": prompt("hello", audio=False)}])
    result, _ = generate_text(model, batch, max_new_tokens=4, stop_ids=[])
    assert [len(t) for t in result.token_ids] == [4, 4] and result.finished == [False, False]
    # Whatever the untrained model picks first becomes the stop token: it stops at once.
    first = [t[0] for t in result.token_ids]
    again, _ = generate_text(model, batch, max_new_tokens=4, stop_ids=first)
    assert again.token_ids == [[], []] and again.finished == [True, True]
    sampled, _ = generate_text(model, batch, max_new_tokens=5,
                               sampling=Sampling(do_sample=True, temperature=1.3, top_k=50, top_p=0.9),
                               generator=torch.Generator().manual_seed(3))
    assert all(len(t) <= 5 for t in sampled.token_ids)
    assert all(0 <= i < model.embed_tokens.num_embeddings for t in sampled.token_ids for i in t)


def test_speech_generation_returns_codes_and_stops(model):
    batch = make_batch(model.tokenizer, [{"prompt": prompt("Say: good night", audio=False)}] * 2)
    result = generate_speech(model, batch, max_new_tokens=6,
                             sampling=Sampling(do_sample=True, top_k=100), generator=torch.Generator().manual_seed(0))
    assert all(len(c) <= 6 for c in result.codes)
    assert all(0 <= c < 4096 for codes in result.codes for c in codes)
    assert all(f == (len(c) < 6) for f, c in zip(result.finished, result.codes))
    with torch.no_grad():  # make the end marker the head's only choice: generation must stop at once
        model.speech_head.bias.fill_(-1e4)
        model.speech_head.bias[model.speech_marker] = 1e4
    stopped = generate_speech(model, batch, max_new_tokens=6)
    assert stopped.codes == [[], []] and stopped.finished == [True, True]


@pytest.mark.slow
def test_a_learned_spoken_reply_is_generated_back():
    """Overfit one speech-to-speech sample, then greedy generation reproduces its text and codes."""
    torch.manual_seed(0)
    model = build_model("tiny")
    tok = model.tokenizer
    reply, codes = "I hear you.", [5, 17, 42, 4095, 300]
    train = make_batch(tok, [{"prompt": prompt(), "target": reply + "<|im_end|>", "frames": 120, "codes": codes}])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        out = model(train)
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.05
    ask = make_batch(tok, [{"prompt": prompt(), "frames": 120}])
    ask.features = train.features
    result = generate(model, ask, mode="text+speech", max_text_tokens=20, max_speech_tokens=20)
    assert result.text.token_ids == [tok(reply, add_special_tokens=False)["input_ids"]]
    assert result.text.finished == [True] and result.text.texts == [reply]
    assert result.speech.codes == [codes] and result.speech.finished == [True]
    assert model.training  # generate() restores the mode it found
    with pytest.raises(ValueError, match="mode"):
        generate(model, ask, mode="video")
