"""Shared by the benchmarks: repeated timing, medians, the machine's description, and the
sections of BENCHMARKS.md they rewrite."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MARKDOWN = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
"""The tables every benchmark writes its section of."""


@dataclass
class Timing:
    """Seconds of repeated runs after warm-up."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> str:
        return f"{min(self.runs):.3g}-{max(self.runs):.3g}"


def repeat(function: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Run `function` warmup + repeats times; time the repeats (synchronising CUDA)."""
    for _ in range(warmup):
        function()
    runs = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        function()
        sync()
        runs.append(time.perf_counter() - start)
    return Timing(runs)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def machine(device: torch.device) -> str:
    """One line: CPU model and cores, or the GPU, with torch's version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    if device.type == "cuda":
        text = f"{torch.cuda.get_device_name(device)}, " + text
    return text


def update_markdown(table: str, device: str) -> None:
    """Replace this device's section of BENCHMARKS.md; other devices' sections stay."""
    begin, end = f"<!-- results:{device} -->", f"<!-- /results:{device} -->"
    text = MARKDOWN.read_text() if MARKDOWN.exists() else "# Benchmarks\n"
    section = f"{begin}\n{table}\n{end}"
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + f"\n\n## {device.upper()}\n\n{section}\n"
    MARKDOWN.write_text(text)
