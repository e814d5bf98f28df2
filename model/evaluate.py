"""Evaluation: semantic mIoU and ScanNet instance AP of a model on scenes of the store.

`python -m model.evaluate --cache storage/ --checkpoint runs/RUN/checkpoints/best.pt` prints both
and writes, per scene, a PLY of the points coloured by predicted instance (with the predicted
semantic class and instance id as vertex properties), and with --render a PNG comparing ground
truth and predictions. model.train calls `evaluate` on the validation scenes every epoch.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.dataset import CachedScenes, ProjectionConfig, SceneSample, collate
from model.fusion import FusionModel
from model.instance import ClusterConfig, InstancePrediction, cluster_scene
from model.instance_eval import InstanceEvaluator
from model.losses import LossConfig, compute_losses
from model.metrics import class_iou, confusion_matrix, mean_iou
from pipeline.labels import CLASS_NAMES, THING_CLASSES
from storage.errors import UserError
from storage.store import add_storage_options_argument

log = logging.getLogger(__name__)

LOSS_TERMS = ("total", "semantic", "offset", "direction", "clip", "distill")


@dataclass
class ScenePrediction:
    """A model's answer for one scene: (N,) semantic classes and its instances."""

    scene_id: str
    semantic: np.ndarray
    instances: list[InstancePrediction]

    def instance_ids(self) -> np.ndarray:
        """(N,) int64 predicted instance per point, -1 for none (higher score wins overlaps)."""
        ids = np.full(self.semantic.shape, -1, np.int64)
        for index, instance in sorted(enumerate(self.instances), key=lambda item: item[1].score):
            ids[instance.points] = index
        return ids


def thing_classes(num_classes: int) -> tuple[int, ...]:
    """ScanNet's 18 thing classes for the 20-class benchmark; otherwise all but classes 0 and 1."""
    return THING_CLASSES if num_classes == len(CLASS_NAMES) else tuple(range(2, num_classes))


@torch.no_grad()
def evaluate(model: FusionModel, scenes: CachedScenes, scene_ids: list[str], epoch: int,
             loss_config: LossConfig, amp: bool, cluster: ClusterConfig = ClusterConfig(),
             on_scene: Callable[[SceneSample, ScenePrediction], None] | None = None,
             min_region_size: int = 100) -> dict[str, Any]:
    """Loss terms (mean over scenes), mIoU, per-class IoU and, with an offset head, AP, AP50,
    AP25 over `scene_ids`, unaugmented. on_scene(sample, prediction) sees every scene;
    min_region_size: ground-truth instances under this many points are ignored (ScanNet: 100)."""
    model.eval()
    num_classes = model.config.num_classes
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=scenes.device)
    instances = InstanceEvaluator(thing_classes(num_classes), min_region_size=min_region_size)
    sums = dict.fromkeys(LOSS_TERMS, 0.0)
    for scene_id in scene_ids:
        sample = scenes.get(scene_id)
        batch = collate([sample])
        with torch.autocast(batch.device.type, dtype=torch.float16, enabled=amp):
            output = model(batch)
        losses = compute_losses(output, batch, epoch, loss_config)
        for name in LOSS_TERMS:
            sums[name] += float(losses[name])
        semantic = output.semantic_logits.argmax(1)
        confusion += confusion_matrix(semantic, batch.semantic, num_classes)
        found: list[InstancePrediction] = []
        if "offset" in output.head_outputs:
            found = cluster_scene(
                sample.xyz.cpu().numpy(), output.head_outputs["offset"].float().cpu().numpy(),
                torch.softmax(output.semantic_logits.float(), 1).cpu().numpy(),
                sample.segment.cpu().numpy(), instances.thing_classes, cluster)
            instances.add(sample.semantic.cpu().numpy(), sample.instance.cpu().numpy(), found)
        if on_scene is not None:
            on_scene(sample, ScenePrediction(scene_id, semantic.cpu().numpy(), found))
    result = {**{name: value / max(1, len(scene_ids)) for name, value in sums.items()},
              "miou": mean_iou(confusion), "class_iou": _floats(class_iou(confusion))}
    if "offset" in model.heads:
        ap = instances.result()
        per_class = [ap["class_ap50"].get(label) for label in range(num_classes)]  # JSON-stable
        result.update(ap=ap["ap"], ap50=ap["ap50"], ap25=ap["ap25"], class_ap50=per_class)
    return result


def _floats(values: torch.Tensor) -> list[float | None]:
    """JSON-friendly: NaN (class absent) becomes None."""
    return [None if math.isnan(v) else v for v in values.tolist()]


# ---------------------------------------------------------------------------- outputs


def instance_colours(ids: np.ndarray) -> np.ndarray:
    """(N,) instance ids -> (N, 3) uint8 colours, fixed per id, grey for -1."""
    palette = np.random.default_rng(7).integers(40, 256, (max(1, int(ids.max()) + 1), 3))
    colours = np.full((len(ids), 3), 160, np.uint8)
    colours[ids >= 0] = palette[ids[ids >= 0]]
    return colours


def class_colours(labels: np.ndarray) -> np.ndarray:
    """(N,) class (or prompt) indices -> (N, 3) float RGB in [0, 1]: matplotlib's tab20 (index
    modulo 20), light grey for negative labels (ignored, unknown)."""
    import matplotlib

    return np.where((labels >= 0)[:, None], matplotlib.colormaps["tab20"](labels % 20)[:, :3], 0.8)


