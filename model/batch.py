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

When `speech_tokens` has a non-empty row, the sample's reply also has speech: its speech stream
is [marker, codes..., marker] (marker = 4096, codes are CosyVoice 25 Hz tokens 0..4095), each
item embedded by the speech embedding and predicted by the speech head. The model lays the reply
out in one of two ways (the model config's `speech_output.streaming`):

- all at once (streaming None): the text, then the speech stream. The item after <|im_end|> is the
  start marker, which generation feeds itself.
- streaming {text_tokens: 6, speech_tokens: 18}: the reply's text (its labelled tail: from the
  first label to <|im_end|>; a leading `<think>...<think end>` reasoning stays whole in front, as
  it is never spoken) and the speech stream interleave in blocks: 6 text tokens, 18 speech items,
  6 text tokens, ..., until the text is used up, then the rest of the speech
  (`interleave_reply`). A sample without labelled text (<TEXT2TOKEN>) keeps the first layout.

Either way every item is predicted at the position before it (text by text ids, speech by speech
ids), and the final end marker is a target only, never an input (nothing would follow it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

IGNORE_INDEX = -100


def interleave_reply(n_text: int, n_speech: int, text_block: int, speech_block: int) -> list[bool]:
    """The streaming order of a reply of `n_text` text tokens and `n_speech` speech items: one
    flag per item, False for the next text token, True for the next speech item.

    OSUM-EChat's rule (`make_streaming_mode_from_s2s`): while text remains, up to `text_block`
    text tokens, then up to `speech_block` speech items; once the text is used up, all the
    remaining speech. A short last text block is followed by a full speech block as usual; speech
    that runs out early leaves the remaining text blocks back to back.
    """
    if min(n_text, n_speech) < 0 or min(text_block, speech_block) < 1:
        raise ValueError("interleave_reply needs counts >= 0 and block sizes >= 1")
    order: list[bool] = []
    text_left, speech_left = n_text, n_speech
    while text_left > 0:
        take = min(text_block, text_left)
        order += [False] * take
        text_left -= take
        take = min(speech_block, speech_left)
        order += [True] * take
        speech_left -= take
    return order + [True] * speech_left


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
