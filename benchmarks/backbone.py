"""`python -m benchmarks.backbone`: the 3D backbone's convolutions, active pairs against all 27
neighbours, on a synthetic room; rewrites its own section of BENCHMARKS.md.

Rows (old and new measured interleaved in one run, A B, B A, ..., so that a drifting machine
load falls on both; medians with min-max), each at torch's thread count and at one thread:

- U-Net: forward + backward of `SparseUNet.forward_voxels` at the default config on an N-voxel
  room (2 cm voxels), kernel maps included, with the model's convolutions computed over active
  pairs (`model.network.backbone`) against the all-27-neighbours baseline (`benchmarks.all_neighbours`),
  same parameters and input; ratio = baseline time / active-pairs time (bigger is better).
- peak memory of one U-Net forward + backward, one process per mode (RSS on the CPU, read on
  Linux from /proc/self/status after resetting VmHWM, elsewhere the process's peak since its
  start; the allocator's peak on CUDA).
- convolution: forward of one submanifold C -> C convolution at the finest level, maps built
  beforehand, at the backbone's widths: active pairs, the all-neighbours baseline and, as an
  anchor, spconv's SubMConv3d (spconv 2.x, forward only: its backward needs CUDA). spconv is
  optional and never a dependency: without it its column says so. Every result is checked
  against the all-neighbours one: on 2 threads spconv 2.3.8's CPU forward returned wrong
  values on a few rows, different ones from run to run (exact on one thread).

The room is `pipeline.synthetic.make_layout`'s (floor, walls, ceiling, furniture boxes turned
about z), its box faces sampled densely (POINTS_PER_M2) and cropped to the first N voxels in key
order (an x-slab of the room), so the neighbourhoods are those of a scanned room surface.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks import all_neighbours
from benchmarks.common import machine, sync, update_markdown
from model.network.backbone import (
    SparseUNet,
    SparseUNetConfig,
    grid_extent,
    sparse_conv,
    submanifold_map,
    voxelize,
)

REPO = Path(__file__).resolve().parents[1]
FULL = {"voxels": 100_000, "repeats": 5, "widths": (32, 64, 96)}
QUICK = {"voxels": 10_000, "repeats": 2, "widths": (32,)}
MODES = ("all-neighbours", "active-pairs")
POINTS_PER_M2 = 10_000
"""Surface sampling density of the benchmark room: 4 points per 2 cm voxel's square, so that
few surface voxels stay empty (a sparser sample would leave holes and flatter the active-pairs
convolution): a voxel then has about 8 active neighbours."""


def room_voxels(count: int, seed: int = 0, voxel_size: float = SparseUNetConfig.voxel_size
                ) -> torch.Tensor:
    """(count, 4) int64 (batch 0, x, y, z) voxels of a synthetic room's surfaces, sorted by key:
    the first `count` in key order, an x-slab of the room."""
    from pipeline.synthetic import SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, make_layout

    rng = np.random.default_rng(seed)
    layout = make_layout(rng, 1, SMALL_COLOR_SIZE, SMALL_DEPTH_SIZE, n_points=1)  # the boxes
    chunks = []
    for box in layout.boxes:
        half = np.asarray(box.size) / 2
        for axis in range(3):
            area = 4 * np.prod(np.delete(half, axis))
            for sign in (-1, 1):
                local = rng.uniform(-half, half, size=(rng.poisson(area * POINTS_PER_M2), 3))
                local[:, axis] = sign * half[axis]
                chunks.append(local @ box.rotation.T + np.asarray(box.centre))
    xyz = np.concatenate(chunks)
    xyz = xyz[np.all((xyz >= 0) & (xyz <= np.asarray(layout.room)), axis=1)]  # the interior's
    coords, _ = voxelize(torch.as_tensor(xyz, dtype=torch.float32),
                         torch.zeros(len(xyz), dtype=torch.int64), voxel_size)
    if len(coords) < count:
        raise ValueError(f"the synthetic room has {len(coords)} voxels, fewer than {count}")
    return coords[:count]


def _unet_step(model: SparseUNet, mode: str, coords: torch.Tensor, feats: torch.Tensor
               ) -> torch.Tensor:
    """One forward + backward of the U-Net in `mode`; returns the (detached) output."""
    model.zero_grad(set_to_none=True)
    if mode == "active-pairs":
        out = model.forward_voxels(coords, feats)
    else:
        out = all_neighbours.forward_voxels_all_neighbours(model, coords, feats)
    out.square().mean().backward()
    return out.detach()


def _interleaved(functions: dict[str, Callable[[], object]], repeats: int
                 ) -> dict[str, dict[str, list[float]]]:
    """Wall and process-CPU seconds of each function, `repeats` rounds after one warm-up round;
    the order alternates between rounds (A B, B A, ...)."""
    names = list(functions)
    for name in names:
        functions[name]()
    runs = {name: {"wall": [], "cpu": []} for name in names}
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            functions[name]()
            sync()
            runs[name]["wall"].append(time.perf_counter() - wall)
            runs[name]["cpu"].append(time.process_time() - cpu)
    return runs


def _figures(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}


def peak_memory_mb(mode: str, coords_path: Path, device: str) -> dict:
    """Peak memory of one U-Net forward + backward in a fresh process (`mode` alone in it)."""
    command = [sys.executable, "-m", "benchmarks.backbone", "--peak-memory", mode,
               "--coords", str(coords_path), "--device", device]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _measure_peak(mode: str, coords_path: Path, device: str) -> dict:
    """In this process: peak RSS (CPU) or allocated memory (CUDA) of one forward + backward."""
    torch.manual_seed(0)
    target = torch.device(device)
    coords = torch.load(coords_path, weights_only=True).to(target)
    model = SparseUNet().to(target)
    feats = torch.randn(len(coords), model.config.in_channels, device=target)
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
        before = torch.cuda.memory_allocated(target)
        _unet_step(model, mode, coords, feats)
        peak = torch.cuda.max_memory_allocated(target)
        return {"peak_mb": peak / 2**20, "above_start_mb": (peak - before) / 2**20,
                "kind": "CUDA allocated"}
    if not Path("/proc/self/clear_refs").exists():  # not Linux: the peak since the start
        _unet_step(model, mode, coords, feats)
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, else KiB
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
        return {"peak_mb": peak, "above_start_mb": float("nan"), "kind": "process peak RSS"}
    before = _rss_mb("VmRSS")
    # VmHWM := the RSS now, so that the step's peak is not hidden by an earlier one (importing
    # torch alone peaks at about 650 MB)
    Path("/proc/self/clear_refs").write_text("5")
    _unet_step(model, mode, coords, feats)
    peak = _rss_mb("VmHWM")
    return {"peak_mb": peak, "above_start_mb": peak - before, "kind": "process RSS"}


def _rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, MiB (Linux)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _spconv_conv(coords: torch.Tensor, weight: torch.Tensor):
    """A forward-only spconv SubMConv3d with our (27, C_in, C_out) weight and its pairs built,
    as f(feats) -> (N, C_out); None and a note when spconv cannot run here."""
    try:
        import spconv
        import spconv.pytorch as spconv_torch
    except ImportError:
        return None, "spconv not installed (pip install spconv: the CPU wheel; benchmark only)"
    channels_in, channels_out = weight.shape[1:]
    conv = spconv_torch.SubMConv3d(channels_in, channels_out, 3, bias=False, indice_key="level0")
    conv = conv.to(coords.device)
    with torch.no_grad():  # spconv 2.x keeps (C_out, kx, ky, kz, C_in)
        conv.weight.copy_(weight.reshape(3, 3, 3, channels_in, channels_out)
                          .permute(4, 0, 1, 2, 3))
    shape = (coords[:, 1:].amax(dim=0) + 1).tolist()
    zeros = torch.zeros(len(coords), channels_in, device=coords.device)
    try:
        with torch.no_grad():  # the output carries the pairs: reuse them, as a network does
            paired = conv(spconv_torch.SparseConvTensor(zeros, coords.int(), shape, 1))
    except Exception as error:  # noqa: BLE001 - an optional anchor must not stop the benchmark
        return None, f"spconv {spconv.__version__} failed: {str(error).splitlines()[0][:120]}"
    return (lambda feats: conv(paired.replace_feature(feats)).features), \
        f"spconv {spconv.__version__}"


def _bad_rows(result: torch.Tensor, reference: torch.Tensor) -> int:
    """Rows of `result` off `reference` by more than float32 rounding of these sums allows."""
    tolerance = 1e-4 * (1 + reference.abs().amax(dim=1))
    return int(((result - reference).abs().amax(dim=1) > tolerance).sum())


def _thread_counts() -> list[int]:
    """torch's thread count, and 1 as well where that is more: on a CPU shared with other work,
    one thread per process is what each gets, and the comparison should not hang on it."""
    threads = torch.get_num_threads()
    return [threads] + ([1] if threads > 1 else [])


def _at_threads(threads: int, measure: Callable[[], dict]) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure()
    finally:
        torch.set_num_threads(before)


def bench_convolutions(coords: torch.Tensor, widths, repeats: int) -> list[dict]:
    """Forward of one C -> C submanifold convolution per width and thread count: active pairs,
    all neighbours, spconv. Maps built beforehand, not timed; every result checked against the
    all-neighbours one (`wrong_rows`)."""
    extent = grid_extent(coords)
    kernel_map = submanifold_map(coords, extent)
    table = all_neighbours.neighbour_index(coords, extent)
    generator = torch.Generator().manual_seed(1)
    rows = []
    for width in widths:
        feats = torch.randn(len(coords), width, generator=generator).to(coords.device)
        weight = (torch.randn(27, width, width, generator=generator) / (27 * width) ** 0.5
                  ).to(coords.device)
        spconv_forward, spconv_note = _spconv_conv(coords, weight)
        functions = {"active_pairs": lambda: sparse_conv(feats, weight, kernel_map),
                     "all_neighbours": lambda: all_neighbours.submanifold_conv(feats, weight,
                                                                               table)}
        if spconv_forward is not None:
            functions["spconv"] = lambda: spconv_forward(feats)

        def measure() -> dict:
            reference = functions["all_neighbours"]()
            runs = _interleaved(functions, repeats)
            return {name: {**_figures(run["wall"]),
                           "wrong_rows": _bad_rows(functions[name](), reference)}
                    for name, run in runs.items()}

        for threads in _thread_counts():
            with torch.no_grad():
                row = _at_threads(threads, measure)
            rows.append({"channels": width, "threads": threads, "spconv_note": spconv_note,
                         "ratio": (row["all_neighbours"]["median_s"]
                                   / row["active_pairs"]["median_s"]), **row})
    return rows


def bench_unet(model: SparseUNet, coords: torch.Tensor, feats: torch.Tensor, repeats: int
               ) -> list[dict]:
    """Forward + backward of the whole U-Net per thread count, both modes interleaved."""
    rows = []
    for threads in _thread_counts():
        runs = _at_threads(threads, lambda: _interleaved(
            {mode: (lambda mode=mode: _unet_step(model, mode, coords, feats)) for mode in MODES},
            repeats))
        new, old = runs["active-pairs"], runs["all-neighbours"]
        ratios = [o / n for o, n in zip(old["wall"], new["wall"])]
        rows.append({"threads": threads, "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "active_pairs": {**_figures(new["wall"]),
                                      "cpu_s": statistics.median(new["cpu"])},
                     "all_neighbours": {**_figures(old["wall"]),
                                        "cpu_s": statistics.median(old["cpu"])}})
    return rows


def bench_backbone(voxels: int, repeats: int, device: str, widths=FULL["widths"],
                   work: Path | None = None) -> dict:
    """The `backbone` figures: U-Net forward + backward, active pairs vs all neighbours (per
    thread count; `ratio` is at torch's thread count), peak memory per mode, and one
    convolution per width with the spconv anchor."""
    load_before = os.getloadavg()[0]
    target = torch.device(device)
    coords = room_voxels(voxels).to(target)
    kernel_map = submanifold_map(coords, grid_extent(coords))
    pairs = sum(len(rows) for rows in kernel_map.inputs)
    torch.manual_seed(0)
    model = SparseUNet().to(target)
    feats = torch.randn(len(coords), model.config.in_channels, device=target)
    new = _unet_step(model, "active-pairs", coords, feats)
    old = _unet_step(model, "all-neighbours", coords, feats)
    unet = bench_unet(model, coords, feats, repeats)
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        coords_path = Path(scratch) / "coords.pt"
        torch.save(coords.cpu(), coords_path)
        memory = {mode: peak_memory_mb(mode, coords_path, device) for mode in MODES}
    convolutions = bench_convolutions(coords, widths, repeats)
    return {
        "ratio": unet[0]["ratio"], "ratio_min": unet[0]["ratio_min"],
        "ratio_max": unet[0]["ratio_max"],
        "ratio_one_thread": unet[-1]["ratio"] if len(unet) > 1 else None,
        "what": "U-Net forward + backward seconds, all-27-neighbours baseline over active pairs "
                "(bigger is better), at torch's thread count",
        "voxels": len(coords), "mean_active_neighbours": pairs / max(len(coords), 1),
        "channels": list(model.config.channels), "out_channels": model.config.out_channels,
        "repeats": repeats, "device": device,
        "load_average": [load_before, os.getloadavg()[0]], "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "max_abs_difference": float((new - old).abs().max()) if len(new) else 0.0,
        "output_scale": float(old.abs().max()) if len(old) else 0.0,
        "unet": unet, "peak_memory": memory, "convolutions": convolutions,
    }


def _seconds(figures: dict) -> str:
    return (f"{figures['median_s'] * 1e3:.0f} ms [{figures['min_s'] * 1e3:.0f}-"
            f"{figures['max_s'] * 1e3:.0f}]")


def _threads(count: int) -> str:
    return "1 thread" if count == 1 else f"{count} threads"


def format_table(figures: dict, command: str, machine_line: str) -> str:
    """The backbone section of BENCHMARKS.md: U-Net rows, peak memory, one row per convolution
    width and thread count."""
    load = figures["load_average"]
    if figures["omp_wait_policy"]:
        command = f"OMP_WAIT_POLICY={figures['omp_wait_policy']} {command}"
    lines = [
        f"Machine: {machine_line}; load average {load[0]:.1f} at the start, {load[1]:.1f} at "
        f"the end ({figures['cpu_count']} cores). Command: `{command}`. {figures['voxels']} "
        "voxels (2 cm, a synthetic room surface, "
        f"{figures['mean_active_neighbours']:.1f} active neighbours per voxel on average), "
        f"default config (channels {tuple(figures['channels'])}, out "
        f"{figures['out_channels']}). Medians of {figures['repeats']} interleaved repeats after "
        "warm-up, min-max in brackets; CPU: the process's CPU seconds (median).",
        "",
        "| row | active pairs | all 27 neighbours (baseline) | ratio (bigger is better) "
        "| spconv (anchor, forward only) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in figures["unet"]:
        new, old = row["active_pairs"], row["all_neighbours"]
        lines.append(
            f"| U-Net forward + backward, {_threads(row['threads'])} | {_seconds(new)}, CPU "
            f"{new['cpu_s']:.1f} s | {_seconds(old)}, CPU {old['cpu_s']:.1f} s | "
            f"{row['ratio']:.2f} [{row['ratio_min']:.2f}-{row['ratio_max']:.2f}] | - |")
    new, old = (figures["peak_memory"][mode] for mode in ("active-pairs", "all-neighbours"))
    lines.append(
        f"| peak memory of one U-Net forward + backward ({new['kind']}, own process) | "
        f"{new['peak_mb']:.0f} MB, {new['above_start_mb']:.0f} MB above the process before it | "
        f"{old['peak_mb']:.0f} MB, {old['above_start_mb']:.0f} MB above | "
        f"{old['above_start_mb'] / max(new['above_start_mb'], 1):.1f} (above start) | - |")
    for row in figures["convolutions"]:
        anchor = (f"{_seconds(row['spconv'])}, {row['spconv_note']}, "
                  f"{row['spconv']['wrong_rows']} wrong rows" if "spconv" in row
                  else f"skipped: {row['spconv_note']}")
        lines.append(
            f"| one {row['channels']} -> {row['channels']} submanifold conv, forward, "
            f"{_threads(row['threads'])} | {_seconds(row['active_pairs'])} | "
            f"{_seconds(row['all_neighbours'])} | {row['ratio']:.2f} | {anchor} |")
    lines.append("")
    lines.append(f"U-Net outputs of the two modes differ by at most "
                 f"{figures['max_abs_difference']:.1e} (largest output "
                 f"{figures['output_scale']:.1f}); wrong rows: rows off the all-neighbours "
                 "result by more than float32 rounding.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.backbone",
        description="Time the backbone's convolutions over active pairs against the all-27-"
        "neighbours baseline on a synthetic room (U-Net forward + backward, peak memory, and "
        "one convolution per width with spconv's CPU forward as an anchor when installed); "
        "print a table and (without --quick) rewrite the backbone section of BENCHMARKS.md.")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK['voxels']} voxels, {QUICK['repeats']} repeats, one width; "
                        "BENCHMARKS.md untouched")
    parser.add_argument("--voxels", type=int, default=None,
                        help=f"room size in voxels (default {FULL['voxels']})")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats per measurement (default {FULL['repeats']})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--peak-memory", choices=MODES, default=None,
                        help="internal: measure one mode's peak memory in this process and "
                        "print it as JSON (needs --coords)")
    parser.add_argument("--coords", type=Path, default=None,
                        help="internal: the (N, 4) voxel coordinates saved by the parent run")
    args = parser.parse_args(argv)
    if args.peak_memory:
        if args.coords is None:
            parser.error("--peak-memory needs --coords")
        print(json.dumps(_measure_peak(args.peak_memory, args.coords, args.device)))
        return 0
    preset = QUICK if args.quick else FULL
    voxels, repeats = args.voxels or preset["voxels"], args.repeats or preset["repeats"]
    figures = bench_backbone(voxels, repeats, args.device, preset["widths"])
    command = " ".join(["python -m benchmarks.backbone"]
                       + (["--quick"] if args.quick else [])
                       + ([f"--voxels {args.voxels}"] if args.voxels else [])
                       + ([f"--repeats {args.repeats}"] if args.repeats else [])
                       + ([f"--device {args.device}"] if args.device != "cpu" else []))
    table = format_table(figures, command, machine(torch.device(args.device)))
    print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.quick:
        update_markdown(table, f"backbone-{args.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
