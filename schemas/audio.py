"""Audio in and out, for every folder: decode any file or byte string to mono float32 at 16 kHz,
probe a file's length from its header, encode FLAC.

One decoder for the build (labelers/decode.py), the reply TTS (synth/) and the model's loaders
(model/features.py, model/inference.py), so a file that builds also loads for training and
inference. Torch-free at import: torchcodec is imported only when the FFmpeg fallback is needed.

Decoding goes through libsndfile (soundfile) first: WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF and
friends. What libsndfile cannot read (m4a/AAC, WebM, ...) falls back to torchcodec's AudioDecoder,
which uses the system FFmpeg libraries. Files are probed before they are read, so a file that is too
long or has too many channels is refused without reading its samples. A span of a file (`start`,
`end` in seconds) is cut at the file's own rate, then resampled.

Every refusal raises `AudioError` with a short reason code (missing_file, empty_file, decode_error,
truncated, too_long, too_many_channels; labelers/decode.py documents them) so that a caller can turn
it into a reject without parsing messages.
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


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, without decoding its samples."""

    sample_rate: int
    frames: int  # at `sample_rate`
    channels: int
    decoder: str  # "soundfile" or "torchcodec"

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def load_audio(
    source: Source,
    *,
    target_sample_rate: int = TARGET_SAMPLE_RATE,
    max_seconds: float | None = None,
    max_channels: int | None = None,
    quality: str = RESAMPLE_QUALITY,
    start: float | None = None,
    end: float | None = None,
) -> DecodedAudio:
    """Decode a path, a URI (through fsspec) or the bytes of an audio file to mono float32 at
    `target_sample_rate`; with `start`/`end` (seconds), only that span of the file.

    Raises AudioError with reason missing_file, empty_file, decode_error, truncated, too_long or
    too_many_channels (`max_seconds` bounds what is decoded: the file, or the span).
    """
    opener, label = _opener(source)
    span = _Span(start, end)

    import soundfile as sf

    try:
        info = sf.info(opener())
    except sf.LibsndfileError as sf_error:
        # Not a format libsndfile knows (or not audio at all): let FFmpeg try before giving up.
        mono, sr, channels = _decode_with_torchcodec(opener(), label, max_seconds, max_channels, sf_error, span)
        decoder = "torchcodec"
    else:
        mono, sr, channels = _decode_with_soundfile(opener(), label, info, max_seconds, max_channels, span)
        decoder = "soundfile"

    duration = len(mono) / sr
    waveform = resample(mono, sr, target_sample_rate, quality=quality)
    return DecodedAudio(waveform, target_sample_rate, sr, channels, duration, decoder)


def probe_audio(source: Source) -> AudioInfo:
    """Sample rate, length and channels of an audio file from its header (libsndfile, else FFmpeg).

    A container whose header gives no duration is decoded to count its frames. Raises AudioError
    like `load_audio`.
    """
    opener, label = _opener(source)
    import soundfile as sf

    try:
        info = sf.info(opener())
    except sf.LibsndfileError as sf_error:
        decoder = _torchcodec_decoder(opener(), label, sf_error)
        meta = decoder.metadata
        rate = int(meta.sample_rate or 0)
        duration = meta.duration_seconds_from_header
        if duration is None or rate <= 0:
            mono, rate, channels = _decode_with_torchcodec(opener(), label, None, None, sf_error, _Span(None, None))
            return AudioInfo(rate, len(mono), channels, "torchcodec")
        return AudioInfo(rate, int(round(duration * rate)), int(meta.num_channels or 0), "torchcodec")
    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("empty_file", f"0 frames ({info.format}): {label}")
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels), "soundfile")


@dataclass(frozen=True)
class _Span:
    start: float | None  # seconds
    end: float | None

    def frames(self, rate: int, total: int, label: str) -> tuple[int, int]:
        """[first, stop) frame indices of the span in a file of `total` frames at `rate`."""
        first = int(round((self.start or 0.0) * rate))
        stop = min(int(round(self.end * rate)), total) if self.end is not None else total
        if first < 0 or stop <= first:
            raise AudioError("empty_file", f"span {self.start}-{self.end} s holds no frames of the {total / rate:.2f} s file: {label}")
        return first, stop

    @property
    def whole(self) -> bool:
        return self.start is None and self.end is None


