"""quant/video_metrics.py and runtime/block_probe.py on signals with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hlwq.quant.errors import InvalidOptionError, InvalidTensorError
from hlwq.quant.video_metrics import (
    DB_CAP,
    RATIO_CAP,
    activation_error,
    audio_noise_ratio,
    audio_snr_db,
    frame_psnr,
    frame_ssim,
    mel_distance,
    mel_filterbank,
    relative_l2_error,
    temporal_diff,
    video_metrics,
)
from hlwq.runtime.block_probe import BlockProbe, compare_block_outputs

RATE = 16_000


def clip(frames=5, height=24, width=32, seed=0) -> np.ndarray:
    """A moving gradient with texture: frame-to-frame motion and structure to compare."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    texture = rng.uniform(0, 0.2, (height, width))
    frames_ = [np.clip(0.3 + 0.4 * np.sin(6 * (x + 0.05 * t)) * y + texture, 0, 1)
               for t in range(frames)]
    return np.repeat(np.stack(frames_)[..., None], 3, axis=-1).astype(np.float32)


# ---- video ------------------------------------------------------------------------------------


def test_psnr_matches_the_definition_and_caps_identical_frames():
    reference = clip()
    assert torch.equal(frame_psnr(reference, reference), torch.full((5,), DB_CAP, dtype=torch.float64))
    shifted = reference.astype(np.float64) + 0.01          # MSE 1e-4 -> 40 dB
    shifted[reference > 0.99] = 0.99                        # stay inside [0, 1] where it matters
    assert frame_psnr(reference, np.clip(shifted, 0, 1)) == pytest.approx(
        torch.full((5,), 40.0, dtype=torch.float64), abs=0.05)


def test_uint8_frames_mean_the_same_as_floats():
    reference = clip()
    as_bytes = (reference * 255).round().astype(np.uint8)
    noisy = np.clip(reference + 0.05, 0, 1)
    assert frame_psnr(as_bytes, (noisy * 255).round().astype(np.uint8)) == pytest.approx(
        frame_psnr(as_bytes / 255.0, np.round(noisy * 255) / 255.0))


def test_the_worst_frame_is_found():
    reference = clip(frames=6)
    candidate = reference.copy()
    candidate[3] = np.clip(candidate[3] + np.random.default_rng(1).normal(0, 0.1, candidate[3].shape), 0, 1)
    metrics = video_metrics(reference, candidate)
    assert metrics["worst_frame"] == 3
    assert metrics["psnr_min"] < 25 < metrics["psnr_mean"]
    assert metrics["ssim_min"] < metrics["ssim_mean"] < 1.0
    # the gates' distances: per-frame MSE, its mean and its worst frame (PSNR's own MSE)
    assert metrics["psnr_min"] == pytest.approx(-10 * math.log10(metrics["mse_max"]))
    assert metrics["mse_mean"] == pytest.approx(metrics["mse_max"] / 6, rel=1e-9)


def test_ssim_is_one_for_equal_frames_and_falls_with_noise():
    reference = clip()
    rng = np.random.default_rng(2)
    assert frame_ssim(reference, reference) == pytest.approx(torch.ones(5, dtype=torch.float64))
    scores = [float(frame_ssim(reference, np.clip(reference + rng.normal(0, s, reference.shape), 0, 1)).mean())
              for s in (0.01, 0.05, 0.2)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def reference_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """SSIM the slow, literal way: Gaussian-weighted statistics of every full window."""
    taps = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma ** 2))
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    scores = []
    for channel in range(3):
        for top in range(x.shape[0] - size + 1):
            for left in range(x.shape[1] - size + 1):
                a = x[top:top + size, left:left + size, channel]
                b = y[top:top + size, left:left + size, channel]
                mu_a, mu_b = (weights * a).sum(), (weights * b).sum()
                var_a = (weights * (a - mu_a) ** 2).sum()
                var_b = (weights * (b - mu_b) ** 2).sum()
                cov = (weights * (a - mu_a) * (b - mu_b)).sum()
                scores.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                              / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(scores))


