"""Speech output options of the model config: the joint softmax and the streaming (interleaved) reply."""

from __future__ import annotations

import pytest
import torch

from echat.model.batch import IGNORE_INDEX, interleave_reply
from echat.model.config import ModelConfigError, config_from_dict, load_config
from echat.model.generate import generate
from echat.model.osum import build_model
from test_model_arch_support import make_batch, one_torch_thread, prompt  # noqa: F401 (autouse fixture)

MARKER = 4096
REPLY = "I hear you, friend<|im_end|>"  # 8 tiny-tokenizer tokens, <|im_end|> last
CODES = list(range(100, 125))  # 25 codes: the speech stream is [4096, 100..124, 4096], 27 items


def tiny(joint: bool = False, streaming: dict | None = None, **fields):
    data = load_config("tiny").model_dump(mode="json")
    data["speech_output"]["joint_softmax"] = joint
    data["speech_output"]["streaming"] = streaming
    data.update(fields)
    return config_from_dict(data)


def built(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


def mixed_batch(tok):
    """A text-only sample, a TTS sample (speech only) and a speech-to-speech sample."""
    return make_batch(tok, [
        {"prompt": prompt("Please transcribe the speech."), "target": "hello there<|im_end|>", "frames": 230},
        {"prompt": prompt("Read this: good morning", audio=False), "codes": [5, 17, 42, 4095]},
        {"prompt": prompt(), "target": "I hear you.<|im_end|>", "frames": 101, "codes": [7, 7, 300]},
    ])


# ---------------------------------------------------------------- config


def test_config_options_and_their_defaults():
    assert load_config("tiny").speech_output.joint_softmax is False  # the split heads stay the default
    echat = load_config("osum-echat").speech_output
    assert echat.joint_softmax is True and echat.streaming is None  # OSUM-EChat's own choice
    layout = tiny(streaming={"text_tokens": 6, "speech_tokens": 18}).speech_output.streaming
    assert (layout.text_tokens, layout.speech_tokens) == (6, 18)
    with pytest.raises(ModelConfigError, match="block sizes"):
        tiny(streaming={"text_tokens": 0, "speech_tokens": 18})
    with pytest.raises(ModelConfigError, match="speech_tokens_per_block"):
        tiny(streaming={"text_tokens": 6, "speech_tokens_per_block": 18})


# ---------------------------------------------------------------- joint softmax


def test_joint_loss_equals_a_hand_computation():
    model = built(tiny(joint=True)).eval()
    batch = mixed_batch(model.tokenizer)
    out = model(batch)
    inputs = model.assemble(batch)
    with torch.no_grad():
        hidden = model.decoder(inputs_embeds=inputs.embeds, attention_mask=inputs.attention_mask).last_hidden_state
    vocab = model.lm_head.weight.shape[0]
    text_nll, speech_nll = [], []
    for b in range(len(batch)):
        speaks = int(batch.speech_token_lengths[b]) > 0
        for t in range(int(inputs.lengths[b])):
            text_id, speech_id = int(inputs.text_targets[b, t]), int(inputs.speech_targets[b, t])
            if text_id == IGNORE_INDEX and speech_id == IGNORE_INDEX:
                continue
            h = hidden[b, t]
            if speaks:  # one softmax over [text ; speech], speech ids offset by the text vocabulary
                logp = torch.log_softmax(torch.cat([model.lm_head(h), model.speech_head(h)]).float(), -1)
                cls = vocab + speech_id if speech_id != IGNORE_INDEX else text_id
            else:  # a text-only sample: the LLM head alone, as the reference scores text tasks
                logp, cls = torch.log_softmax(model.lm_head(h).float(), -1), text_id
            (speech_nll if speech_id != IGNORE_INDEX else text_nll).append(-logp[cls])
    assert out.n_text_tokens == len(text_nll) == int((batch.labels != IGNORE_INDEX).sum())
    # every speech sample: the start marker, its codes, the end marker
    assert out.n_speech_tokens == len(speech_nll) == (4 + 2) + (3 + 2)
    assert torch.allclose(out.loss, torch.stack(text_nll + speech_nll).mean(), atol=1e-5)
    assert torch.allclose(out.text_loss, torch.stack(text_nll).mean(), atol=1e-5)
    assert torch.allclose(out.speech_loss, torch.stack(speech_nll).mean(), atol=1e-5)


def test_joint_targets_add_the_start_marker_where_the_text_ends():
    split, joint = built(tiny(joint=False)), built(tiny(joint=True))
    batch = mixed_batch(split.tokenizer)
    a, b = split.assemble(batch), joint.assemble(batch)
    assert torch.equal(a.embeds, b.embeds) and torch.equal(a.text_targets, b.text_targets)
    assert a.joint.tolist() == [False, False, False] and b.joint.tolist() == [False, True, True]
    n = int(b.lengths[2])  # ... <|im_end|> 4096 7 7 300: <|im_end|> sits at n - 5
    assert b.speech_targets[2, n - 5: n].tolist() == [MARKER, 7, 7, 300, MARKER]
    assert a.speech_targets[2, n - 5: n].tolist() == [IGNORE_INDEX, 7, 7, 300, MARKER]
    m = int(b.lengths[1])  # TTS (prompt, 4096, 4 codes): the last prompt token predicts the start marker
    assert b.speech_targets[1, m - 6] == MARKER and a.speech_targets[1, m - 6] == IGNORE_INDEX


def test_joint_and_split_losses_differ_as_expected_on_the_same_weights():
    split, joint = built(tiny(joint=False)), built(tiny(joint=True))
    joint.load_state_dict(split.state_dict())
    batch = mixed_batch(split.tokenizer)
    with torch.no_grad():
        a, b = split(batch), joint(batch)
    # A bigger softmax can only lower each target's probability: every shared target costs more.
    assert b.text_loss > a.text_loss and b.n_speech_tokens == a.n_speech_tokens + 2
    text_only = make_batch(split.tokenizer, [{"prompt": prompt("transcribe"), "target": "hi<|im_end|>", "frames": 60}])
    with torch.no_grad():
        assert torch.equal(split(text_only).loss, joint(text_only).loss)  # no speech: the same softmax


@pytest.mark.slow
def test_joint_training_learns_a_spoken_reply_that_generation_gives_back():
    model = built(tiny(joint=True))
    tok = model.tokenizer
    reply, codes = "I hear you.", [5, 17, 42, 4095, 300]
    train = make_batch(tok, [{"prompt": prompt(), "target": reply + "<|im_end|>", "frames": 120, "codes": codes}])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        out = model(train)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[5] < losses[0] and losses[-1] < 0.05
    ask = make_batch(tok, [{"prompt": prompt(), "frames": 120}])
    ask.features = train.features
    result = generate(model, ask, mode="text+speech", max_text_tokens=20, max_speech_tokens=20)
    assert result.text.texts == [reply] and result.text.finished == [True]
    assert result.speech.codes == [codes] and result.speech.finished == [True]


# ---------------------------------------------------------------- streaming layout


def test_interleave_rule():
    def spell(order):
        return "".join("s" if x else "t" for x in order)

    # 8 text tokens, 27 speech items: 6 text, 18 speech, the last 2 text, then the rest of the speech
    assert spell(interleave_reply(8, 27, 6, 18)) == "t" * 6 + "s" * 18 + "t" * 2 + "s" * 9
    # text used up exactly at a block end: the rest of the speech follows the last speech block
    assert spell(interleave_reply(12, 40, 6, 18)) == "t" * 6 + "s" * 18 + "t" * 6 + "s" * 22
    # speech used up first: the remaining text blocks run back to back
    assert spell(interleave_reply(14, 10, 6, 18)) == "t" * 6 + "s" * 10 + "t" * 8
    assert interleave_reply(0, 3, 6, 18) == [True] * 3
    with pytest.raises(ValueError, match="block sizes"):
        interleave_reply(3, 3, 0, 18)


@pytest.mark.parametrize("joint", [False, True])
def test_streaming_layout_of_one_sample(joint):
    model = built(tiny(joint=joint, streaming={"text_tokens": 6, "speech_tokens": 18}))
    tok = model.tokenizer
    r = tok(REPLY, add_special_tokens=False)["input_ids"]
    assert len(r) == 8 and r[-1] == model.special_ids.im_end
    batch = make_batch(tok, [{"prompt": prompt(), "target": REPLY, "frames": 96, "codes": CODES}])
    inputs = model.assemble(batch)
    n_prompt = int(batch.attention_mask.sum()) - len(r)
    frames = int(model.adapter.output_lengths(model.encoder.output_lengths(batch.feature_lengths))[0])
    p = n_prompt - 1 + frames + 2  # the reply starts here, after the spliced speech input
    n = int(inputs.lengths[0])
    assert n == p + 8 + 26  # the reply's text, the start marker and 25 codes; the end marker is no input

    # What is fed at each reply position: 6 text tokens, 18 speech items, the last 2 text, the rest.
    fed = ([("t", r[k]) for k in range(6)] + [("s", MARKER)] + [("s", c) for c in range(100, 117)]
           + [("t", r[6]), ("t", r[7])] + [("s", c) for c in range(117, 125)])
    table = {"t": model.embed_tokens.weight, "s": model.speech_embed.weight}
    for k, (kind, item) in enumerate(fed):
        assert torch.equal(inputs.embeds[0, p + k], table[kind][item]), (k, kind, item)

    # What each position from the last prompt token on predicts ("-": nothing).
    start = ("s", MARKER) if joint else ("-", None)  # the start marker: predicted by the joint softmax only
    predicted = ([("t", r[k]) for k in range(6)] + [start] + [("s", c) for c in range(100, 117)]
                 + [("t", r[6]), ("t", r[7])] + [("s", c) for c in range(117, 125)] + [("s", MARKER)])
    got = []
    for t in range(p - 1, n):
        text_id, speech_id = int(inputs.text_targets[0, t]), int(inputs.speech_targets[0, t])
        assert text_id == IGNORE_INDEX or speech_id == IGNORE_INDEX  # one head per position
        got.append(("t", text_id) if text_id != IGNORE_INDEX else ("s", speech_id) if speech_id != IGNORE_INDEX else ("-", None))
    assert got == predicted
    assert (inputs.text_targets[0, : p - 1] == IGNORE_INDEX).all() and (inputs.speech_targets[0, : p - 1] == IGNORE_INDEX).all()


@pytest.mark.parametrize("profile", ["echat", "osum"])
def test_streaming_keeps_the_reasoning_whole_and_leaves_tts_alone(profile):
    model = built(tiny(streaming={"text_tokens": 2, "speech_tokens": 3}, prompt_profile=profile))
    tok = model.tokenizer
    target = "<think>sad voice<think end>I hear you.<|im_end|>"
    # <think end> is one token in our tokenizers, several plain ones in OSUM's
    reasoning = len(tok("<think>sad voice<think end>", add_special_tokens=False)["input_ids"])
    assert reasoning == {"echat": 6, "osum": 11}[profile]
    batch = make_batch(tok, [
        {"prompt": prompt(), "target": target, "frames": 64, "codes": [9, 8, 7, 6]},
        {"prompt": prompt("Say: hi", audio=False), "codes": [9, 8, 7, 6]},
    ])
    inputs = model.assemble(batch)
    kinds = []  # what each position of sample 0 predicts (prompt positions predict nothing)
    for t in range(int(inputs.lengths[0])):
        if inputs.speech_targets[0, t] != IGNORE_INDEX:
            kinds.append("s")
        elif inputs.text_targets[0, t] != IGNORE_INDEX:
            kinds.append("t")
    # the reasoning up to <think end> in one piece, then 2 text / 3 speech blocks over the reply
    # (I hear you . <|im_end|>: 5 tokens) and the stream [4096, 9, 8, 7, 6, 4096] (start not
    # predicted); the speech runs out first, so its end marker is fed and <|im_end|> comes last
    assert "".join(kinds) == "t" * reasoning + "tt" + "ss" + "tt" + "sss" + "t"
    # TTS has no reply text: its stream follows the prompt as without streaming
    plain = built(tiny(prompt_profile=profile)).assemble(batch)
    m = int(inputs.lengths[1])
    assert torch.equal(inputs.speech_targets[1, :m], plain.speech_targets[1, :m])


@pytest.mark.parametrize("joint", [False, True])
def test_streaming_trains_on_the_tiny_config(joint):
    model = built(tiny(joint=joint, streaming={"text_tokens": 6, "speech_tokens": 18}))
    tok = model.tokenizer
    batch = make_batch(tok, [
        {"prompt": prompt(), "target": REPLY, "frames": 96, "codes": CODES},
        {"prompt": prompt(), "target": "That sounds hard.<|im_end|>", "frames": 80, "codes": list(range(300, 330))},
    ])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out = model(batch)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]) and losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------- streaming generation


