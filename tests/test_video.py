"""MP4 writing (H.264 + AAC, atomic), decoding back, and contact sheets."""

import numpy as np
import pytest
from PIL import Image

from hlwq.quant.errors import InvalidOptionError
from hlwq.runtime.video import (
    contact_sheet,
    probe_mp4,
    read_frames,
    sample_frame_indices,
    write_contact_sheet,
    write_mp4,
)


def clip(frames=17, height=64, width=96, seed=0):
    """Smooth moving gradients: compress like video, unlike noise."""
    t, y, x = np.meshgrid(np.arange(frames), np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    rng = np.random.default_rng(seed)
    phases = rng.random(3) * 6
    return np.stack([0.5 + 0.5 * np.sin(4 * x + 3 * y + 0.3 * t + p) for p in phases], axis=-1).astype(np.float32)


def tone(seconds, rate, channels=2):
    samples = np.sin(2 * np.pi * 440 * np.arange(int(seconds * rate)) / rate).astype(np.float32) * 0.5
    return np.repeat(samples[None], channels, axis=0)


def test_mp4_has_h264_video_and_aac_audio_with_every_frame(tmp_path):
    frames = clip(17)
    path = write_mp4(tmp_path / "out" / "a.mp4", frames, fps=24, audio=tone(17 / 24, 24000), sample_rate=24000)
    info = probe_mp4(path)
    assert (info.frames, info.width, info.height, info.fps) == (17, 96, 64, 24.0)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert (info.audio_channels, info.audio_sample_rate) == (2, 24000)
    # AAC pads to whole 1024-sample frames; never loses audio.
    assert 17 / 24 * 24000 <= info.audio_samples < 17 / 24 * 24000 + 2048
    decoded = read_frames(path).astype(np.float32) / 255
    assert decoded.shape == (17, 64, 96, 3)
    assert np.abs(decoded - frames).mean() < 0.02  # crf 18 on smooth content
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.mp4"]  # no temp file left


def test_mono_audio_at_a_rate_aac_lacks_is_resampled(tmp_path):
    info = probe_mp4(write_mp4(tmp_path / "m.mp4", clip(9), 8, tone(9 / 8, 22000, channels=1)[0], 22000))
    assert (info.audio_channels, info.audio_sample_rate) == (1, 22050)
    assert info.frames == 9 and info.has_audio


def test_video_only_and_uint8_frames(tmp_path):
    frames = (clip(9) * 255).astype(np.uint8)
    info = probe_mp4(write_mp4(tmp_path / "v.mp4", frames, fps=25))
    assert info.frames == 9 and not info.has_audio and info.duration_s == pytest.approx(9 / 25)


def test_same_input_gives_same_bytes(tmp_path):
    frames, audio = clip(9), tone(9 / 24, 24000)
    first = write_mp4(tmp_path / "1.mp4", frames, 24, audio, 24000).read_bytes()
    assert write_mp4(tmp_path / "2.mp4", frames, 24, audio, 24000).read_bytes() == first


def test_failed_write_leaves_the_previous_file(tmp_path):
    target = write_mp4(tmp_path / "keep.mp4", clip(9), 24)
    before = target.read_bytes()
    with pytest.raises(InvalidOptionError, match="NaN"):
        write_mp4(target, clip(9), 24, audio=np.full((2, 100), np.nan), sample_rate=24000)
    bad = clip(9)
    bad[3] = np.nan
    with pytest.raises(InvalidOptionError, match="NaN"):
        write_mp4(target, bad, 24)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.mp4"]


@pytest.mark.parametrize("kwargs, message", [
    ({"frames": np.zeros((9, 33, 64, 3))}, "even sides"),
    ({"frames": np.zeros((9, 32, 32))}, "shape"),
    ({"fps": 0}, "fps"),
    ({"audio": np.zeros((3, 10)), "sample_rate": 24000}, "1 or 2 channels"),
    ({"audio": np.zeros(10), "sample_rate": None}, "sample_rate"),
])
def test_bad_inputs_are_named(tmp_path, kwargs, message):
    arguments = {"frames": clip(9, 32, 32), "fps": 24, **kwargs}
    with pytest.raises(InvalidOptionError, match=message):
        write_mp4(tmp_path / "x.mp4", **arguments)


def test_frame_sampling_spans_the_clip():
    assert sample_frame_indices(121, 8) == [0, 17, 34, 51, 69, 86, 103, 120]
    assert sample_frame_indices(5, 8) == [0, 1, 2, 3, 4]
    assert sample_frame_indices(9, 1) == [0]


def test_contact_sheet_grid_holds_sampled_frames_in_order(tmp_path):
    frames = np.zeros((17, 32, 64, 3), dtype=np.uint8)
    frames[:, :, :, 0] = np.arange(17)[:, None, None] * 15  # red channel encodes the frame index
    sheet = contact_sheet(frames, samples=8, columns=4, gap=2)
    assert sheet.size == (4 * 64 + 5 * 2, 2 * 32 + 3 * 2)
    reds = [sheet.getpixel((2 + c * 66 + 10, 2 + r * 34 + 10))[0] for r in range(2) for c in range(4)]
    assert reds == [i * 15 for i in sample_frame_indices(17, 8)]
    path = write_contact_sheet(tmp_path / "sheets" / "s.png", frames)
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == sheet.size


WRITE_IN_A_PROCESS = """
import sys
import numpy as np
from hlwq.runtime.video import write_mp4
rng = np.random.default_rng(7)
frames = rng.random((25, 64, 96, 3), dtype=np.float32)   # noise: the encoder works hardest
audio = (rng.standard_normal((2, 48000)) * 0.1).astype(np.float32)
write_mp4(sys.argv[1], frames, 24.0, audio, 48000)
"""


def test_two_processes_write_byte_identical_mp4s(tmp_path):
    """Same frames, same bytes: what a render key promises, whatever the timing or cores."""
    import subprocess
    import sys

    paths = [tmp_path / "a" / "clip.mp4", tmp_path / "b" / "clip.mp4"]
    runs = [subprocess.Popen([sys.executable, "-c", WRITE_IN_A_PROCESS, str(path)]) for path in paths]
    assert [run.wait(timeout=300) for run in runs] == [0, 0]
    first, second = (path.read_bytes() for path in paths)
    assert first == second
    assert b"Lavf" not in first                     # no muxer version tag (bit-exact mode)
    assert probe_mp4(paths[0]).frames == 25