def test_ssim_matches_a_window_by_window_reference():
    reference = clip(frames=2, height=16, width=18).astype(np.float64)
    candidate = np.clip(reference + np.random.default_rng(7).normal(0, 0.05, reference.shape), 0, 1)
    fast = frame_ssim(reference, candidate)
    for frame in range(2):
        assert float(fast[frame]) == pytest.approx(
            reference_ssim(reference[frame], candidate[frame]), rel=1e-9)


def test_ssim_of_a_long_clip_is_the_ssim_of_each_frame():
    reference = clip(frames=19)                       # more frames than one SSIM pass holds
    candidate = np.clip(reference + np.random.default_rng(6).normal(0, 0.05, reference.shape), 0, 1)
    one_by_one = torch.cat([frame_ssim(reference[i:i + 1], candidate[i:i + 1]) for i in range(19)])
    assert frame_ssim(reference, candidate) == pytest.approx(one_by_one, rel=1e-12)


def test_ssim_window_shrinks_for_tiny_frames():
    reference = clip(height=6, width=8)
    assert frame_ssim(reference, reference).shape == (5,)


def test_temporal_diff_sees_changed_motion_not_a_constant_offset():
    reference = clip()
    brighter = reference + 0.05                       # same motion, every frame offset alike
    assert temporal_diff(reference, brighter) == pytest.approx(0.0, abs=1e-7)
    flicker = reference + 0.05 * (np.arange(5) % 2)[:, None, None, None]
    assert temporal_diff(reference, flicker) == pytest.approx(0.05, rel=1e-5)
    assert temporal_diff(reference[:1], reference[:1] + 0.3) == 0.0


def test_frames_are_checked():
    with pytest.raises(InvalidTensorError, match="shapes differ"):
        frame_psnr(clip(), clip(frames=4))
    with pytest.raises(InvalidTensorError, match=r"\(frames, height, width, 3\)"):
        frame_psnr(np.zeros((4, 8, 8)), np.zeros((4, 8, 8)))
    bad = clip()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidTensorError, match="NaN"):
        frame_ssim(clip(), bad)


# ---- audio ------------------------------------------------------------------------------------


def tone(freq=440.0, seconds=0.5, phase=0.0) -> np.ndarray:
    t = np.arange(int(RATE * seconds)) / RATE
    return np.sin(2 * math.pi * freq * t + phase)


def test_snr_matches_the_noise_power():
    reference = np.stack([tone(), tone(660.0)])       # two channels, power 0.5 each
    noise = np.random.default_rng(3).normal(0, math.sqrt(0.5 / 100), reference.shape)   # 20 dB
    assert audio_snr_db(reference, reference + noise) == pytest.approx(20.0, abs=0.2)
    assert audio_snr_db(reference, reference) == DB_CAP
    # the gates' distance is the same ratio, not in dB: noise energy / signal energy
    ratio = audio_noise_ratio(reference, reference + noise)
    assert ratio == pytest.approx(10 ** (-audio_snr_db(reference, reference + noise) / 10))
    assert audio_noise_ratio(reference, reference) == 0.0
    assert audio_noise_ratio(np.zeros(8), np.ones(8)) == RATIO_CAP     # silent source: capped


def test_mel_distance_reads_a_gain_in_db_and_forgives_a_phase_shift():
    noise = np.random.default_rng(4).normal(0, 0.1, RATE)
    assert mel_distance(noise, noise, RATE) == 0.0
    assert mel_distance(noise, 2 * noise, RATE) == pytest.approx(20 * math.log10(2), abs=0.05)
    # A phase shift wrecks the waveform SNR but leaves the spectrum where it was.
    shifted = tone(phase=math.pi / 2)
    assert audio_snr_db(tone(), shifted) < 1.0
    assert mel_distance(tone(), shifted, RATE) < 1.0