def test_streaming_generation_follows_the_schedule():
    model = built(tiny(streaming={"text_tokens": 6, "speech_tokens": 18})).eval()
    tok = model.tokenizer
    batch = make_batch(tok, [{"prompt": prompt(), "frames": 90}, {"prompt": prompt("Say: hi", audio=False)}])
    result = generate(model, batch, mode="text+speech", max_text_tokens=10, max_speech_tokens=30)
    for i in range(2):
        blocks = [(b.kind, len(b.ids)) for b in result.blocks[i]]
        text, codes = result.text.token_ids[i], result.speech.codes[i]
        # untrained, it stops neither stream: 6 text, the start marker + 17 codes, the last 4 text
        # (capped at 10), then the rest of the speech (capped at 30 codes)
        assert not result.text.finished[i] and not result.speech.finished[i]
        assert blocks == [("text", 6), ("speech", 17), ("text", 4), ("speech", 13)]
        assert [t for b in result.blocks[i] if b.kind == "text" for t in b.ids] == text
        assert [c for b in result.blocks[i] if b.kind == "speech" for c in b.ids] == codes
    # Each sample decodes as if alone (per-sample phases in one batch).
    alone = generate(model, make_batch(tok, [{"prompt": prompt("Say: hi", audio=False)}]), mode="text+speech",
                     max_text_tokens=10, max_speech_tokens=30)
    assert alone.text.token_ids[0] == result.text.token_ids[1] and alone.speech.codes[0] == result.speech.codes[1]
    # streaming=False: text, then speech, whatever the config
    plain = generate(model, batch, mode="text+speech", max_text_tokens=10, max_speech_tokens=30, streaming=False)
    assert plain.blocks is None and all(len(t) == 10 for t in plain.text.token_ids)


