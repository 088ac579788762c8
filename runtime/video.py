"""Video files for renders: MP4 (H.264 video + AAC audio) written atomically, read back, contact sheets.

Frames come in as the pipelines give them with ``output_type="np"``: ``(frames, height, width, 3)``
floats in [0, 1] (uint8 is accepted too). Audio is a waveform ``(channels, samples)`` or
``(samples,)`` in [-1, 1] at ``sample_rate``.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from hlwq.quant.errors import InvalidOptionError
from hlwq.store.atomic import atomic_path, atomic_write_bytes

VIDEO_CODEC = "libx264"
AUDIO_CODEC = "aac"
# Constant quality; 18 is visually lossless for x264 and keeps files of the tiny fixtures small.
# One thread and bit-exact flags: the same frames give the same bytes in any process and on any
# core count ("same render key, same video"); threaded x264 decides by timing.
H264_OPTIONS = {"crf": "18", "preset": "medium", "threads": "1", "flags": "+bitexact"}
AAC_OPTIONS = {"flags": "+bitexact"}
# Muxer: no library version tag, no creation time (libavformat's bit-exact mode).
MP4_OPTIONS = {"fflags": "+bitexact"}
AUDIO_BIT_RATE = 128_000


@dataclass(frozen=True)
class VideoInfo:
    """What a decoded MP4 holds: counted from the decoded frames, not taken from the header."""

    frames: int
    width: int
    height: int
    fps: float
    video_codec: str
    audio_codec: str | None
    audio_channels: int
    audio_sample_rate: int
    audio_samples: int

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None

    @property
    def duration_s(self) -> float:
        return self.frames / self.fps


def to_uint8_frames(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, 3) float in [0, 1] or uint8 -> contiguous uint8 (T, H, W, 3)."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise InvalidOptionError(
            f"video frames must have shape (frames, height, width, 3) with at least one frame, "
            f"got {frames.shape}"
        )
    if frames.dtype == np.uint8:
        return np.ascontiguousarray(frames)
    if not np.isfinite(frames).all():
        raise InvalidOptionError("video frames hold NaN or Inf values")
    return np.ascontiguousarray((np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def _planar_audio(audio: np.ndarray) -> np.ndarray:
    """Waveform -> float32 (channels, samples) clipped to [-1, 1]; at most two channels."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None, :]
    if audio.ndim != 2 or audio.shape[0] not in (1, 2) or audio.shape[1] == 0:
        raise InvalidOptionError(
            f"audio must have shape (samples,) or (channels, samples) with 1 or 2 channels, "
            f"got {audio.shape}"
        )
    if not np.isfinite(audio).all():
        raise InvalidOptionError("audio holds NaN or Inf values")
    return np.ascontiguousarray(np.clip(audio, -1.0, 1.0))


def _aac_rate(sample_rate: int) -> int:
    """The AAC encoder takes a fixed set of rates: keep ours when allowed, else the next one up."""
    rates = sorted(av.codec.Codec(AUDIO_CODEC, "w").audio_rates)
    return next((rate for rate in rates if rate >= sample_rate), rates[-1])


