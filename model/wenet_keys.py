"""Load OSUM / OSUM-EChat checkpoints released with WeNet module names into our model.

Their checkpoint is the state dict of `LLMASR_Model` (ASLP-lab/OSUM: `OSUM/wenet/llm_asr/llmasr_model.py`,
`OSUM-EChat/wenet/osum_echat/llmasr_model_instruct_version.py`), whose encoder is WeNet's
`TransformerEncoder` holding Whisper weights (`wenet/whisper/convert_whisper_to_wenet_config_and_ckpt.py`
renames OpenAI's names to these). Their names -> ours:

    encoder.embed.conv.0.*                      encoder.conv1.*
    encoder.embed.conv.2.*                      encoder.conv2.*
    encoder.embed.pos_enc.pe  (1, 1500, d)      encoder.embed_positions.weight (1500, d)
    encoder.encoders.N.self_attn.linear_q.*     encoder.layers.N.self_attn.q_proj.*
    encoder.encoders.N.self_attn.linear_k.weight  ...k_proj.weight (Whisper keys have no bias;
                                                a WeNet key bias, if present, adds q.b to every
                                                logit of a query alike and cancels in the softmax)
    encoder.encoders.N.self_attn.linear_v/.linear_out.*   ...v_proj / out_proj
    encoder.encoders.N.norm1 / norm2            ...self_attn_layer_norm / final_layer_norm
    encoder.encoders.N.feed_forward.w_1 / w_2   ...fc1 / fc2
    encoder.after_norm.*                        encoder.layer_norm.*
    down_sample_2.conv.{1,4,7}.*                adapter.convs.{0,1,2}.*  (Sequential of pad, conv, GELU)
    speech_transformer.embed.out.0 / out.1      adapter.input_proj / adapter.input_norm
    speech_transformer.encoders.N.self_attn.linear_{q,k,v}.*   adapter.blocks.N.self_attn.in_proj_*
                                                (concatenated q, k, v along dim 0, torch's layout)
    speech_transformer.encoders.N.self_attn.linear_out.*       adapter.blocks.N.self_attn.out_proj.*
    speech_transformer.encoders.N.feed_forward.w_1 / w_2       adapter.blocks.N.linear1 / linear2
    speech_transformer.encoders.N.norm1 / norm2                adapter.blocks.N.norm1 / norm2
    speech_transformer.after_norm.*             adapter.final_norm.*
    speech_llama_proj.*                         adapter.proj.*
    llama_model.[base_model.model.]X            llm.[base_model.model.]X  (Qwen2 names are the same;
                                                peft's `.base_layer` and `lora_A/B.default` too)
    speech_token_emded.weight (N + 2, H)        rows 0..N-1 -> speech_embed.weight (codes + marker),
                                                rows N, N+1 -> speech_bounds.weight (speech begin/end)
    speech_head.* (OSUM-EChat), speaker_head.* (OSUM)          speech_head.*

Persistent buffers: their state dict also holds the two sinusoid tables WeNet registers as buffers
(`PositionalEncoding.pe`), besides the weights:

    encoder.embed.pos_enc.pe             (1, 30000, d), Whisper's sinusoids (WhisperPositionalEncoding's
                                         default max_len): its first rows are loaded as our position table
    speech_transformer.embed.pos_enc.pe  (1, 5000, d), ESPnet's interleaved sinusoids (`abs_pos`): our
                                         adapter computes the same table on the fly and holds none, so the
                                         values are checked against it (a mismatch is an error) and not loaded

Deliberately not loaded: `ln_speech.*` (built by their model, never used in its forward) and
`llama_model.speech_token_emded/speech_head.*` (aliases their inference code attaches to the LLM).
A LoRA model of ours that trains the special-token rows (peft's trainable tokens) starts those rows
from the checkpoint's embedding (and head) rows, as peft starts them from the base weights.
Every shape is checked before anything is copied; a mismatch loads nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from echat.model.adapter import sinusoidal_positions

# peft's trainable-token wrapper around an embedding or head (osum._build_parts): the base weight
# moves under `token_adapter.base_layer`, and the trainable rows are `trainable_tokens_delta.<adapter>`.
_TOKEN_BASE = ".token_adapter.base_layer."
_TOKEN_DELTA = re.compile(r"^(.*)\.token_adapter\.trainable_tokens_delta\.([^.]+)$")

# (pattern on their key, our key template) for one-to-one renames, tried in order.
_RENAMES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), t)
    for p, t in [
        (r"^encoder\.embed\.conv\.0\.(weight|bias)$", r"encoder.conv1.\1"),
        (r"^encoder\.embed\.conv\.2\.(weight|bias)$", r"encoder.conv2.\1"),
        (r"^encoder\.encoders\.(\d+)\.self_attn\.linear_q\.(weight|bias)$", r"encoder.layers.\1.self_attn.q_proj.\2"),
        (r"^encoder\.encoders\.(\d+)\.self_attn\.linear_k\.weight$", r"encoder.layers.\1.self_attn.k_proj.weight"),
        (r"^encoder\.encoders\.(\d+)\.self_attn\.linear_v\.(weight|bias)$", r"encoder.layers.\1.self_attn.v_proj.\2"),
        (r"^encoder\.encoders\.(\d+)\.self_attn\.linear_out\.(weight|bias)$", r"encoder.layers.\1.self_attn.out_proj.\2"),
        (r"^encoder\.encoders\.(\d+)\.norm1\.(weight|bias)$", r"encoder.layers.\1.self_attn_layer_norm.\2"),
        (r"^encoder\.encoders\.(\d+)\.norm2\.(weight|bias)$", r"encoder.layers.\1.final_layer_norm.\2"),
        (r"^encoder\.encoders\.(\d+)\.feed_forward\.w_1\.(weight|bias)$", r"encoder.layers.\1.fc1.\2"),
        (r"^encoder\.encoders\.(\d+)\.feed_forward\.w_2\.(weight|bias)$", r"encoder.layers.\1.fc2.\2"),
        (r"^encoder\.after_norm\.(weight|bias)$", r"encoder.layer_norm.\1"),
        (r"^speech_transformer\.embed\.out\.0\.(weight|bias)$", r"adapter.input_proj.\1"),
        (r"^speech_transformer\.embed\.out\.1\.(weight|bias)$", r"adapter.input_norm.\1"),
        (r"^speech_transformer\.encoders\.(\d+)\.self_attn\.linear_out\.(weight|bias)$", r"adapter.blocks.\1.self_attn.out_proj.\2"),
        (r"^speech_transformer\.encoders\.(\d+)\.feed_forward\.w_1\.(weight|bias)$", r"adapter.blocks.\1.linear1.\2"),
        (r"^speech_transformer\.encoders\.(\d+)\.feed_forward\.w_2\.(weight|bias)$", r"adapter.blocks.\1.linear2.\2"),
        (r"^speech_transformer\.encoders\.(\d+)\.norm1\.(weight|bias)$", r"adapter.blocks.\1.norm1.\2"),
        (r"^speech_transformer\.encoders\.(\d+)\.norm2\.(weight|bias)$", r"adapter.blocks.\1.norm2.\2"),
        (r"^speech_transformer\.after_norm\.(weight|bias)$", r"adapter.final_norm.\1"),
        (r"^speech_llama_proj\.(weight|bias)$", r"adapter.proj.\1"),
        (r"^(?:speech_head|speaker_head)\.(weight|bias)$", r"speech_head.\1"),
    ]
]
_CONV = re.compile(r"^down_sample_2\.conv\.(\d+)\.(weight|bias)$")
_ADAPTER_QKV = re.compile(r"^speech_transformer\.encoders\.(\d+)\.self_attn\.linear_([qkv])\.(weight|bias)$")
_LLM = re.compile(r"^llama_model\.(.+)$")
_SKIP: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^ln_speech\."), "unused by the reference model's forward"),
    (re.compile(r"^llama_model\.(speech_token_emded|speech_head)\."), "alias attached to the LLM at inference"),
    (re.compile(r"^encoder\.encoders\.\d+\.self_attn\.linear_k\.bias$"), "key bias cancels in the softmax"),
]


@dataclass
class WenetLoadReport:
    loaded: list[str] = field(default_factory=list)  # our state-dict keys that were filled
    missing: list[str] = field(default_factory=list)  # our keys the checkpoint did not fill
    unmapped: list[str] = field(default_factory=list)  # their keys with no place in our model
    skipped: dict[str, str] = field(default_factory=dict)  # their keys left out on purpose, and why

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors; {len(self.missing)} of ours missing; "
                 f"{len(self.unmapped)} of theirs unmapped; {len(self.skipped)} skipped on purpose"]
        for title, items in (("missing", self.missing), ("unmapped", self.unmapped)):
            if items:
                lines.append(f"{title}: " + ", ".join(items[:10]) + (" ..." if len(items) > 10 else ""))
        return "\n".join(lines)


def read_state_dict(source: str | Path | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict from a dict, a torch file (.pt/.bin/.ckpt) or a .safetensors file."""
    if isinstance(source, dict):
        state = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    for wrapper in ("state_dict", "model"):  # some trainers nest the weights one level down
        if isinstance(state.get(wrapper), dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[wrapper]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"not a state dict of tensors: {bad[:5]} are not tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _llm_canonical(name: str) -> str:
    """A Qwen2 key with peft's wrapping removed: 'base_model.model.' prefix, '.base_layer' (LoRA) and
    '.token_adapter.base_layer' (trainable tokens)."""
    return name.removeprefix("base_model.model.").replace(_TOKEN_BASE, ".").replace(".base_layer.", ".")


def _check_adapter_positions(key: str, tensor: torch.Tensor, width: int) -> None:
    """Their adapter's `abs_pos` table must be the sinusoids our adapter computes (it holds no table)."""
    if tensor.dim() != 3 or tensor.shape[0] != 1 or tensor.shape[2] != width:
        raise ValueError(f"{key}: shape {tuple(tensor.shape)}, expected (1, rows, {width}) for this model's adapter")
    expected = sinusoidal_positions(tensor.shape[1], width, torch.device("cpu"), torch.float32)
    # Their table was computed in float32 and may have been cast (bf16 checkpoints): allow one
    # rounding step of the stored dtype.
    tolerance = max(1e-5, float(torch.finfo(tensor.dtype).eps)) if tensor.is_floating_point() else 0.0
    error = float((tensor.float() - expected).abs().max())
    if error > tolerance:
        raise ValueError(
            f"{key} differs from the sinusoidal positions the adapter computes (max difference {error:.3g}): "
            "this checkpoint's adapter is not OSUM's abs_pos adapter"
        )


def _fill_trainable_tokens(model: Any, ours: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
    """Start our trainable special-token rows from the checkpoint's rows of the same table."""
    for key in ours:
        m = _TOKEN_DELTA.match(key)
        if m is None or key in out:
            continue
        wrapper, adapter = m.group(1), m.group(2)
        base = f"{wrapper}{_TOKEN_BASE}weight"
        if base not in out:
            continue  # the table itself came from nowhere: reported as missing with it
        indices = model.get_submodule(f"{wrapper}.token_adapter").token_indices[adapter]
        out[key] = out[base][torch.as_tensor(indices, dtype=torch.long)]


def map_wenet_state_dict(model: Any, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], WenetLoadReport]:
    """Their state dict -> ours (by our state-dict keys), and the report. Nothing is copied here."""
    ours = model.state_dict()
    ours_llm = {_llm_canonical(k.removeprefix("llm.")): k for k in ours if k.startswith("llm.")}
    out: dict[str, torch.Tensor] = {}
    report = WenetLoadReport()
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}

    def put(target: str, tensor: torch.Tensor, source: str) -> None:
        if target not in ours:
            report.unmapped.append(source)
        else:
            out[target] = tensor

    for key, tensor in state.items():
        reason = next((why for pat, why in _SKIP if pat.search(key)), None)
        if reason is not None:
            report.skipped[key] = reason
            continue
        if key == "speech_transformer.embed.pos_enc.pe":
            if model.adapter is not None:
                _check_adapter_positions(key, tensor, model.adapter.input_proj.in_features)
            report.skipped[key] = "fixed sinusoids the adapter computes itself (values checked)"
            continue
        if key == "encoder.embed.pos_enc.pe":
            table = tensor.squeeze(0)
            limit = ours.get("encoder.embed_positions.weight")
            if limit is not None and table.shape[0] > limit.shape[0]:
                table = table[: limit.shape[0]]  # WeNet may build a longer sinusoid table
            put("encoder.embed_positions.weight", table, key)
            continue
        if key == "speech_token_emded.weight":
            if tensor.shape[0] < 2:
                report.unmapped.append(key)
                continue
            put("speech_bounds.weight", tensor[-2:], key)
            if "speech_embed.weight" in ours:
                put("speech_embed.weight", tensor[:-2], key)
            else:
                report.skipped[f"{key}[:{tensor.shape[0] - 2}]"] = "speech-token rows; this config has no speech output"
            continue
        m = _CONV.match(key)
        if m:
            index, kind = int(m.group(1)), m.group(2)
            if index % 3 != 1:  # Sequential(pad, conv, GELU) x3: convs sit at 1, 4, 7
                report.unmapped.append(key)
                continue
            put(f"adapter.convs.{(index - 1) // 3}.{kind}", tensor, key)
            continue
        m = _ADAPTER_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = tensor
            continue
        m = _LLM.match(key)
        if m:
            target = ours_llm.get(_llm_canonical(m.group(1)))
            if target is None:
                report.unmapped.append(key)
            else:
                out[target] = tensor
            continue
        for pattern, template in _RENAMES:
            if pattern.match(key):
                put(pattern.sub(template, key), tensor, key)
                break
        else:
            report.unmapped.append(key)

    for (block, kind), parts in sorted(qkv.items()):
        names = [f"speech_transformer.encoders.{block}.self_attn.linear_{p}.{kind}" for p in "qkv"]
        if set(parts) != {"q", "k", "v"}:
            report.unmapped.extend(n for n, p in zip(names, "qkv") if p in parts)
            continue
        put(f"adapter.blocks.{block}.self_attn.in_proj_{kind}", torch.cat([parts[p] for p in "qkv"]), names[0])

    _fill_trainable_tokens(model, ours, out)
    # Tied embeddings: our lm_head and embed_tokens are one tensor; the two sources must agree.
    tied = _tied_groups(model)
    for names in tied:
        given = [n for n in names if n in out]
        for other in given[1:]:
            if not torch.equal(out[given[0]], out[other]):
                raise ValueError(f"checkpoint gives different tensors for {given[0]} and {other}, which this model ties")
    report.loaded = sorted(out)
    filled = set(out) | {n for names in tied if any(x in out for x in names) for n in names}
    report.missing = sorted(k for k in ours if k not in filled)
    return out, report


