"""How far a rendered video, its audio, its latents and its activations drift from a reference.

Pure numerics on tensors or arrays, accumulated in float64 (sums over millions of values in
float32 drift; see quant/metrics.py). Conventions:

- frames: ``(frames, height, width, 3)`` floats in [0, 1] or uint8 (scaled to [0, 1]);
- audio: a waveform ``(samples,)`` or ``(channels, samples)`` at one sample rate;
- ratios in dB are capped at ``DB_CAP`` so that identical inputs give a finite number (JSON
  has no infinity).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from hlwq.quant.errors import InvalidOptionError, InvalidTensorError
from hlwq.quant.metrics import tensor_metrics

DB_CAP = 100.0             # PSNR / SNR of identical signals
RATIO_CAP = 1e10           # an energy ratio with a silent reference (10 ** (DB_CAP / 10))
SSIM_WINDOW = 11           # Wang et al. 2004: 11x11 Gaussian window, sigma 1.5
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
SSIM_CHUNK = 8             # frames per SSIM pass
MEL_FLOOR_DB = -80.0       # log-mel values below the reference's peak by more than this are clipped
N_MELS = 64
FFT_SECONDS = 0.025        # STFT window length (25 ms, rounded up to a power of two)


# --------------------------------------------------------------------------- video


def as_frames(frames, name: str = "frames") -> torch.Tensor:
    """(T, H, W, 3) in [0, 1] as float64; uint8 input is divided by 255."""
    array = torch.as_tensor(np.asarray(frames))
    if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
        raise InvalidTensorError(f"{name}: expected (frames, height, width, 3) with at least one "
                                 f"frame, got shape {tuple(array.shape)}")
    scaled = array.double() / 255.0 if array.dtype == torch.uint8 else array.double()
    if not torch.isfinite(scaled).all():
        raise InvalidTensorError(f"{name}: holds NaN or Inf values")
    return scaled


def _same_shape(reference: torch.Tensor, candidate: torch.Tensor, what: str) -> None:
    if reference.shape != candidate.shape:
        raise InvalidTensorError(f"{what}: shapes differ, reference {tuple(reference.shape)} vs "
                                 f"candidate {tuple(candidate.shape)} (render both with the same "
                                 "width, height, frames and duration)")


def _ratio_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return DB_CAP
    if signal <= 0:
        return -DB_CAP
    return min(DB_CAP, 10.0 * math.log10(signal / noise))


def frame_mse(reference, candidate) -> torch.Tensor:
    """Mean squared error of each frame (full scale 1.0); shape (frames,)."""
    ref, cand = as_frames(reference, "reference frames"), as_frames(candidate, "candidate frames")
    _same_shape(ref, cand, "frames")
    return (ref - cand).square().mean(dim=(1, 2, 3))


def frame_psnr(reference, candidate) -> torch.Tensor:
    """PSNR in dB of each frame (peak 1.0), capped at DB_CAP; shape (frames,)."""
    return psnr_of(frame_mse(reference, candidate))


def psnr_of(mse: torch.Tensor) -> torch.Tensor:
    return torch.tensor([_ratio_db(1.0, float(m)) for m in mse], dtype=torch.float64)


def _gaussian_taps(size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-x.square() / (2 * SSIM_SIGMA ** 2))
    return taps / taps.sum()


def _blur(image: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over the last two axes, 'valid' borders, as sums of shifted slices
    (float64 convolutions in torch are many times slower)."""
    for axis in (-1, -2):
        size = image.shape[axis] - len(taps) + 1
        out = taps[0] * image.narrow(axis, 0, size)
        for offset in range(1, len(taps)):
            out += taps[offset] * image.narrow(axis, offset, size)
        image = out
    return image


