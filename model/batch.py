"""The batch contract between the model's data path and the model.

The data path (model/data.py, model/samples.py) produces `Batch`es; the model
(model/osum.py) consumes them. Neither knows how the other works.

Sequence layout of one sample, before the model splices in speech:

    input_ids:  [system prompt ... user turn with ONE <|audio|> token ... assistant: target text <|im_end|>]
    labels:     [-100 ..................................................... target text ids, <|im_end|> ]

The model replaces the single `<|audio|>` token (id `audio_token_id`) with
[speech_begin, encoder frames (only the valid ones), speech_end] and inserts -100 into `labels`
for those positions. Samples without speech input (<TEXT2TEXT>, <TEXT2TOKEN>) carry no
`<|audio|>` token and feature_lengths 0.

When `speech_tokens` has a non-empty row, the target continues after the text with speech:
the model appends the speech-embedding of [start marker, codes...] and trains the speech head to
predict [codes..., end]. Codes are CosyVoice 25 Hz tokens, 0..4095.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

IGNORE_INDEX = -100


@dataclass
class Batch:
    features: torch.Tensor  # (B, n_mels, T) float32 log-mel, zero-padded past feature_lengths
    feature_lengths: torch.Tensor  # (B,) int64: valid mel frames per sample (0: no speech input)
    input_ids: torch.Tensor  # (B, L) int64, right-padded with the tokenizer's pad id
    attention_mask: torch.Tensor  # (B, L) int64: 1 for real tokens
    labels: torch.Tensor  # (B, L) int64: IGNORE_INDEX for prompt, padding and <&&> placeholders
    speech_tokens: torch.Tensor  # (B, S) int64 target speech codes, IGNORE_INDEX padding; S may be 0
    speech_token_lengths: torch.Tensor  # (B,) int64
    tasks: list[str] = field(default_factory=list)  # task tag per sample, e.g. "<S2TCHAT> <THINK>"
    keys: list[str] = field(default_factory=list)  # record id per sample

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=non_blocking) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])
