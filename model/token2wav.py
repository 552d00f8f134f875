"""Speech tokens -> waveform: the interface, and a CosyVoice backend.

OSUM-EChat's speech head emits CosyVoice 25 Hz speech codes (0..4095); turning them into audio
needs CosyVoice's flow-matching decoder and HiFT vocoder (OSUM-EChat uses CosyVoice-300M-25Hz),
conditioned on a short prompt recording for the voice. CosyVoice is not a PyPI package (it is
installed from its git repository, with its Matcha-TTS submodule on the path), so it is imported
lazily and its absence is a clear, actionable error rather than an import failure at start-up.

    backend = load_token2wav("cosyvoice", model_dir="CosyVoice-300M-25Hz", prompt_wav="voice.wav")
    waveform, sample_rate = backend.synthesize(tokens)
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

SPEECH_CODES = 4096  # valid codes are 0..4095

COSYVOICE_INSTALL_HINT = (
    "CosyVoice is not installed. It is not on PyPI; install it from its repository:\n"
    "  git clone --recursive https://github.com/FunAudioLLM/CosyVoice && pip install -r CosyVoice/requirements.txt\n"
    "  export PYTHONPATH=$PWD/CosyVoice:$PWD/CosyVoice/third_party/Matcha-TTS:$PYTHONPATH\n"
    "then download a 25 Hz model (OSUM-EChat uses CosyVoice-300M-25Hz) and pass its folder as the model "
    "directory. Without it, `echat chat` still gives the reply's speech tokens (written to a JSON file), "
    "which can be turned into audio later."
)


class TokenToWavUnavailable(RuntimeError):
    """The token-to-wav backend cannot be used here (not installed, or no model); says what to do."""


@runtime_checkable
class TokenToWav(Protocol):
    """Anything that turns speech codes into audio."""

    def synthesize(self, tokens: Sequence[int]) -> tuple[np.ndarray, int]:
        """(mono float32 waveform, sample rate) for `tokens` (CosyVoice 25 Hz codes, 0..4095)."""
        ...


def check_tokens(tokens: Sequence[int]) -> list[int]:
    """`tokens` as a list of ints, each a valid speech code; ValueError naming the first bad one."""
    out = [int(t) for t in tokens]
    if not out:
        raise ValueError("no speech tokens to synthesize")
    for i, t in enumerate(out):
        if not 0 <= t < SPEECH_CODES:
            raise ValueError(f"speech token {i} is {t}, outside 0..{SPEECH_CODES - 1}")
    return out


class CosyVoiceTokenToWav:
    """CosyVoice's token-to-wav path: flow decoder + HiFT vocoder, voice from a prompt recording.

    model_dir: a CosyVoice model folder (cosyvoice.yaml, flow.pt, hift.pt, campplus.onnx, speech
    tokenizer). prompt_wav: a few seconds of the voice to speak with (any rate; read at 16 kHz).
    """

    def __init__(self, model_dir: str, prompt_wav: str):
        try:
            from cosyvoice.cli.cosyvoice import CosyVoice  # noqa: F401  (imported here: optional, heavy)
        except ImportError as err:
            raise TokenToWavUnavailable(f"{COSYVOICE_INSTALL_HINT}\n(import error: {err})") from None
        from pathlib import Path

        if not model_dir or not Path(model_dir).is_dir():
            raise TokenToWavUnavailable(f"CosyVoice model folder not found: {model_dir!r}")
        if not prompt_wav or not Path(prompt_wav).is_file():
            raise TokenToWavUnavailable(f"voice prompt recording not found: {prompt_wav!r} (CosyVoice needs one)")
        self._cosyvoice = CosyVoice(model_dir)
        self.sample_rate = int(getattr(self._cosyvoice, "sample_rate", 22050))
        self._speaker = self._prompt_inputs(prompt_wav)

    def _prompt_inputs(self, prompt_wav: str) -> dict:
        """The flow's speaker conditioning from the prompt: its speech tokens, mel and embedding."""
        import torch

        from echat.model.features import AudioRef, decode_audio

        speech_16k = torch.from_numpy(decode_audio(AudioRef(path=prompt_wav))).unsqueeze(0)
        frontend = self._cosyvoice.frontend
        if self.sample_rate != 16_000:
            import soxr

            resampled = torch.from_numpy(soxr.resample(speech_16k[0].numpy(), 16_000, self.sample_rate)).unsqueeze(0)
        else:
            resampled = speech_16k
        # CosyVoice's own frontend helpers, as its zero-shot and voice-conversion paths use them.
        prompt_token, _ = frontend._extract_speech_token(speech_16k)
        prompt_feat, _ = frontend._extract_speech_feat(resampled)
        embedding = frontend._extract_spk_embedding(speech_16k)
        return {"flow_prompt_speech_token": prompt_token, "prompt_speech_feat": prompt_feat, "flow_embedding": embedding}

    def synthesize(self, tokens: Sequence[int]) -> tuple[np.ndarray, int]:
        import torch

        codes = torch.tensor([check_tokens(tokens)], dtype=torch.int32)
        # `vc` is CosyVoice's tokens-in, speech-out path (voice conversion feeds it source tokens);
        # it sets up and clears its own per-request caches around `token2wav`.
        pieces = [out["tts_speech"] for out in self._cosyvoice.model.vc(source_speech_token=codes, stream=False, **self._speaker)]
        waveform = torch.cat(pieces, dim=1)[0].float().cpu().numpy()
        return waveform.astype(np.float32, copy=False), self.sample_rate


BACKENDS = ("cosyvoice",)


def load_token2wav(backend: str = "cosyvoice", *, model_dir: str | None = None, prompt_wav: str | None = None) -> TokenToWav:
    """The named backend, ready to synthesize; TokenToWavUnavailable says what is missing."""
    if backend == "cosyvoice":
        return CosyVoiceTokenToWav(model_dir or "", prompt_wav or "")
    raise ValueError(f"unknown token-to-wav backend {backend!r}; known: {', '.join(BACKENDS)}")