def _tied_groups(model: Any) -> list[list[str]]:
    by_ptr: dict[tuple[int, int], list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.device.type == "meta":
            continue
        by_ptr.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(name)
    return [names for names in by_ptr.values() if len(names) > 1]


def load_wenet_checkpoint(
    model: Any, state_dict_or_path: str | Path | dict[str, torch.Tensor], strict: bool = False,
    log: Callable[[str], None] | None = None,
) -> WenetLoadReport:
    """Copy an OSUM / OSUM-EChat WeNet checkpoint into `model`; returns what was loaded and what was not.

    strict=True also fails when any of our tensors stays unfilled or any of theirs is unmapped.
    """
    state = read_state_dict(state_dict_or_path)
    mapped, report = map_wenet_state_dict(model, state)
    ours = model.state_dict()
    wrong = [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(ours[k].shape)}" for k, v in mapped.items()
             if tuple(v.shape) != tuple(ours[k].shape)]
    if wrong:
        raise ValueError("checkpoint shapes do not fit this model config (nothing loaded): " + "; ".join(wrong[:10]))
    if strict and (report.missing or report.unmapped):
        raise ValueError("strict load failed: " + report.summary())
    with torch.no_grad():
        for name, tensor in mapped.items():
            ours[name].copy_(tensor.to(dtype=ours[name].dtype))
    if log is not None:
        log(report.summary())
    return report
