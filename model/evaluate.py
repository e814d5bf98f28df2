"""Evaluation by ScanNet's rules: semantic mIoU (evaluate_semantic_label.py) and instance AP,
AP50, AP25 (evaluate_semantic_instance.py), of a trained model or of anyone's predictions.

    python -m model.evaluate --cache STORE --checkpoint CKPT [--export DIR] [--json FILE]
    python -m model.evaluate --cache STORE --predictions DIR [--json FILE]

With a checkpoint it runs the model on scenes of the store (default: the run's validation
scenes), prints the metrics and writes, per scene, a PLY of the points coloured by predicted
instance (and with --render a PNG comparing ground truth and predictions); --export DIR also
writes the predictions in ScanNet's submission format (model.submission), which a user can
submit or score with ScanNet's own scripts. With --predictions it scores such a folder, made by
any model, against the ground truth the store holds. Both modes compute the same numbers from
the same predictions. model.train calls `evaluate` on the validation scenes every epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.batch import IGNORE_INDEX
from model.dataset import CachedScenes, SceneSample, collate
from model.network.fusion import FusionModel
from model.network.instance import ClusterConfig, InstancePrediction, cluster_scene
from model.instance_eval import MIN_REGION_SIZE, InstanceEvaluator, encode_ground_truth
from model.network.losses import LOSS_TERMS, LossConfig, compute_losses
from model.metrics import class_iou, confusion_matrix, mean_iou
from model.submission import (INSTANCE, SEMANTIC, PredictedInstance, read_instances,
                              read_semantic, scenes_in, write_ground_truth, write_instances,
                              write_semantic)
from storage.labels import (CLASS_NAMES, THING_CLASSES, VALID_CLASS_IDS, nyu40_to_scannet20,
                             scannet20_to_nyu40)
from cli.arguments import add_storage_options_argument
from cli.errors import UserError
from cli.run import run_command
from model.checkpoint import load_trained_model, loss_config
from model.dataset import ProjectionConfig
from model.sources import discover_stores, scene_sources, split_scenes
from pipeline.devices import resolve_device
from storage.options import parse_storage_options

log = logging.getLogger(__name__)


@dataclass
class ScenePrediction:
    """A model's answer for one scene: (N,) benchmark classes (0..19) and its instances."""

    scene_id: str
    semantic: np.ndarray
    instances: list[InstancePrediction]

    def instance_ids(self) -> np.ndarray:
        """(N,) int64 predicted instance per point, -1 for none (higher score wins overlaps)."""
        ids = np.full(self.semantic.shape, -1, np.int64)
        for index, instance in sorted(enumerate(self.instances), key=lambda item: item[1].score):
            ids[instance.points] = index
        return ids

    def submission_instances(self) -> list[PredictedInstance]:
        """The instances as the submission format holds them: masks over the N vertices,
        NYU40 labels, scores; in the order of `instances`."""
        found = []
        for instance in self.instances:
            mask = np.zeros(self.semantic.shape, dtype=bool)
            mask[instance.points] = True
            found.append(PredictedInstance(mask, int(VALID_CLASS_IDS[instance.label]),
                                           instance.score))
        return found


