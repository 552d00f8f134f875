"""Shared helpers for the model-architecture tests: synthetic batches in the model/batch.py layout."""

from __future__ import annotations

import pytest
import torch

from echat.model.batch import IGNORE_INDEX, Batch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny model gains nothing from threads, and on a shared 2-core machine two intra-op
    threads contending with other processes make a training step ~50x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def prompt(user: str = "", audio: bool = True) -> str:
    return f"{SYSTEM}<|im_start|>user\n{user}{'<|audio|>' if audio else ''}<|im_end|>\n<|im_start|>assistant\n"


def make_batch(tok, samples: list[dict], n_mels: int = 80, seed: int = 0) -> Batch:
    """samples: dicts with `prompt` (str), optional `target` (str), `frames` (mel frames, 0: none), `codes`."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for s in samples:
        p = tok(s["prompt"], add_special_tokens=False)["input_ids"]
        t = tok(s["target"], add_special_tokens=False)["input_ids"] if s.get("target") else []
        rows.append((p + t, [IGNORE_INDEX] * len(p) + t, s.get("frames", 0), list(s.get("codes", []))))
    bsz = len(rows)
    width = max(len(r[0]) for r in rows)
    frames = max([r[2] for r in rows] + [1])
    n_codes = max(len(r[3]) for r in rows)
    input_ids = torch.full((bsz, width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((bsz, width), dtype=torch.long)
    features = torch.zeros((bsz, n_mels, frames))
    feature_lengths = torch.zeros(bsz, dtype=torch.long)
    speech_tokens = torch.full((bsz, n_codes), IGNORE_INDEX, dtype=torch.long)
    speech_lengths = torch.zeros(bsz, dtype=torch.long)
    for i, (ids, lab, n, codes) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
        if n:
            features[i, :, :n] = torch.randn(n_mels, n, generator=gen)
            feature_lengths[i] = n
        if codes:
            speech_tokens[i, : len(codes)] = torch.tensor(codes)
            speech_lengths[i] = len(codes)
    return Batch(features, feature_lengths, input_ids, attention, labels, speech_tokens, speech_lengths,
                 tasks=[s.get("task", "") for s in samples], keys=[f"k{i}" for i in range(bsz)])


def test_make_batch_layout():
    from echat.model.tokenizer import special_token_ids, tiny_tokenizer

    tok = tiny_tokenizer()
    b = make_batch(tok, [
        {"prompt": prompt("Transcribe."), "target": "hello<|im_end|>", "frames": 50},
        {"prompt": prompt("hi", audio=False), "target": "fine<|im_end|>", "codes": [1, 2, 3]},
    ])
    ids = special_token_ids(tok)
    assert int((b.input_ids[0] == ids.audio).sum()) == 1 and int((b.input_ids[1] == ids.audio).sum()) == 0
    assert b.feature_lengths.tolist() == [50, 0] and b.speech_token_lengths.tolist() == [0, 3]
    n0 = int(b.attention_mask[0].sum())
    assert int(b.labels[0, n0 - 1]) == ids.im_end  # the target ends with <|im_end|>
