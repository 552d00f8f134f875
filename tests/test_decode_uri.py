"""Decoding from a URI: the same checks as a local path, through fsspec.

fsspec's in-memory filesystem stands in for an object store (gs://, s3://), which cannot be
reached from here; the code path (url_to_fs, isfile, size, a seekable open) is the same.
"""

import io

import fsspec
import numpy as np
import soundfile as sf

from echat.labelers.decode import DecodeAudio
from echat.schemas.stage import Reject


def _put(uri: str, data: bytes) -> None:
    with fsspec.open(uri, "wb") as handle:
        handle.write(data)


def test_audio_at_a_uri_decodes_and_bad_uris_are_rejected():
    buf = io.BytesIO()
    tone = (0.3 * np.sin(2 * np.pi * 220 * np.arange(44100) / 44100)).astype(np.float32)
    sf.write(buf, np.stack([tone, tone], axis=1), 44100, format="WAV")
    _put("memory://bucket/corpus/tone.wav", buf.getvalue())
    _put("memory://bucket/corpus/empty.wav", b"")
    stage = DecodeAudio()
    (out,) = stage.process({"source_uri": "memory://bucket/corpus/tone.wav"})
    assert not isinstance(out, Reject)
    assert out["sampling_rate"] == 16000 and abs(len(out["_waveform"]) - 16000) <= 1 and out["_source_channels"] == 2
    reasons = {}
    for uri in ("memory://bucket/corpus/missing.wav", "memory://bucket/corpus/empty.wav", "nosuchproto://x/y.wav"):
        (rej,) = stage.process({"source_uri": uri})
        reasons[uri.rsplit("/", 1)[1]] = (rej.reason, rej.detail)
    assert reasons["missing.wav"][0] == "missing_file"
    assert reasons["empty.wav"][0] == "empty_file"
    assert reasons["y.wav"][0] == "decode_error" and "nosuchproto" in reasons["y.wav"][1]