def test_streaming_generation_when_the_speech_ends_at_once():
    model = built(tiny(streaming={"text_tokens": 6, "speech_tokens": 18})).eval()
    with torch.no_grad():  # the end marker is the speech head's only choice
        model.speech_head.bias.fill_(-1e4)
        model.speech_head.bias[model.speech_marker] = 1e4
    batch = make_batch(model.tokenizer, [{"prompt": prompt("Say: hi", audio=False)}])
    result = generate(model, batch, mode="text+speech", max_text_tokens=10, max_speech_tokens=30)
    assert result.speech.codes == [[]] and result.speech.finished == [True]
    # the speech ended after the first text block: the text runs on unbroken to its cap
    assert [(b.kind, len(b.ids)) for b in result.blocks[0]] == [("text", 10)]
    assert len(result.text.token_ids[0]) == 10
    split = built(tiny())
    with pytest.raises(ValueError, match="speech_output.streaming"):
        generate(split, batch, mode="text+speech", streaming=True)


@pytest.mark.slow
def test_a_learned_streaming_reply_is_generated_back_interleaved():
    """Overfit one interleaved reply, then greedy generation gives back its text, codes and blocks."""
    model = built(tiny(streaming={"text_tokens": 6, "speech_tokens": 18}))
    tok = model.tokenizer
    train = make_batch(tok, [{"prompt": prompt(), "target": REPLY, "frames": 120, "codes": CODES}])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        opt.zero_grad()
        out = model(train)
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.05
    ask = make_batch(tok, [{"prompt": prompt(), "frames": 120}])
    ask.features = train.features
    result = generate(model, ask, mode="text+speech", max_text_tokens=20, max_speech_tokens=40)
    r = tok(REPLY, add_special_tokens=False)["input_ids"]
    assert result.text.token_ids == [r[:-1]] and result.text.finished == [True]
    assert result.speech.codes == [CODES] and result.speech.finished == [True]
    # blocks as laid out in training: 6 text, marker + 17 codes, 1 text + <|im_end|>, the last 8 codes
    assert [(b.kind, b.ids) for b in result.blocks[0]] == [
        ("text", r[:6]), ("speech", CODES[:17]), ("text", r[6:7]), ("speech", CODES[17:])]