def frame_ssim(reference, candidate) -> torch.Tensor:
    """Mean SSIM of each frame (Gaussian window, averaged over RGB channels); shape (frames,).

    The window shrinks to the frame's shorter side when a frame is smaller than 11 pixels.
    Frames go through in chunks: a real render's temporaries would not fit at once.
    """
    ref, cand = as_frames(reference, "reference frames"), as_frames(candidate, "candidate frames")
    _same_shape(ref, cand, "frames")
    taps = _gaussian_taps(min(SSIM_WINDOW, ref.shape[1], ref.shape[2]))
    return torch.cat([_ssim(ref[i:i + SSIM_CHUNK], cand[i:i + SSIM_CHUNK], taps)
                      for i in range(0, ref.shape[0], SSIM_CHUNK)])


def _ssim(ref: torch.Tensor, cand: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    x, y = ref.permute(0, 3, 1, 2), cand.permute(0, 3, 1, 2)        # (T, 3, H, W)
    mu_x, mu_y = _blur(x, taps), _blur(y, taps)
    var_x = _blur(x * x, taps) - mu_x.square()
    var_y = _blur(y * y, taps) - mu_y.square()
    cov = _blur(x * y, taps) - mu_x * mu_y
    c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / \
               ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return ssim_map.mean(dim=(1, 2, 3))


def temporal_diff(reference, candidate) -> float:
    """Mean absolute difference between the two videos' frame-to-frame changes (0 = same motion).

    In the frames' own units (full scale 1.0); 0.0 for single-frame clips.
    """
    ref, cand = as_frames(reference, "reference frames"), as_frames(candidate, "candidate frames")
    _same_shape(ref, cand, "frames")
    if ref.shape[0] < 2:
        return 0.0
    return float(((ref[1:] - ref[:-1]) - (cand[1:] - cand[:-1])).abs().mean())


def video_metrics(reference, candidate) -> dict[str, float]:
    """Per-frame PSNR and SSIM (mean and worst frame), per-frame MSE (mean and worst) and
    temporal stability, as floats."""
    mse = frame_mse(reference, candidate)
    psnr = psnr_of(mse)
    ssim = frame_ssim(reference, candidate)
    return {
        "psnr_mean": float(psnr.mean()),
        "psnr_min": float(psnr.min()),
        "mse_mean": float(mse.mean()),
        "mse_max": float(mse.max()),
        "worst_frame": int(mse.argmax()),
        "ssim_mean": float(ssim.mean()),
        "ssim_min": float(ssim.min()),
        "temporal_diff": temporal_diff(reference, candidate),
    }


# --------------------------------------------------------------------------- audio


def as_waveform(audio, name: str = "audio") -> torch.Tensor:
    """(channels, samples) float64; a 1-D waveform becomes one channel."""
    wave = torch.as_tensor(np.asarray(audio, dtype=np.float64))
    if wave.ndim == 1:
        wave = wave[None]
    if wave.ndim != 2 or wave.shape[1] == 0:
        raise InvalidTensorError(f"{name}: expected (samples,) or (channels, samples), got shape "
                                 f"{tuple(wave.shape)}")
    if not torch.isfinite(wave).all():
        raise InvalidTensorError(f"{name}: holds NaN or Inf values")
    return wave


def audio_snr_db(reference, candidate) -> float:
    """Waveform SNR in dB: reference energy over the energy of the difference, capped at DB_CAP."""
    ref, cand = as_waveform(reference, "reference audio"), as_waveform(candidate, "candidate audio")
    _same_shape(ref, cand, "audio")
    return _ratio_db(float(ref.square().sum()), float((ref - cand).square().sum()))


def audio_noise_ratio(reference, candidate) -> float:
    """Energy of the difference over the reference's energy (10 ** (-SNR / 10)), at most
    RATIO_CAP; 0.0 for identical waveforms."""
    ref, cand = as_waveform(reference, "reference audio"), as_waveform(candidate, "candidate audio")
    _same_shape(ref, cand, "audio")
    signal, noise = float(ref.square().sum()), float((ref - cand).square().sum())
    if noise <= 0:
        return 0.0
    return RATIO_CAP if signal <= 0 else min(RATIO_CAP, noise / signal)


def hz_to_mel(hz):
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (torch.as_tensor(mel, dtype=torch.float64) / 2595.0) - 1.0)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int,
                   area_normalized: bool = False) -> torch.Tensor:
    """Triangular filters, evenly spaced on the mel scale from 0 Hz to Nyquist; (n_mels, n_fft//2+1).

    Each triangle peaks at 1 on its centre frequency and reaches 0 at its neighbours' centres;
    ``area_normalized`` scales each to unit area instead (Slaney, as vocoders store them).
    """
    if n_mels < 1 or n_fft < 2 or sample_rate <= 0:
        raise InvalidOptionError(f"mel filterbank: n_mels={n_mels}, n_fft={n_fft}, "
                                 f"sample_rate={sample_rate}: need n_mels >= 1, n_fft >= 2, rate > 0")
    nyquist = sample_rate / 2.0
    # The top edge in float32: the filters the fixtures' vocoders store were built so (the
    # difference is ~1e-7 relative, below any metric's resolution).
    top = float(2595.0 * torch.log10(1.0 + torch.tensor(nyquist) / 700.0))
    edges = mel_to_hz(torch.linspace(0.0, top, n_mels + 2, dtype=torch.float64))
    freqs = torch.linspace(0.0, nyquist, n_fft // 2 + 1, dtype=torch.float64)
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - low) / (centre - low)
    falling = (high - freqs) / (high - centre)
    filters = torch.clamp(torch.minimum(rising, falling), min=0.0)
    return filters * (2.0 / (high - low)) if area_normalized else filters


