"""Audio in and out: decode any file or byte string to 16 kHz mono float32, encode FLAC.

Decoding goes through libsndfile (soundfile) first: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF and
friends. What libsndfile cannot read (m4a/AAC, WebM, ...) falls back to torchcodec's AudioDecoder,
which uses the system FFmpeg libraries. Files are probed before they are read, so a file that is too
long or has too many channels is refused without reading its samples.

Every refusal raises `AudioError` with a short reason code (see `decode.py` for the list) so that a
caller can turn it into a reject without parsing messages.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

TARGET_SAMPLE_RATE = 16_000
RESAMPLE_QUALITY = "VHQ"  # soxr's best; resampling is a small share of the decode time
READ_BLOCK_SECONDS = 0.5  # read block by block, downmixing as they come; short blocks localise a
# decode error, so a file cut off part-way is told apart (truncated) from one unreadable from the start
# A decoder may legitimately deliver slightly fewer frames than a header promised (MP3 padding,
# header durations estimated from the bitrate); fewer than this is not called truncation.
TRUNCATION_TOLERANCE_S = 0.05
FALLBACK_TRUNCATION_TOLERANCE = 0.05  # and for FFmpeg-decoded files, 5% of the header duration

Source = str | os.PathLike | bytes


class AudioError(Exception):
    """Audio that cannot or should not be decoded; `reason` is the reject code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedAudio:
    waveform: np.ndarray  # float32, mono, at `sample_rate`
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_duration: float  # seconds, from the frames actually decoded
    decoder: str  # "soundfile" or "torchcodec"