def write_mp4(
    path: str | Path,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
) -> Path:
    """Write an MP4 (H.264 yuv420p, AAC when audio is given) atomically; return its path."""
    video = to_uint8_frames(frames)
    _, height, width, _ = video.shape
    if height % 2 or width % 2:
        raise InvalidOptionError(f"H.264 yuv420p needs even sides, got {width}x{height}")
    if not (fps > 0 and math.isfinite(fps)):
        raise InvalidOptionError(f"fps must be a positive number, got {fps}")
    waveform = None
    if audio is not None:
        if not sample_rate or sample_rate <= 0:
            raise InvalidOptionError(f"audio needs a positive sample_rate, got {sample_rate}")
        waveform = _planar_audio(audio)

    path = Path(path)
    # The temp name ends in .tmp, so the container format is named, not guessed.
    with (atomic_path(path) as tmp,
          av.open(str(tmp), mode="w", format="mp4", options=dict(MP4_OPTIONS)) as container):
        video_stream = container.add_stream(VIDEO_CODEC, rate=Fraction(fps).limit_denominator(1001))
        video_stream.width, video_stream.height = width, height
        video_stream.pix_fmt = "yuv420p"
        video_stream.options = dict(H264_OPTIONS)
        video_stream.thread_count = 1
        audio_stream = None
        if waveform is not None:
            audio_stream = container.add_stream(AUDIO_CODEC, rate=_aac_rate(sample_rate))
            audio_stream.layout = "mono" if waveform.shape[0] == 1 else "stereo"
            audio_stream.bit_rate = AUDIO_BIT_RATE
            audio_stream.options = dict(AAC_OPTIONS)
        for image in video:
            container.mux(video_stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(video_stream.encode())
        if audio_stream is not None:
            frame = av.AudioFrame.from_ndarray(waveform, format="fltp", layout=audio_stream.layout.name)
            frame.sample_rate = sample_rate
            frame.pts = 0
            frame.time_base = Fraction(1, sample_rate)
            container.mux(audio_stream.encode(frame))
            container.mux(audio_stream.encode())
    return path


def probe_mp4(path: str | Path) -> VideoInfo:
    """Decode every video and audio frame of a file and report what is really there."""
    with av.open(str(path)) as container:
        video_stream = container.streams.video[0]
        audio_streams = container.streams.audio
        streams = [video_stream, *audio_streams[:1]]
        frames = audio_samples = 0
        width = height = 0
        for frame in container.decode(*streams):
            if isinstance(frame, av.VideoFrame):
                frames += 1
                width, height = frame.width, frame.height
            else:
                audio_samples += frame.samples
        audio = audio_streams[0] if audio_streams else None
        return VideoInfo(
            frames=frames,
            width=width,
            height=height,
            fps=float(video_stream.average_rate or video_stream.guessed_rate),
            video_codec=video_stream.codec_context.name,
            audio_codec=audio.codec_context.name if audio else None,
            audio_channels=audio.codec_context.channels if audio else 0,
            audio_sample_rate=audio.codec_context.sample_rate if audio else 0,
            audio_samples=audio_samples,
        )


def read_frames(path: str | Path) -> np.ndarray:
    """All video frames of a file as uint8 (T, H, W, 3)."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def sample_frame_indices(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over `total` frames, always first and last."""
    if total <= count:
        return list(range(total))
    return [round(i * (total - 1) / (count - 1)) for i in range(count)] if count > 1 else [0]


def contact_sheet(frames: np.ndarray, samples: int = 8, columns: int = 4, gap: int = 2) -> Image.Image:
    """A grid of `samples` frames spread over the clip, in time order, on a dark background."""
    video = to_uint8_frames(frames)
    picks = video[sample_frame_indices(len(video), samples)]
    _, height, width, _ = picks.shape
    columns = min(columns, len(picks))
    rows = math.ceil(len(picks) / columns)
    sheet = Image.new("RGB", (columns * width + (columns + 1) * gap, rows * height + (rows + 1) * gap), (16, 16, 16))
    for index, image in enumerate(picks):
        row, column = divmod(index, columns)
        sheet.paste(Image.fromarray(image), (gap + column * (width + gap), gap + row * (height + gap)))
    return sheet


def write_contact_sheet(path: str | Path, frames: np.ndarray, samples: int = 8, columns: int = 4) -> Path:
    """Write the contact sheet of a clip as a PNG, atomically."""
    buffer = io.BytesIO()
    contact_sheet(frames, samples=samples, columns=columns).save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def thumbnail_jpeg(path: str | Path, max_width: int) -> bytes:
    """A JPEG of an image at most ``max_width`` wide: small enough for a Prefect artifact."""
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()