def fft_size(sample_rate: int, samples: int) -> int:
    """A ~25 ms window rounded up to a power of two, no longer than the signal (at least 16)."""
    wanted = 1 << max(4, math.ceil(math.log2(max(1.0, FFT_SECONDS * sample_rate))))
    longest = 1 << max(4, int(math.log2(max(16, samples))))
    return min(wanted, longest)


def log_mel(wave: torch.Tensor, sample_rate: int, n_fft: int, n_mels: int = N_MELS) -> torch.Tensor:
    """Power log-mel spectrogram in dB of each channel; (channels, n_mels, frames)."""
    spectrum = torch.stft(wave, n_fft=n_fft, hop_length=n_fft // 4,
                          window=torch.hann_window(n_fft, dtype=torch.float64),
                          center=True, pad_mode="constant", return_complex=True)
    mel = mel_filterbank(n_mels, n_fft, sample_rate) @ spectrum.abs().square()
    return 10.0 * torch.log10(mel.clamp(min=1e-30))


def mel_distance(reference, candidate, sample_rate: int, n_mels: int = N_MELS) -> float:
    """Mean absolute log-mel difference in dB (0 = same spectrum over time).

    Both spectrograms are clipped at MEL_FLOOR_DB below the reference's loudest bin, so
    differences in inaudible near-silence do not dominate.
    """
    ref, cand = as_waveform(reference, "reference audio"), as_waveform(candidate, "candidate audio")
    _same_shape(ref, cand, "audio")
    n_fft = fft_size(sample_rate, ref.shape[1])
    ref_mel = log_mel(ref, sample_rate, n_fft, n_mels)
    cand_mel = log_mel(cand, sample_rate, n_fft, n_mels)
    floor = float(ref_mel.max()) + MEL_FLOOR_DB
    return float((ref_mel.clamp(min=floor) - cand_mel.clamp(min=floor)).abs().mean())


def audio_metrics(reference, candidate, sample_rate: int) -> dict[str, float]:
    return {"audio_snr_db": audio_snr_db(reference, candidate),
            "audio_noise_ratio": audio_noise_ratio(reference, candidate),
            "mel_distance": mel_distance(reference, candidate, sample_rate)}


# --------------------------------------------------------------------------- latents, activations


def relative_l2_error(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| (L2, float64); 0.0 when both are zero."""
    return math.sqrt(tensor_metrics(reference, candidate)["rel_mse"])


def activation_error(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Cosine and relative L2 error of one activation tensor against its reference."""
    metrics = tensor_metrics(reference, candidate)
    return {"cosine": metrics["cosine"], "rel_err": math.sqrt(metrics["rel_mse"])}