def write_points_ply(path: Path, xyz: np.ndarray, colours: np.ndarray,
                     properties: dict[str, np.ndarray]) -> None:
    """A PLY of points: xyz (N, 3) metres, colours (N, 3) uint8, and a vertex property per
    entry of `properties`, (N,) arrays written in their own dtype."""
    from plyfile import PlyData, PlyElement

    fields = [("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex = np.empty(len(xyz), dtype=fields + [(name, v.dtype) for name, v in properties.items()])
    for axis, name in enumerate("xyz"):
        vertex[name] = xyz[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        vertex[name] = colours[:, channel]
    for name, values in properties.items():
        vertex[name] = values
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))


def write_ply(path: Path, xyz: np.ndarray, prediction: ScenePrediction) -> None:
    """Points coloured by predicted instance, with semantic_pred and instance_pred properties."""
    ids = prediction.instance_ids()
    write_points_ply(path, xyz, instance_colours(ids),
                     {"semantic_pred": prediction.semantic.astype(np.int16),
                      "instance_pred": ids.astype(np.int32)})


def plot_top_views(path: Path, xyz: np.ndarray, panels: dict[str, np.ndarray], title: str,
                   legend: dict[str, np.ndarray] | None = None) -> None:
    """PNG of points (N, 3) seen from above, a panel per entry of `panels` (panel title ->
    (N, 3) float RGB in [0, 1]); `legend` (label -> RGB) is drawn beside the panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    order = np.argsort(xyz[:, 2])  # draw low points first, so tops stay visible
    legend_width = 2.5 if legend else 0.0  # inches
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels) + legend_width, 4.4),
                                squeeze=False)
    for axis, (name, colours) in zip(axes[0], panels.items()):
        axis.scatter(xyz[order, 0], xyz[order, 1], c=colours[order], s=2, linewidths=0)
        axis.set(title=name, aspect="equal", xticks=[], yticks=[])
    figure.suptitle(title)
    if legend:
        handles = [Patch(color=colour, label=label) for label, colour in legend.items()]
        figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 1 - legend_width / figure.get_figwidth(), 1))
    figure.savefig(path, dpi=90)
    plt.close(figure)


def render(path: Path, sample: SceneSample, prediction: ScenePrediction) -> None:
    """PNG, top view: ground-truth and predicted semantics, ground-truth and predicted instances."""
    panels = {
        "ground truth: semantics": class_colours(sample.semantic.cpu().numpy()),
        "prediction: semantics": class_colours(prediction.semantic),
        "ground truth: instances": instance_colours(sample.instance.cpu().numpy()) / 255,
        "prediction: instances": instance_colours(prediction.instance_ids()) / 255,
    }
    plot_top_views(path, sample.xyz.cpu().numpy(), panels,
                   f"{sample.scene_id}: {len(prediction.instances)} predicted instances")


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Semantic mIoU and instance AP/AP50/AP25 (ScanNet's procedure) of a checkpoint "
        "on scenes of the store; writes per-scene PLY predictions (and PNG views with --render).")
    parser.add_argument("--cache", required=True, help="a store or a folder of *.zarr stores")
    parser.add_argument("--checkpoint", required=True, help="a .pt file written by model.train")
    parser.add_argument("--scenes", nargs="*", default=None,
                        help="scene ids (default: the run's validation scenes)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for <scene>.ply (and .png) (default: next to the checkpoint, "
                        "predictions/)")
    parser.add_argument("--render", action="store_true", help="also write a PNG per scene")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    add_storage_options_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result, out = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(format_result(result))
    print(f"predictions: {out}")
    return 0


def run(args: argparse.Namespace) -> tuple[dict[str, Any], Path]:
    from model.config import TrainConfig
    from model.train import Trainer  # not at the top: model.train imports this module

    trainer = Trainer(TrainConfig(cache=args.cache, resume=args.checkpoint, device=args.device,
                                  storage_options=args.storage_options,
                                  out=str(Path(args.checkpoint).resolve().parent.parent)))
    scene_ids = args.scenes or trainer.val_ids
    missing = sorted(set(scene_ids) - set(trainer.scenes.sources))
    if missing:
        raise UserError(f"no finished features for scenes {', '.join(missing)} in {args.cache}")
    out = args.out or Path(args.checkpoint).resolve().parent.parent / "predictions"
    out.mkdir(parents=True, exist_ok=True)

    def save(sample: SceneSample, prediction: ScenePrediction) -> None:
        write_ply(out / f"{sample.scene_id}.ply", sample.xyz.cpu().numpy(), prediction)
        if args.render:
            render(out / f"{sample.scene_id}.png", sample, prediction)

    result = evaluate(trainer.model, trainer.scenes, scene_ids, trainer.state.epoch,
                      trainer.loss_config, trainer.amp, trainer.cluster, on_scene=save,
                      min_region_size=trainer.config.min_region_size)
    return result, out


def format_result(result: dict[str, Any]) -> str:
    lines = [f"semantic mIoU {result['miou']:.3f}"]
    if "ap" in result:
        lines.append(f"instance AP {result['ap']:.3f}  AP50 {result['ap50']:.3f}  "
                     f"AP25 {result['ap25']:.3f}")
    names = CLASS_NAMES if len(result["class_iou"]) == len(CLASS_NAMES) else None
    for index, iou in enumerate(result["class_iou"]):
        if iou is None:
            continue
        name = names[index] if names else str(index)
        ap50 = result["class_ap50"][index] if "class_ap50" in result else None
        lines.append(f"  {name:<16} IoU {iou:.3f}" + (f"  AP50 {ap50:.3f}" if ap50 is not None else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