class BenchmarkScores:
    """Scenes in, ScanNet's benchmark figures out: one semantic confusion matrix over every
    scene (model.metrics) and the instance evaluator (model.instance_eval).

    num_classes: the benchmark classes (ScanNet-20); instance AP needs exactly those.
    """

    def __init__(self, num_classes: int = len(CLASS_NAMES),
                 min_region_size: int = MIN_REGION_SIZE, device: torch.device | str = "cpu"):
        self.num_classes = num_classes
        # the (K+1)-th column: predictions that are none of the K classes (ScanNet's unknown)
        self.confusion = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64,
                                     device=device)
        self.instances = InstanceEvaluator(min_region_size)
        self.instance_scenes = 0

    def add_semantic(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """predicted: (N,) int64 benchmark class, or num_classes for none of them. target: (N,)
        int64 benchmark class or IGNORE_INDEX (left out, as the script skips invalid ids)."""
        k = self.num_classes
        self.confusion += confusion_matrix(predicted, target, k + 1)[:k].to(self.confusion.device)

    def add_instances(self, semantic: np.ndarray, instance: np.ndarray,
                      predictions: Sequence[PredictedInstance]) -> None:
        """semantic, instance: (N,) the store's ground truth (benchmark class, instance id)."""
        if self.num_classes != len(CLASS_NAMES):
            raise ValueError("instance AP needs ScanNet's 20 benchmark classes")
        self.instances.add(encode_ground_truth(semantic, instance),
                           [p.mask for p in predictions], [p.label for p in predictions],
                           [p.score for p in predictions])
        self.instance_scenes += 1

    def result(self) -> dict[str, Any]:
        """"miou", "class_iou" (K floats, None for a class with TP + FP + FN = 0) and, once
        instances were added, "ap", "ap50", "ap25" and "class_ap", "class_ap50", "class_ap25"
        (K values, None for wall, floor and classes without ground truth)."""
        result: dict[str, Any] = {"miou": mean_iou(self.confusion),
                                  "class_iou": _floats(class_iou(self.confusion).tolist())}
        if self.instance_scenes:
            ap = self.instances.result()
            result.update(ap=ap["ap"], ap50=ap["ap50"], ap25=ap["ap25"])
            for key in ("ap", "ap50", "ap25"):
                per_nyu40 = {nyu40: values[key] for nyu40, values in ap["classes"].items()}
                result[f"class_{key}"] = _floats([per_nyu40.get(nyu40, math.nan)
                                                  for nyu40 in VALID_CLASS_IDS])
        return result


@torch.no_grad()
def evaluate(model: FusionModel, scenes: CachedScenes, scene_ids: list[str], epoch: int,
             loss_config: LossConfig, amp: bool, cluster: ClusterConfig = ClusterConfig(),
             on_scene: Callable[[SceneSample, ScenePrediction], None] | None = None,
             min_region_size: int = MIN_REGION_SIZE) -> dict[str, Any]:
    """Loss terms (mean over scenes) and `BenchmarkScores.result()` of the model on
    `scene_ids`, unaugmented; AP only with an offset head. on_scene(sample, prediction) sees
    every scene; min_region_size: ground-truth instances and predicted masks under this many
    points take no part in AP (ScanNet: 100)."""
    model.eval()
    num_classes = model.config.num_classes
    scores = BenchmarkScores(num_classes, min_region_size, scenes.device)
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
        scores.add_semantic(semantic, batch.semantic)
        prediction = ScenePrediction(scene_id, semantic.cpu().numpy(), [])
        if "offset" in output.head_outputs:
            prediction.instances = cluster_scene(
                sample.xyz.cpu().numpy(), output.head_outputs["offset"].float().cpu().numpy(),
                torch.softmax(output.semantic_logits.float(), 1).cpu().numpy(),
                sample.segment.cpu().numpy(), THING_CLASSES, cluster)
            scores.add_instances(sample.semantic.cpu().numpy(), sample.instance.cpu().numpy(),
                                 prediction.submission_instances())
        if on_scene is not None:
            on_scene(sample, prediction)
    return {**{name: value / max(1, len(scene_ids)) for name, value in sums.items()},
            **scores.result()}


def evaluate_predictions(folder: Path, ground_truth: Callable[[str], Any],
                         scene_ids: Sequence[str] | None = None,
                         min_region_size: int = MIN_REGION_SIZE) -> tuple[dict[str, Any], list[str]]:
    """Score a folder in ScanNet's submission format (model.submission) against ground truth.

    ground_truth(scene_id) -> the store's SceneArrays (xyz, semantic, instance) of the scene,
    raising UserError for an unknown one. Each part present (DIR/semantic, DIR/instance) is
    scored over its scene files, or over `scene_ids` (each then needs its file). Returns
    (`BenchmarkScores.result()`, the scenes scored).
    """
    parts = {part: scenes_in(folder, part) for part in (SEMANTIC, INSTANCE)}
    if not any(parts.values()):
        raise UserError(f"no predictions in {folder}: expected ScanNet's submission format, "
                        f"{folder}/semantic/<scene>.txt and/or {folder}/instance/<scene>.txt "
                        "(see python -m model.evaluate --help)")
    if scene_ids:
        for part, found in parts.items():
            missing = sorted(set(scene_ids) - set(found)) if found else []
            if missing:
                raise UserError(f"no {folder / part / (missing[0] + '.txt')} for scene "
                                f"{missing[0]} (--scenes)")
        parts = {part: list(scene_ids) if found else [] for part, found in parts.items()}
    scores = BenchmarkScores(len(CLASS_NAMES), min_region_size)
    for scene_id in sorted(set(parts[SEMANTIC]) | set(parts[INSTANCE])):
        truth = ground_truth(scene_id)
        n_vertices = len(truth.xyz)
        if scene_id in parts[SEMANTIC]:
            predicted = nyu40_to_scannet20(read_semantic(folder, scene_id, n_vertices))
            predicted = np.where(predicted == IGNORE_INDEX, len(CLASS_NAMES), predicted)
            scores.add_semantic(torch.from_numpy(predicted.astype(np.int64)),
                                torch.from_numpy(truth.semantic.astype(np.int64)))
        if scene_id in parts[INSTANCE]:
            scores.add_instances(truth.semantic, truth.instance,
                                 read_instances(folder, scene_id, n_vertices))
    result = scores.result()
    if not parts[SEMANTIC]:
        result["miou"], result["class_iou"] = None, [None] * len(CLASS_NAMES)
    return result, sorted(set(parts[SEMANTIC]) | set(parts[INSTANCE]))


def export_scene(folder: Path, sample: SceneSample, prediction: ScenePrediction,
                 instances: bool = True) -> None:
    """One scene's predictions in the submission format, and its ground truth beside them.
    instances: False for a model without the instance head: no instance/ files, so that scoring
    the export gives no AP (null), as the direct evaluation does, rather than an AP of 0."""
    write_semantic(folder, prediction.scene_id, scannet20_to_nyu40(prediction.semantic))
    if instances:
        write_instances(folder, prediction.scene_id, prediction.submission_instances())
    write_ground_truth(folder, prediction.scene_id, sample.semantic.cpu().numpy(),
                       sample.instance.cpu().numpy())


def to_json(result: dict[str, Any], scene_ids: Sequence[str]) -> dict[str, Any]:
    """The --json document: {"miou", "ap", "ap50", "ap25", "per_class": {class name: {"iou",
    "ap", "ap50", "ap25"}}, "scenes": [...]}; null where a figure does not exist."""
    def value(key: str, index: int | None = None) -> float | None:
        found = result.get(key)
        if index is not None and found is not None:
            found = found[index]
        return None if found is None or math.isnan(found) else float(found)

    return {
        "miou": value("miou"), "ap": value("ap"), "ap50": value("ap50"), "ap25": value("ap25"),
        "per_class": {name: {"iou": value("class_iou", index), "ap": value("class_ap", index),
                             "ap50": value("class_ap50", index), "ap25": value("class_ap25", index)}
                      for index, name in enumerate(CLASS_NAMES)},
        "scenes": list(scene_ids),
    }


def _floats(values: Sequence[float]) -> list[float | None]:
    """JSON-friendly: NaN (no such figure) becomes None."""
    return [None if v is None or math.isnan(v) else float(v) for v in values]


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
    """PNG, top view: ground-truth and predicted semantics, ground-truth and predicted
    instances, and a legend of the classes either semantic panel shows (instances have a
    colour each; grey is no class, no instance)."""
    truth = sample.semantic.cpu().numpy()
    panels = {
        "ground truth: semantics": class_colours(truth),
        "prediction: semantics": class_colours(prediction.semantic),
        "ground truth: instances": instance_colours(sample.instance.cpu().numpy()) / 255,
        "prediction: instances": instance_colours(prediction.instance_ids()) / 255,
    }
    shown = np.union1d(truth[truth >= 0], prediction.semantic[prediction.semantic >= 0])
    names = CLASS_NAMES if prediction.semantic.max(initial=0) < len(CLASS_NAMES) else None
    legend = {(names[k] if names else f"class {k}"): class_colours(np.array([k]))[0]
              for k in shown.astype(int)}
    legend["unlabelled / no instance"] = class_colours(np.array([-1]))[0]
    plot_top_views(path, sample.xyz.cpu().numpy(), panels,
                   f"{sample.scene_id}: {len(prediction.instances)} predicted instances", legend)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.evaluate",
        description="Semantic mIoU and instance AP, AP50, AP25 by the rules of ScanNet's "
        "evaluation scripts (evaluate_semantic_label.py, evaluate_semantic_instance.py), of a "
        "checkpoint on scenes of the store, or of predictions in ScanNet's submission format "
        "(DIR/semantic/<scene>.txt: a NYU40 id per mesh vertex; DIR/instance/<scene>.txt: lines "
        "`predicted_masks/<scene>_NNN.txt <nyu40 id> <confidence>`, each mask a 0/1 per vertex) "
        "against the ground truth the store holds.")
    parser.add_argument("--cache", required=True,
                        help="a store or a folder of *.zarr stores (the ground truth)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a .pt file written by model.train: run the model")
    source.add_argument("--predictions", type=Path, metavar="DIR",
                        help="score a folder in ScanNet's submission format, made by any model "
                        "(no checkpoint); each file must hold a line per mesh vertex")
    parser.add_argument("--scenes", nargs="*", default=None,
                        help="scene ids (default: the run's validation scenes with --checkpoint, "
                        "every scene file of DIR with --predictions)")
    parser.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="with --checkpoint: also write the predictions in ScanNet's "
                        "submission format to DIR/semantic and DIR/instance, and the store's "
                        "ground truth in the format of the scripts' --gt_path to "
                        "DIR/ground_truth/{semantic,instance}")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help='write {"miou", "ap", "ap50", "ap25", "per_class": {class: {"iou", '
                        '"ap", "ap50", "ap25"}}, "scenes": [...]} to FILE (null: no such figure)')
    parser.add_argument("--min-region-size", type=int, default=MIN_REGION_SIZE,
                        help="ground-truth instances and predicted masks under this many vertices "
                        "take no part in AP (default %(default)s, ScanNet's)")
    parser.add_argument("--out", type=Path, default=None,
                        help="with --checkpoint: folder for <scene>.ply (and .png) (default: next "
                        "to the checkpoint, predictions/)")
    parser.add_argument("--render", action="store_true",
                        help="with --checkpoint: also write a PNG per scene")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    add_storage_options_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.predictions is not None and (args.export or args.out or args.render):
        parser.error("--export, --out and --render need --checkpoint")
    if args.min_region_size < 0:
        parser.error(f"--min-region-size {args.min_region_size}: a number of vertices, 0 or more")

    def evaluate_command() -> None:
        if args.predictions is not None:
            result, scene_ids = run_predictions(args)
            outputs = []
        else:
            result, scene_ids, outputs = run(args)
        if args.json is not None:
            try:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(to_json(result, scene_ids), indent=1) + "\n")
            except OSError as error:
                why = ("a part of its folder is a file" if isinstance(error, FileExistsError)
                       else error.strerror or error)
                raise UserError(f"--json: cannot write {args.json} ({why}): give a file in a "
                                "folder you can write") from None
            outputs.append(f"metrics: {args.json}")
        print(format_result(result))
        for line in outputs:
            print(line)

    return run_command(evaluate_command)


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str], list[str]]:
    """The checkpoint mode: (result, scenes, lines saying where the outputs are)."""
    device = resolve_device(args.device)
    trained = load_trained_model(args.checkpoint, device)
    config = trained.config
    stores = discover_stores(args.cache, parse_storage_options(args.storage_options))
    sources = scene_sources(stores, trained.featureset)
    if trained.data is not None:
        val_ids = list(trained.data["val"])
    else:  # a run from before checkpoints recorded their split: the split it made
        val_ids = split_scenes(list(sources), config.val_list, config.val_fraction,
                               config.seed)[1]
    scenes = CachedScenes(sources, trained.featureset, device,
                          ProjectionConfig(config.depth_threshold, config.relative_threshold))
    scene_ids = args.scenes or val_ids
    missing = sorted(set(scene_ids) - set(scenes.sources))
    if missing:
        raise UserError(f"no finished features for scenes {', '.join(missing)} in {args.cache}")
    out = args.out or Path(args.checkpoint).resolve().parent.parent / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    progress = (f"interrupted in epoch {trained.epochs + 1} at step {trained.step}"
                if trained.step else f"after {trained.epochs} epochs")
    log.info("evaluating %s (%s) on %d scenes", args.checkpoint, progress, len(scene_ids))

    instances = []

    def save(sample: SceneSample, prediction: ScenePrediction) -> None:
        instances.append(len(prediction.instances))
        write_ply(out / f"{sample.scene_id}.ply", sample.xyz.cpu().numpy(), prediction)
        if args.render:
            render(out / f"{sample.scene_id}.png", sample, prediction)
        if args.export is not None:
            export_scene(args.export, sample, prediction, instances=config.instance_head)

    amp = device.type == "cuda" if config.amp is None else config.amp
    result = evaluate(trained.model, scenes, scene_ids, trained.epochs,
                      loss_config(config, trained.spec), amp,
                      ClusterConfig(config.cluster_radius, config.min_instance_points),
                      on_scene=save, min_region_size=args.min_region_size)
    outputs = [f"predicted instances: {sum(instances)} in {len(instances)} scenes",
               f"predictions: {out}"]
    if args.export is not None:
        parts = f"{args.export}/semantic" + (f", {args.export}/instance"
                                             if config.instance_head else "")
        outputs.append(f"submission: {parts} (ground truth for ScanNet's scripts: "
                       f"{args.export}/ground_truth)")
    return result, list(scene_ids), outputs


