"""Speech tokens of the reply audio: CosyVoice's 25 Hz speech tokenizer (ONNX, through onnxruntime).

`reply_speech_tokens` is what the `<S2TCHAT> <TEXT2TOKEN>` and `<TEXT2TOKEN>` tasks train the
speech head on (4096 codes at 25 Hz, the codebook of CosyVoice-300M's `speech_tokenizer_v1.onnx`).
The model is run as CosyVoice's own front end runs it (cosyvoice/cli/frontend.py,
`_extract_speech_token`): the 16 kHz waveform becomes Whisper's 128-bin log-mel spectrogram
(`whisper.log_mel_spectrogram(speech, n_mels=128)`: 25 ms Hann window, 10 ms hop, centred with
reflection padding, the last frame dropped, slaney mel filters, log10 clamped to 8 below the peak,
then (x + 4) / 4), given to the session as its first input `(1, 128, T)` float32 with the frame
count `[T]` int32 as its second, and the first output flattened is the tokens, one per four mel
frames. CosyVoice refuses audio over 30 s; longer replies are tokenized in 30 s pieces, joined.

`model` is a local path: the .onnx file, or a model folder holding `speech_tokenizer_v1.onnx`
(CosyVoice-300M's layout). The path is checked when the profile loads. A token outside
[0, codebook_size) rejects the record as `speech_tokens_out_of_range` (a v2 tokenizer, 6561 codes,
needs `codebook_size: 6561` and a model that trains on them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import numpy as np

from echat.schemas.record import SAMPLE_RATE
from echat.schemas.stage import Reject, Stage

N_FFT = 400
HOP = 160
N_MELS = 128
MODEL_FILE = "speech_tokenizer_v1.onnx"
MAX_PIECE_S = 30.0  # CosyVoice: "do not support extract speech token for audio longer than 30s"
TOKEN_RATE_HZ = 25


@lru_cache(maxsize=4)
def mel_filters(n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular mel filters (n_mels, n_fft // 2 + 1), as
    `librosa.filters.mel(sr, n_fft, n_mels)` makes them (Whisper ships those as mel_filters.npz)."""
    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        linear = f / (200.0 / 3)
        log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
        return np.where(f >= 1000.0, log_part, linear)

    def mel_to_hz(m):
        m = np.asarray(m, dtype=np.float64)
        linear = m * (200.0 / 3)
        log_part = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
        return np.where(m >= 15.0, log_part, linear)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_points = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    widths = np.diff(mel_points)
    ramps = mel_points[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_points[2:n_mels + 2] - mel_points[:n_mels]))[:, None]
    return weights.astype(np.float32)


def whisper_log_mel(waveform: np.ndarray, n_mels: int = N_MELS) -> np.ndarray:
    """Whisper's log-mel spectrogram (n_mels, len // 160) of 16 kHz mono audio, float32."""
    audio = np.asarray(waveform, dtype=np.float32).reshape(-1)
    if audio.size < 2:
        audio = np.pad(audio, (0, 2 - audio.size))
    pad = N_FFT // 2
    padded = np.pad(audio, (pad, pad), mode="reflect" if audio.size > pad else "constant")
    frames = 1 + (padded.size - N_FFT) // HOP
    index = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)  # periodic Hann
    power = np.abs(np.fft.rfft(padded[index] * window, axis=1)) ** 2  # (frames, n_fft // 2 + 1)
    mel = mel_filters(n_mels) @ power[:-1].T.astype(np.float32)  # Whisper drops the last frame
    log_spec = np.log10(np.maximum(mel, 1e-10))
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec + 4.0) / 4.0).astype(np.float32)


