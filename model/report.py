"""What a training run shows a person: the curves as a PNG and a summary table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from storage.labels import CLASS_NAMES


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss terms and mIoU per epoch, train and val, in one PNG (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [record["epoch"] for record in history]
    figure, (losses, miou) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "-"), ("val", "--")):
        for name in ("total", "semantic", "offset", "clip", "distill"):
            values = [r[split].get(name, 0.0) for r in history]  # older runs had no distill
            if any(values):
                losses.plot(epochs, values, style, label=f"{split} {name}")
        miou.plot(epochs, [r[split]["miou"] for r in history], style, label=split)
    losses.set(xlabel="epoch", ylabel="loss", yscale="log", title="losses")
    miou.set(xlabel="epoch", ylabel="mIoU", ylim=(0, 1), title="semantic mIoU")
    losses.legend(fontsize=7)
    miou.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def format_summary(history: list[dict[str, Any]], out: Path, featureset: str) -> str:
    """Per-epoch table, the best epoch's per-class IoU, and the outputs in the run folder
    `out` (those that exist)."""
    lines = [f"{'epoch':>5} {'lr':>9} {'train loss':>10} {'train mIoU':>10} {'val loss':>9} "
             f"{'val mIoU':>8} {'val AP':>6} {'AP50':>6} {'AP25':>6} {'skipped':>7} {'s':>6}"]
    for r in history:
        ap = " ".join(f"{r['val'].get(k, float('nan')):>6.3f}" for k in ("ap", "ap50", "ap25"))
        lines.append(f"{r['epoch']:>5} {r['lr']:>9.2e} {r['train']['total']:>10.4f} "
                     f"{r['train']['miou']:>10.3f} {r['val']['total']:>9.4f} {r['val']['miou']:>8.3f} "
                     f"{ap} {r['skipped_steps']:>7} {r['seconds']:>6.1f}")
    if history:
        best = max(history, key=lambda r: r["val"]["miou"])
        lines.append(f"\nbest val mIoU {best['val']['miou']:.3f} at epoch {best['epoch']}; "
                     "per-class IoU (classes present):")
        for index, iou in enumerate(best["val"]["class_iou"]):
            if iou is not None:
                name = CLASS_NAMES[index] if len(best["val"]["class_iou"]) == len(CLASS_NAMES) else index
                lines.append(f"  {name:<16} {iou:.3f}")
    written = [name for name in ("checkpoints/last.pt", "checkpoints/best.pt",
                                 "checkpoints/interrupted.pt", "metrics.jsonl", "curves.png",
                                 "tensorboard/") if (out / name).exists()]
    if not history:
        lines.append("no epoch trained: no checkpoint, no curves")
    lines.append(f"\nfeature set {featureset}; run folder {out}: {', '.join(written) or 'empty'}")
    return "\n".join(lines)