def run_predictions(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The predictions mode: score DIR against the ground truth of the stores in --cache."""
    if not args.predictions.is_dir():
        raise UserError(f"no folder {args.predictions} (--predictions)")
    stores = discover_stores(args.cache, parse_storage_options(args.storage_options))
    where = {scene_id: store for store in reversed(stores) for scene_id in store.scenes()}

    def ground_truth(scene_id: str):
        if scene_id not in where:
            raise UserError(f"{args.predictions} has predictions for scene {scene_id}, which no "
                            f"store in {args.cache} holds: remove its files or pass --scenes")
        return where[scene_id].scene(scene_id, with_depth=False)

    return evaluate_predictions(args.predictions, ground_truth, args.scenes,
                                args.min_region_size)


def format_result(result: dict[str, Any]) -> str:
    def number(value: float | None) -> str:
        return "  -  " if value is None or math.isnan(value) else f"{value:.3f}"

    lines = []
    if result.get("miou") is not None:
        lines.append(f"semantic mIoU {number(result['miou'])}")
    if "ap" in result:
        lines.append(f"instance AP {number(result['ap'])}  AP50 {number(result['ap50'])}  "
                     f"AP25 {number(result['ap25'])}")
    names = CLASS_NAMES if len(result["class_iou"]) == len(CLASS_NAMES) else None
    for index, iou in enumerate(result["class_iou"]):
        ap = [result[key][index] for key in ("class_ap", "class_ap50", "class_ap25")
              if key in result]
        if iou is None and all(value is None for value in ap):
            continue
        name = names[index] if names else str(index)
        line = f"  {name:<16} IoU {number(iou)}"
        if ap and any(value is not None for value in ap):
            line += f"  AP {number(ap[0])}  AP50 {number(ap[1])}  AP25 {number(ap[2])}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