def test_mel_filterbank_is_a_set_of_ordered_triangles():
    bank = mel_filterbank(40, 512, RATE)
    assert bank.shape == (40, 257) and bank.dtype == torch.float64
    assert float(bank.min()) == 0.0 and float(bank.max()) <= 1.0 + 1e-12
    peaks = bank.argmax(dim=1)
    assert torch.all(peaks[1:] >= peaks[:-1])
    assert float(bank.sum(dim=0)[10:-10].min()) > 0       # every inner frequency is covered
    with pytest.raises(InvalidOptionError, match="n_mels"):
        mel_filterbank(0, 512, RATE)


def test_short_audio_still_has_a_spectrum():
    assert mel_distance(tone(seconds=0.002), tone(seconds=0.002) * 0.5, RATE) > 0


# ---- latents and activations --------------------------------------------------------------------


def test_relative_error_and_activation_error():
    generator = torch.Generator().manual_seed(5)
    reference = torch.randn(64, 32, generator=generator)
    candidate = reference + 0.1 * torch.randn(64, 32, generator=generator)
    expected = float((candidate.double() - reference.double()).norm() / reference.double().norm())
    assert relative_l2_error(reference, candidate) == pytest.approx(expected, rel=1e-12)
    errors = activation_error(reference, candidate)
    assert errors["rel_err"] == pytest.approx(expected, rel=1e-12)
    assert 0.99 < errors["cosine"] < 1.0
    assert relative_l2_error(torch.zeros(4), torch.zeros(4)) == 0.0


def test_relative_error_accumulates_in_float64():
    # 2^24 + 1 float32 values of 1.0: a float32 sum would stop counting at 2^24.
    reference = torch.ones(2**24 + 1)
    candidate = reference.clone()
    candidate[0] = 2.0
    assert relative_l2_error(reference, candidate) == pytest.approx(1 / math.sqrt(2**24 + 1), rel=1e-9)


# ---- block probe --------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, video, audio):
        return video * self.scale, audio + self.scale


class ToyTransformer(nn.Module):
    def __init__(self, scales=(1.0, 2.0, 3.0)):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(s) for s in scales)

    def forward(self, video, audio):
        for block in self.transformer_blocks:
            video, audio = block(video, audio)
        return video, audio


def test_probe_keeps_the_first_call_of_each_block_and_removes_its_hooks():
    model = ToyTransformer()
    video, audio = torch.ones(2, 10), torch.zeros(2, 4)
    with BlockProbe(model) as probe:
        model(video, audio)
        model(video * 100, audio * 100)                 # a later step: ignored
    assert sorted(probe.outputs) == [0, 1, 2]
    assert torch.equal(probe.outputs[2]["video"], torch.full((20,), 6.0))
    assert torch.equal(probe.outputs[1]["audio"], torch.full((8,), 3.0))
    assert all(not block._forward_hooks for block in model.transformer_blocks)


def test_probe_samples_large_outputs_at_the_same_positions():
    model = ToyTransformer(scales=(1.0,))
    video = torch.arange(1000.0).reshape(10, 100)
    with BlockProbe(model, max_values=64) as probe:
        model(video, torch.zeros(3))
    kept = probe.outputs[0]["video"]
    assert kept.numel() <= 64 and torch.equal(kept, video.reshape(-1)[::16])


def test_block_comparison_names_block_and_stream():
    reference = {0: {"video": torch.ones(8), "audio": torch.ones(4)}, 1: {"video": torch.ones(8)}}
    candidate = {0: {"video": torch.ones(8), "audio": 1.5 * torch.ones(4)}, 1: {"video": -torch.ones(8)}}
    rows = {(r["block"], r["stream"]): r for r in compare_block_outputs(reference, candidate)}
    assert set(rows) == {(0, "video"), (0, "audio"), (1, "video")}
    assert rows[0, "video"]["rel_err"] == 0.0
    assert rows[0, "audio"]["rel_err"] == pytest.approx(0.5)
    assert rows[1, "video"]["cosine"] == pytest.approx(-1.0)


def test_probe_needs_transformer_blocks():
    with pytest.raises(InvalidOptionError, match="transformer_blocks"):
        BlockProbe(nn.Linear(2, 2))