def load_audio(
    source: Source,
    *,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    max_seconds: float | None = None,
    max_channels: int | None = None,
    quality: str = RESAMPLE_QUALITY,
) -> DecodedAudio:
    """Decode a path, a URI (through fsspec) or the bytes of an audio file to mono float32 at
    `target_sample_rate`.

    Raises AudioError with reason missing_file, empty_file, decode_error, truncated, too_long or
    too_many_channels.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError("empty_file", "0 bytes")
        opener, label = (lambda: io.BytesIO(data)), "<bytes>"
    elif "://" in os.fspath(source):
        opener, label = _uri_opener(os.fspath(source)), os.fspath(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            what = "not a regular file" if os.path.exists(path) else "no such file"
            raise AudioError("missing_file", f"{what}: {path}")
        if os.path.getsize(path) == 0:
            raise AudioError("empty_file", f"0 bytes: {path}")
        opener, label = (lambda: path), path

    import soundfile as sf

    try:
        info = sf.info(opener())
    except sf.LibsndfileError as sf_error:
        # Not a format libsndfile knows (or not audio at all): let FFmpeg try before giving up.
        mono, sr, channels = _decode_with_torchcodec(opener(), label, max_seconds, max_channels, sf_error)
        decoder = "torchcodec"
    else:
        mono, sr, channels = _decode_with_soundfile(opener(), label, info, max_seconds, max_channels)
        decoder = "soundfile"

    duration = len(mono) / sr
    waveform = resample(mono, sr, target_sample_rate, quality=quality)
    return DecodedAudio(waveform, target_sample_rate, sr, channels, duration, decoder)


def _uri_opener(uri: str):
    """A function opening `uri` (gs://, s3://, hf://, memory://...) as a seekable file, via fsspec.

    Seekable, so the header checks (length, channels) read only the start of a remote file.
    """
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:  # e.g. gs:// without gcsfs installed
        raise AudioError("decode_error", f"cannot open {uri}: {exc}") from None
    if not fs.isfile(path):
        raise AudioError("missing_file", f"no such file: {uri}")
    if fs.size(path) == 0:
        raise AudioError("empty_file", f"0 bytes: {uri}")
    return lambda: fs.open(path, "rb")


def decode_bytes(data: bytes, **options) -> DecodedAudio:
    """`load_audio` on the bytes of an audio file (a parquet audio column, an object store blob)."""
    return load_audio(bytes(data), **options)


def _check_limits(label: str, duration: float | None, channels: int, max_seconds, max_channels) -> None:
    if max_channels is not None and channels > max_channels:
        raise AudioError("too_many_channels", f"{channels} channels (limit {max_channels}): {label}")
    if max_seconds is not None and duration is not None and duration > max_seconds:
        raise AudioError("too_long", f"{duration:.1f} s (limit {max_seconds:.1f} s): {label}")


def _decode_with_soundfile(file: str | BinaryIO, label: str, info, max_seconds, max_channels):
    import soundfile as sf

    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("empty_file", f"0 frames ({info.format}): {label}")
    _check_limits(label, info.frames / info.samplerate, info.channels, max_seconds, max_channels)
    tolerance = int(TRUNCATION_TOLERANCE_S * info.samplerate)
    _check_wav_data_chunk(info, label, tolerance)

    blocks, frames_read = [], 0
    block_frames = int(READ_BLOCK_SECONDS * info.samplerate)
    try:
        with sf.SoundFile(file) as f:
            for block in f.blocks(blocksize=block_frames, dtype="float32", always_2d=True):
                blocks.append(to_mono(block))
                frames_read += len(block)
    except (sf.LibsndfileError, RuntimeError) as exc:
        if 0 < frames_read < info.frames:
            raise AudioError("truncated", f"decoded {frames_read} of {info.frames} frames, then: {exc}: {label}")
        raise AudioError("decode_error", f"{type(exc).__name__}: {exc}: {label}") from exc
    if frames_read < info.frames - tolerance:
        raise AudioError("truncated", f"decoded {frames_read} of {info.frames} frames the header claims: {label}")
    if frames_read == 0:
        raise AudioError("empty_file", f"0 frames decoded: {label}")
    return np.concatenate(blocks), info.samplerate, info.channels


# libsndfile reads a truncated WAV without complaint: it shortens the frame count to the bytes
# present and only notes it in its log, e.g. "data : 64000 (should be 31978)".
_WAV_DATA_SIZE = re.compile(r"^\s*data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
_STREAMING_SIZES = (0, 0xFFFFFFFF, 0x7FFFFFFF)  # written by encoders that did not know the length


def _check_wav_data_chunk(info, label: str, tolerance_frames: int) -> None:
    match = _WAV_DATA_SIZE.search(info.extra_info or "")
    if not match:
        return
    declared, present = int(match.group(1)), int(match.group(2))
    if declared in _STREAMING_SIZES:
        return
    bytes_per_frame = _bytes_per_frame(info)
    if declared - present > tolerance_frames * bytes_per_frame:
        missing_s = (declared - present) / bytes_per_frame / info.samplerate
        raise AudioError(
            "truncated",
            f"data chunk declares {declared} bytes but only {present} are present ({missing_s:.2f} s missing): {label}",
        )


def _bytes_per_frame(info) -> int:
    m = re.search(r"Block Align\s*:\s*(\d+)", info.extra_info or "")
    if m and int(m.group(1)) > 0:
        return int(m.group(1))
    bits = {"PCM_U8": 8, "PCM_S8": 8, "PCM_16": 16, "PCM_24": 24, "PCM_32": 32, "FLOAT": 32, "DOUBLE": 64}
    return max(1, bits.get(info.subtype, 16) // 8 * info.channels)


def _decode_with_torchcodec(file, label: str, max_seconds, max_channels, sf_error: Exception):
    try:
        from torchcodec.decoders import AudioDecoder
    except Exception as exc:  # noqa: BLE001 - torchcodec missing or its FFmpeg libraries absent
        raise AudioError("decode_error", f"libsndfile: {sf_error}; FFmpeg fallback unavailable ({exc}): {label}")

    source = file if isinstance(file, str) else file.getvalue()
    try:
        decoder = AudioDecoder(source)
        meta = decoder.metadata
    except Exception as exc:
        raise AudioError("decode_error", f"libsndfile: {sf_error}; FFmpeg: {_first_line(exc)}: {label}") from exc
    channels = int(meta.num_channels or 0)
    header_duration = meta.duration_seconds_from_header
    _check_limits(label, header_duration, channels, max_seconds, max_channels)
    try:
        samples = decoder.get_all_samples()
    except Exception as exc:
        raise AudioError("decode_error", f"FFmpeg ({meta.codec}): {_first_line(exc)}: {label}") from exc
    data = samples.data.numpy()  # (channels, frames) float32
    sr = int(samples.sample_rate)
    if data.size == 0:
        raise AudioError("empty_file", f"0 frames decoded ({meta.codec}): {label}")
    duration = data.shape[1] / sr
    _check_limits(label, duration, data.shape[0], max_seconds, max_channels)  # headers may omit them
    if header_duration and duration < header_duration * (1 - FALLBACK_TRUNCATION_TOLERANCE) - TRUNCATION_TOLERANCE_S:
        raise AudioError("truncated", f"decoded {duration:.2f} s of the {header_duration:.2f} s in the header: {label}")
    return to_mono(data.T), sr, data.shape[0]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}"


def to_mono(frames: np.ndarray) -> np.ndarray:
    """Mean of the channels of a (frames, channels) array, as float32; 1-D input is returned as is."""
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim == 1:
        return frames
    if frames.shape[1] == 1:
        return frames[:, 0]
    return frames.mean(axis=1, dtype=np.float32)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int, quality: str = RESAMPLE_QUALITY) -> np.ndarray:
    """Band-limited resampling with soxr; float32 in, float32 out."""
    waveform = np.asarray(waveform, dtype=np.float32)
    if from_rate == to_rate:
        return waveform
    import soxr

    return soxr.resample(waveform, from_rate, to_rate, quality=quality).astype(np.float32, copy=False)


def peak_dbfs(waveform: np.ndarray) -> float:
    """Highest absolute sample, dB relative to full scale (-inf for digital silence)."""
    peak = float(np.max(np.abs(waveform))) if len(waveform) else 0.0
    return 20.0 * np.log10(peak) if peak > 0 else float("-inf")


def encode_flac(waveform: np.ndarray, sample_rate: int = TARGET_SAMPLE_RATE) -> bytes:
    """16-bit FLAC bytes of a mono float waveform (the `audio` column of a shard)."""
    import soundfile as sf

    # libsndfile does not clip float input when converting to 16-bit; out-of-range samples
    # (resampler overshoot on clipped sources) would wrap around, so clip first.
    pcm = np.clip(np.asarray(waveform, dtype=np.float32), -1.0, 1.0)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()
