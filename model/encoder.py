"""The speech encoder: transformers' WhisperEncoder, run on variable-length input.

transformers' `WhisperEncoder.forward` insists on exactly 3000 mel frames (30 s, as OpenAI
Whisper pads every input). OSUM runs the same weights through WeNet's TransformerEncoder on
variable-length input with padding masks, so this subclass keeps the module tree (and so the
checkpoint format) of `WhisperEncoder` and replaces only `forward`:

- the two convs run on the real length; conv1's output past each sample's valid length is zeroed
  before conv2, so a padded sample gives the same frames as the sample alone;
- the positional table is sliced to the conv output length (at most `max_source_positions`,
  1500 frames = 30 s);
- self-attention masks padded frames as keys;
- it returns the valid output length of every sample, from the conv arithmetic
  `floor((L + 2*pad - kernel) / stride) + 1` per conv: 100 Hz mel -> 50 Hz, L -> (L + 1) // 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import WhisperConfig
from transformers import initialization as hf_init
from transformers.models.whisper.modeling_whisper import WhisperEncoder, sinusoids

# Key renames that let one loader read a saved encoder, a WhisperModel or a
# WhisperForConditionalGeneration checkpoint (hub id or local path); decoder weights are ignored.
WHISPER_KEY_MAPPING = {r"^model\.encoder\.": "", r"^encoder\.": ""}


def conv_output_lengths(lengths: torch.Tensor, convs: list[nn.Conv1d]) -> torch.Tensor:
    """Valid output frames after `convs` for inputs of `lengths` frames (exact conv arithmetic)."""
    out = lengths
    for conv in convs:
        pad, kernel, stride, dilation = conv.padding[0], conv.kernel_size[0], conv.stride[0], conv.dilation[0]
        out = torch.div(out + 2 * pad - dilation * (kernel - 1) - 1, stride, rounding_mode="floor") + 1
    return out.clamp(min=0)


def max_input_frames(config: WhisperConfig) -> int:
    """The most mel frames the encoder takes: conv2 (stride 2) gives one position per two frames
    and the position table has `max_source_positions` rows (Whisper: 1500, so 3000 frames, 30 s)."""
    return 2 * int(config.max_source_positions)


def padding_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """(B, max_len) bool, True at valid frames."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


class WhisperSpeechEncoder(WhisperEncoder):
    """WhisperEncoder on variable-length log-mel input, returning frames and valid lengths."""

    def _init_weights(self, module: nn.Module) -> None:
        # transformers writes Whisper's sinusoids into the position table from the encoder module's
        # own `_init_weights` call, and skips that call for a subclass defined outside transformers
        # whose module holds no parameters directly (`_initialize_weights`, custom-code branch): a
        # fresh encoder of this class would keep N(0, init_std) noise as its (frozen) position table.
        # So the table is written here, when its own Embedding is initialised, the call transformers
        # does make. `hf_init.copy_` skips a table already loaded from a checkpoint.
        super()._init_weights(module)
        if module is self.embed_positions:
            hf_init.copy_(module.weight, sinusoids(*module.weight.shape))

    def forward(  # type: ignore[override]
        self, input_features: torch.Tensor, feature_lengths: torch.Tensor | None = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_features (B, n_mels, T), feature_lengths (B,) -> ((B, T', d), (B,) valid frames)."""
        if input_features.dim() != 3 or input_features.shape[1] != self.num_mel_bins:
            raise ValueError(
                f"expected features (batch, {self.num_mel_bins} mel bins, frames), got {tuple(input_features.shape)}"
            )
        batch, _, frames = input_features.shape
        if feature_lengths is None:
            feature_lengths = torch.full((batch,), frames, dtype=torch.long, device=input_features.device)
        feature_lengths = feature_lengths.to(device=input_features.device, dtype=torch.long)
        if bool((feature_lengths > frames).any()) or bool((feature_lengths < 1).any()):
            raise ValueError(f"feature_lengths must be in 1..{frames}, got {feature_lengths.tolist()}")
        dtype = self.conv1.weight.dtype
        x = input_features.to(dtype) * padding_mask(feature_lengths, frames)[:, None, :].to(dtype)

        x = nn.functional.gelu(self.conv1(x))
        len1 = conv_output_lengths(feature_lengths, [self.conv1])
        x = x * padding_mask(len1, x.shape[-1])[:, None, :].to(x.dtype)  # as conv2's zero padding alone
        x = nn.functional.gelu(self.conv2(x))
        lengths = conv_output_lengths(len1, [self.conv2])

        x = x.permute(0, 2, 1)
        steps = x.shape[1]
        if steps > self.embed_positions.num_embeddings:
            raise ValueError(
                f"speech input of {frames} mel frames gives {steps} encoder frames, more than the "
                f"{self.embed_positions.num_embeddings} positions of this Whisper encoder (30 s); split the audio"
            )
        hidden = x + self.embed_positions.weight[:steps].to(x.dtype)
        hidden = nn.functional.dropout(hidden, p=self.dropout, training=self.training)

        valid = padding_mask(lengths, steps)
        # Additive key mask (B, 1, 1, T'), the form the eager and sdpa attention paths both take.
        mask = torch.zeros(batch, 1, 1, steps, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~valid[:, None, None, :], torch.finfo(hidden.dtype).min)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden = layer(hidden, mask)
        hidden = self.layer_norm(hidden)
        return hidden, lengths

    @property
    def max_input_frames(self) -> int:
        """The longest input in mel frames (Whisper: 3000, 30 s); see `max_input_frames`."""
        return max_input_frames(self.config)

    def output_lengths(self, feature_lengths: torch.Tensor) -> torch.Tensor:
        return conv_output_lengths(feature_lengths, [self.conv1, self.conv2])


def whisper_config(architecture: dict[str, Any]) -> WhisperConfig:
    # Decoder-side fields are irrelevant here; token ids stay at Whisper's defaults.
    return WhisperConfig(**architecture)


def build_encoder(architecture: dict[str, Any]) -> WhisperSpeechEncoder:
    """A randomly initialised encoder (or one on the meta device, under `torch.device("meta")`)."""
    return WhisperSpeechEncoder(whisper_config(architecture))


def load_encoder(name_or_path: str | Path, dtype: torch.dtype | None = None) -> WhisperSpeechEncoder:
    """Pretrained Whisper encoder weights from a hub id or local path.

    Reads a saved `WhisperSpeechEncoder`/`WhisperEncoder`, a `WhisperModel` or a
    `WhisperForConditionalGeneration` checkpoint (such as `openai/whisper-medium`); every encoder
    weight must be present. Another kind of checkpoint is a ValueError naming its model type.
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    model_type = getattr(AutoConfig.from_pretrained(str(name_or_path)), "model_type", None)
    if model_type != "whisper":
        raise ValueError(f"{name_or_path}: a {model_type} checkpoint, not a Whisper one (the speech encoder needs Whisper weights)")

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # decoder weights are "unexpected" by design; we check below
    try:
        encoder, info = WhisperSpeechEncoder.from_pretrained(
            str(name_or_path), key_mapping=WHISPER_KEY_MAPPING, output_loading_info=True, dtype=dtype
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        raise ValueError(
            f"{name_or_path}: not a complete Whisper encoder checkpoint; missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, shape mismatches {list(mismatched)[:5]}"
        )
    return encoder
