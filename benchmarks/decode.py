"""Stage 1's colour decode: JPEGs decoded at the smallest DCT scale the model needs (`scaled`,
the default) against decoded whole (`full`), then resized to the model input the same way.

Figures (benchmarks.run's `decode` row):

- rate: frames per second per core of decode + resize + normalise (what a decode thread does
  per frame), one thread, both paths interleaved round by round (A B, B A, ...) on the same
  JPEG bytes held in memory (no disk); per core = frames / process CPU seconds, which other
  work on a shared machine slows far less than wall time (wall-time rates are given too).
- input PSNR: the scaled path's model input (before normalisation, [0, 1]) against the full
  path's, per frame, the worst frame reported: on the synthetic scenes' frames (smooth
  shading) and on `textured_image` frames (1/f noise and hard edges: natural images' spectrum,
  the hard case for a downscaled decode).
- feature cosine: ViT-B-16 (random weights, no download) features of the two paths' inputs:
  global embedding and per-token spatial features, the worst frame; beside it the cosine
  between different frames on the full path, the figure a wrong input would give.
"""

from __future__ import annotations

import io
import statistics
import time

import numpy as np
import torch
from PIL import Image

from pipeline.preprocess import Preprocess, decode_color_scaled

JPEG_QUALITY = 92
"""Quality of ScanNet's recorded colour JPEGs (and of pipeline.synthetic's)."""


def textured_image(size: tuple[int, int], seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: colour 1/f noise (the power spectrum of natural images) with a few
    hard-edged rectangles; a stand-in for a camera frame, harder for a scaled decode than the
    synthetic scenes' smooth shading."""
    rng = np.random.default_rng(seed)
    height, width = size
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    radius = np.hypot(fx, fy)
    radius[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=radius.shape) + 1j * rng.normal(size=radius.shape)) / radius
        spectrum[0, 0] = 0
        channel = np.fft.irfft2(spectrum, s=size)
        channels.append((channel - channel.mean()) / (channel.std() + 1e-12))
    image = 128 + 40 * np.stack(channels, axis=-1)
    for _ in range(12):
        top, left = rng.integers(0, height - 10), rng.integers(0, width - 10)
        bottom = min(height, top + rng.integers(10, height // 2))
        right = min(width, left + rng.integers(10, width // 2))
        image[top:bottom, left:right] = rng.uniform(0, 255, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def model_input(jpeg: bytes, preprocess: Preprocess, normalise: bool = True) -> torch.Tensor:
    """One JPEG -> (3, H_in, W_in) float32, through `preprocess.decode`'s path (as stage 1)."""
    color, size, reduction = decode_color_scaled(io.BytesIO(jpeg), preprocess.decode_size)
    if normalise:
        return preprocess(color, reduction, size)
    return preprocess.resized(color, reduction, size)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio, dB, of two [0, 1] images."""
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def bench_rates(jpegs: list[bytes], preprocess: Preprocess, repeats: int) -> dict:
    """Frames/s of both paths, one thread, interleaved rounds after a warm-up round."""
    paths = {name: Preprocess(preprocess.input_size, preprocess.mean, preprocess.std,
                              preprocess.resize, name) for name in ("scaled", "full")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path in paths.values():
            for jpeg in jpegs[:2]:
                model_input(jpeg, path)
        runs = {name: {"wall": [], "cpu": []} for name in paths}
        for round_ in range(repeats):
            for name in (list(paths) if round_ % 2 == 0 else list(paths)[::-1]):
                wall, cpu = time.perf_counter(), time.process_time()
                for jpeg in jpegs:
                    model_input(jpeg, paths[name])
                runs[name]["wall"].append(time.perf_counter() - wall)
                runs[name]["cpu"].append(time.process_time() - cpu)
    finally:
        torch.set_num_threads(threads)
    n = len(jpegs)
    per_core = {name: [n / s for s in run["cpu"]] for name, run in runs.items()}
    ratios = [full / scaled for scaled, full in zip(runs["scaled"]["cpu"], runs["full"]["cpu"])]
    wall_ratios = [full / scaled for scaled, full in zip(runs["scaled"]["wall"],
                                                         runs["full"]["wall"])]
    return {
        "frames": n, "repeats": repeats,
        "scaled_fps_per_core": statistics.median(per_core["scaled"]),
        "full_fps_per_core": statistics.median(per_core["full"]),
        "scaled_fps_wall": statistics.median(n / s for s in runs["scaled"]["wall"]),
        "full_fps_wall": statistics.median(n / s for s in runs["full"]["wall"]),
        "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
        "ratio_wall": statistics.median(wall_ratios),
    }


def input_psnr(jpegs: list[bytes], preprocess: Preprocess) -> float:
    """Worst frame's PSNR (dB) of the scaled path's model input against the full path's."""
    scaled = Preprocess(preprocess.input_size, preprocess.mean, preprocess.std,
                        preprocess.resize, "scaled")
    full = Preprocess(preprocess.input_size, preprocess.mean, preprocess.std,
                      preprocess.resize, "full")
    return min(psnr(model_input(j, scaled, False), model_input(j, full, False)) for j in jpegs)


def feature_cosines(jpegs: list[bytes], encoder) -> dict:
    """Worst-frame cosines of the encoder's features, scaled path against full path (global
    embedding, and the mean over tokens of per-token spatial cosines), and the median cosine
    of different frames' global embeddings on the full path (what the metric separates)."""
    base = encoder.preprocess
    inputs = {name: torch.stack([model_input(j, Preprocess(base.input_size, base.mean, base.std,
                                                           base.resize, name)) for j in jpegs])
              for name in ("scaled", "full")}
    spatial_s, global_s = encoder.encode(inputs["scaled"])
    spatial_f, global_f = encoder.encode(inputs["full"])
    global_cos = torch.nn.functional.cosine_similarity(global_s, global_f, dim=-1)
    token_cos = torch.nn.functional.cosine_similarity(spatial_s, spatial_f, dim=-1)
    unit = torch.nn.functional.normalize(global_f, dim=-1)
    between = (unit @ unit.T)[~torch.eye(len(jpegs), dtype=torch.bool)]
    return {"global_cosine_min": float(global_cos.min()),
            "spatial_cosine_min": float(token_cos.mean(dim=(1, 2)).min()),
            "spatial_token_cosine_min": float(token_cos.min()),
            "different_frames_global_cosine": float(between.median()) if len(between) else None}


def bench_decode(scene_jpegs: list[bytes], textured_jpegs: list[bytes], encoder,
                 repeats: int) -> dict:
    """The `decode` row: rates (ratio: scaled over full, per core, on the scene frames),
    input PSNR and feature cosines, at the encoder's input size and resize policy."""
    preprocess = encoder.preprocess
    scene_rates = bench_rates(scene_jpegs, preprocess, repeats)
    textured_rates = bench_rates(textured_jpegs, preprocess, repeats)
    return {
        **scene_rates,
        "what": "decode + resize frames/s per core (process CPU time, one thread), scaled "
                "DCT decode over full decode (bigger is better)",
        "input_size": list(preprocess.input_size), "resize": preprocess.resize,
        "textured": textured_rates,
        "psnr_db_min": input_psnr(scene_jpegs, preprocess),
        "textured_psnr_db_min": input_psnr(textured_jpegs, preprocess),
        "cosine_model": encoder.config.model,
        **feature_cosines(scene_jpegs[:4] + textured_jpegs[:4], encoder),
    }