def resolve_model(path: str) -> str:
    """The .onnx file `path` names: the file itself or `speech_tokenizer_v1.onnx` in a folder."""
    candidate = os.path.join(path, MODEL_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(candidate):
        where = f"{path} holds no {MODEL_FILE}" if os.path.isdir(path) else f"{path} not found"
        raise ValueError(f"speech tokenizer model: {where} (give the .onnx file or CosyVoice-300M's model folder)")
    return candidate


class CosyVoiceSpeechTokens(Stage):
    """`reply_speech_tokens` from the reply audio with CosyVoice's ONNX speech tokenizer.

    Args:
        model: the .onnx file, or a folder holding speech_tokenizer_v1.onnx (required; a local path).
        codebook_size: tokens must be below this (4096 for speech_tokenizer_v1).
        providers: onnxruntime execution providers (default CPU; ["CUDAExecutionProvider",
            "CPUExecutionProvider"] on a GPU worker).
        threads: onnxruntime intra-op threads (CosyVoice uses 1).
    """

    name = "speech_tokens"
    reads = ("_reply_waveform",)
    writes = ("reply_speech_tokens", "speech_tokenizer_model")
    thread_safe = True  # InferenceSession.run may be called from several threads

    def __init__(self, model: str | None = None, codebook_size: int = 4096, providers: list[str] | None = None,
                 threads: int = 1):
        if not model:
            raise ValueError("params.model is required: the speech tokenizer .onnx (or CosyVoice-300M's folder), a local path")
        if not isinstance(codebook_size, int) or codebook_size < 2:
            raise ValueError(f"codebook_size must be a whole number of at least 2, got {codebook_size!r}")
        self.model_path = resolve_model(str(model))
        self.codebook_size = codebook_size
        self.providers = list(providers or ["CPUExecutionProvider"])
        self.threads = int(threads)
        self._session = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_session": None}

    def setup(self) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        available = set(onnxruntime.get_available_providers())
        providers = [p for p in self.providers if p in available] or ["CPUExecutionProvider"]
        self._session = onnxruntime.InferenceSession(self.model_path, sess_options=options, providers=providers)
        inputs = self._session.get_inputs()
        if len(inputs) != 2:
            raise ValueError(f"{self.model_path}: a CosyVoice speech tokenizer takes two inputs (feats, feats_length); "
                             f"this model takes {[i.name for i in inputs]}")
        self._feats, self._lengths = inputs[0].name, inputs[1].name

    def teardown(self) -> None:
        self._session = None

    def describe(self) -> str:
        folder = os.path.basename(os.path.dirname(os.path.abspath(self.model_path)))
        return f"cosyvoice-onnx:{folder}/{os.path.basename(self.model_path)}"

    def tokenize(self, waveform: np.ndarray) -> list[int]:
        """25 Hz tokens of a 16 kHz mono waveform (30 s pieces for longer audio)."""
        if self._session is None:
            self.setup()
        wave = np.asarray(waveform, dtype=np.float32).reshape(-1)
        piece = int(MAX_PIECE_S * SAMPLE_RATE)
        tokens: list[int] = []
        for start in range(0, max(wave.size, 1), piece):
            chunk = wave[start:start + piece]
            if chunk.size < HOP * 4:  # under 40 ms: no whole token in it
                continue
            feats = whisper_log_mel(chunk)[None]  # (1, 128, T)
            out = self._session.run(None, {self._feats: feats, self._lengths: np.array([feats.shape[2]], dtype=np.int32)})
            tokens.extend(int(t) for t in np.asarray(out[0]).reshape(-1))
        return tokens

    def process(self, record: dict[str, Any]) -> Iterator[dict[str, Any] | Reject]:
        waveform = record.get("_reply_waveform")
        if waveform is None or len(waveform) == 0:
            yield record  # no reply audio (no tts slot, or it was skipped): nothing to tokenize
            return
        tokens = self.tokenize(waveform)
        if not tokens:
            yield self.reject(record, "speech_tokens_empty", f"the tokenizer gave no tokens for {len(waveform) / SAMPLE_RATE:.2f} s of reply audio")
            return
        bad = [t for t in tokens if not 0 <= t < self.codebook_size]
        if bad:
            yield self.reject(record, "speech_tokens_out_of_range",
                              f"{len(bad)} of {len(tokens)} tokens outside [0, {self.codebook_size}), e.g. {bad[0]}")
            return
        yield {**record, "reply_speech_tokens": tokens}