def _opener(source: Source):
    """(a function opening `source` afresh, a label naming it); refuses a missing or empty one."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError("empty_file", "0 bytes")
        return (lambda: io.BytesIO(data)), "<bytes>"
    if "://" in os.fspath(source):
        return _uri_opener(os.fspath(source)), os.fspath(source)
    path = os.fspath(source)
    if not os.path.isfile(path):
        what = "not a regular file" if os.path.exists(path) else "no such file"
        raise AudioError("missing_file", f"{what}: {path}")
    if os.path.getsize(path) == 0:
        raise AudioError("empty_file", f"0 bytes: {path}")
    if not _utf8_encodable(path):  # libsndfile and FFmpeg take names as UTF-8: read such a file ourselves
        with open(path, "rb") as handle:
            data = handle.read()
        return (lambda: io.BytesIO(data)), path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return (lambda: path), path


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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
    return lambda: fs.open(path, "rb", cache_type="readahead")  # gcsfs's default reader makes ~120 range requests for a small WAV


def decode_bytes(data: bytes, **options) -> DecodedAudio:
    """`load_audio` on the bytes of an audio file (a parquet audio column, an object store blob)."""
    return load_audio(bytes(data), **options)


def _check_limits(label: str, duration: float | None, channels: int, max_seconds, max_channels) -> None:
    if max_channels is not None and channels > max_channels:
        raise AudioError("too_many_channels", f"{channels} channels (limit {max_channels}): {label}")
    if max_seconds is not None and duration is not None and duration > max_seconds:
        raise AudioError("too_long", f"{duration:.1f} s (limit {max_seconds:.1f} s): {label}")


def _decode_with_soundfile(file: str | BinaryIO, label: str, info, max_seconds, max_channels, span: _Span):
    import soundfile as sf

    if info.frames <= 0 or info.samplerate <= 0:
        raise AudioError("empty_file", f"0 frames ({info.format}): {label}")
    first, stop = span.frames(info.samplerate, info.frames, label)
    _check_limits(label, (stop - first) / info.samplerate, info.channels, max_seconds, max_channels)
    tolerance = int(TRUNCATION_TOLERANCE_S * info.samplerate)
    _check_wav_data_chunk(info, label, tolerance)

    blocks, frames_read, wanted = [], 0, stop - first
    block_frames = int(READ_BLOCK_SECONDS * info.samplerate)
    try:
        with sf.SoundFile(file) as f:
            if first:
                f.seek(first)
            for block in f.blocks(blocksize=block_frames, frames=wanted, dtype="float32", always_2d=True):
                blocks.append(to_mono(block))
                frames_read += len(block)
    except (sf.LibsndfileError, RuntimeError) as exc:
        if 0 < frames_read < wanted:
            raise AudioError("truncated", f"decoded {frames_read} of {wanted} frames, then: {exc}: {label}")
        raise AudioError("decode_error", f"{type(exc).__name__}: {exc}: {label}") from exc
    if frames_read < wanted - tolerance:
        raise AudioError("truncated", f"decoded {frames_read} of {wanted} frames the header claims: {label}")
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


def _torchcodec_decoder(file, label: str, sf_error: Exception):
    try:
        from torchcodec.decoders import AudioDecoder
    except Exception as exc:  # noqa: BLE001 - torchcodec missing or its FFmpeg libraries absent
        raise AudioError("decode_error", f"libsndfile: {sf_error}; FFmpeg fallback unavailable ({exc}): {label}")

    source = file if isinstance(file, str) else file.read()  # a fresh BytesIO or fsspec file
    try:
        decoder = AudioDecoder(source)
        decoder.metadata  # noqa: B018 - a file FFmpeg cannot parse fails here
    except Exception as exc:
        raise AudioError("decode_error", f"libsndfile: {sf_error}; FFmpeg: {_first_line(exc)}: {label}") from exc
    return decoder


def _decode_with_torchcodec(file, label: str, max_seconds, max_channels, sf_error: Exception, span: _Span):
    decoder = _torchcodec_decoder(file, label, sf_error)
    meta = decoder.metadata
    channels = int(meta.num_channels or 0)
    header_duration = meta.duration_seconds_from_header
    _check_limits(label, header_duration if span.whole else None, channels, max_seconds, max_channels)
    try:
        samples = decoder.get_all_samples()
    except Exception as exc:
        raise AudioError("decode_error", f"FFmpeg ({meta.codec}): {_first_line(exc)}: {label}") from exc
    data = samples.data.numpy()  # (channels, frames) float32
    sr = int(samples.sample_rate)
    if data.size == 0:
        raise AudioError("empty_file", f"0 frames decoded ({meta.codec}): {label}")
    duration = data.shape[1] / sr
    if span.whole:
        _check_limits(label, duration, data.shape[0], max_seconds, max_channels)  # headers may omit them
    if header_duration and duration < header_duration * (1 - FALLBACK_TRUNCATION_TOLERANCE) - TRUNCATION_TOLERANCE_S:
        raise AudioError("truncated", f"decoded {duration:.2f} s of the {header_duration:.2f} s in the header: {label}")
    if not span.whole:
        first, stop = span.frames(sr, data.shape[1], label)
        data = data[:, first:stop]
        _check_limits(label, data.shape[1] / sr, data.shape[0], max_seconds, max_channels)
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
