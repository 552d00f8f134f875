"""The adapter between the Whisper encoder and the LLM, as OSUM / OSUM-EChat build it.

What the reference code does (ASLP-lab/OSUM, `OSUM-EChat/wenet/osum_echat/llmasr_model_instruct_version.py`
with `adapter_type: osum_echat`, `downsample_rate: 4`, and its `downsampler.py`
`GxlConv1dSubsampling4`; OSUM's `llmasr_model.py` `adapter_type: gxl` is the same):

1. `down_sample_2`: three Conv1d(d, d, kernel 3) with strides 1, 2, 2, each after a
   `ConstantPad1d((2, 0))` left pad (so the convs are causal) and followed by GELU: 50 Hz -> 12.5 Hz,
   valid length L -> ceil(ceil(L / 2) / 2), as their mask `[:, :, 0::2][:, :, 0::2]` gives.
2. `speech_transformer`: WeNet `TransformerEncoder(input_layer="linear", pos_enc_layer_type="abs_pos",
   normalize_before=True, attention_heads=4, linear_units=2560, num_blocks=4, dropout 0.1,
   attention dropout 0.0)`, i.e. Linear(d, d) + LayerNorm + dropout, then x * sqrt(d) + sinusoidal
   positions (no parameters), 4 pre-norm blocks (self-attention with biases on q/k/v/out, ReLU
   feed-forward d -> 2560 -> d, WeNet's default activation), and a final LayerNorm.
3. `speech_llama_proj`: Linear(d, LLM width).

Parameters for d = 1024: convs 3 x 3,146,752; transformer 38,849,536; projection 1024 x H + H:
51,963,392 for Qwen2-7B (H = 3584), 50,388,992 for Qwen2.5-3B (H = 2048). (The reference's
comment says "51.6M".) The blocks here are torch's `nn.TransformerEncoderLayer` (norm_first,
ReLU): the same computation and parameter count as WeNet's block, with q/k/v fused into
`in_proj_weight`; model/wenet_keys.py concatenates WeNet's separate q/k/v when loading.
The reference model also holds an unused `ln_speech` LayerNorm; it is not built here.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from echat.model.encoder import padding_mask


def sinusoidal_positions(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """WeNet/ESPnet `PositionalEncoding`: interleaved sin (even dims) and cos (odd dims)."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, dtype=torch.float32, device=device)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.to(dtype)


class SpeechAdapter(nn.Module):
    """(B, T, d) encoder frames at 50 Hz -> (B, T', llm_width) at 12.5 Hz, with valid lengths."""

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        conv_kernel: int = 3,
        conv_strides: tuple[int, ...] = (1, 2, 2),
        num_blocks: int = 4,
        attention_heads: int = 4,
        ffn_dim: int = 2560,
        dropout: float = 0.1,
        attention_dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_kernel = conv_kernel
        self.conv_strides = tuple(conv_strides)
        self.convs = nn.ModuleList(nn.Conv1d(input_dim, input_dim, conv_kernel, stride) for stride in conv_strides)
        self.input_proj = nn.Linear(input_dim, input_dim)
        self.input_norm = nn.LayerNorm(input_dim, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            block = nn.TransformerEncoderLayer(
                input_dim, attention_heads, ffn_dim, dropout=dropout, activation="relu",
                layer_norm_eps=1e-5, batch_first=True, norm_first=True,
            )
            block.self_attn.dropout = attention_dropout  # WeNet: attention dropout apart from the rest
            self.blocks.append(block)
        self.final_norm = nn.LayerNorm(input_dim, eps=1e-5)
        self.proj = nn.Linear(input_dim, output_dim)
        self.xscale = math.sqrt(input_dim)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        # Left pad (kernel - 1), no right pad: out = floor((L - 1) / stride) + 1 = ceil(L / stride).
        out = lengths
        for stride in self.conv_strides:
            out = torch.div(out - 1, stride, rounding_mode="floor") + 1
        return out.clamp(min=0)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = frames.transpose(1, 2)  # (B, d, T)
        for conv in self.convs:
            # Causal: an output frame sees only frames at or before it, so padding never leaks in.
            x = nn.functional.gelu(conv(nn.functional.pad(x, (self.conv_kernel - 1, 0))))
        x = x.transpose(1, 2)
        out_lengths = self.output_lengths(lengths)
        steps = x.shape[1]

        x = self.dropout(self.input_norm(self.input_proj(x)))
        x = x * self.xscale + sinusoidal_positions(steps, x.shape[-1], x.device, x.dtype)
        x = self.dropout(x)
        pad = ~padding_mask(out_lengths, steps)
        for block in self.blocks:
            x = block(x, src_key_padding_mask=pad)
        x = self.final_norm(x)
        return self.proj(x), out_lengths
