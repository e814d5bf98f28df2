"""Open-vocabulary queries: label every point of a scene by the text prompt it matches best.

    python -m model.query --cache storage/ --scene scene0000_00 --text chair table "coffee table"
    python -m model.query --cache storage/ --scene scene0000_00 --eval \
        --checkpoint runs/RUN/checkpoints/best.pt

Two routes give each point a feature in CLIP's image-text space, compared by cosine with the
prompts' text embeddings (the best prompt labels the point):

- `2d`: the cached spatial features projected onto the points (model.dataset), no training at
  all, as OpenScene's 2D fusion. Only a `maskclip` feature set lives in that space; points that
  no view sees get no label (-1, "unknown") and are counted, never guessed.
- `fused`: a trained fusion model's fused features, mapped per point into CLIP's embedding space
  by its CLIP head (FusionModel.point_clip_embed). Every point gets a label; any spatial kind.

Text embeddings come from the store, written there by `python -m pipeline.text_embeddings` with
the feature set's own CLIP: stage 2 never runs CLIP and this module never imports open_clip. A
prompt without a cached embedding is encoded first by that command, run as a child process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cli.arguments import add_storage_options_argument
from cli.errors import UserError
from cli.run import run_command
from model.checkpoint import distill_weight, load_trained_model
from model.dataset import CachedScenes, ProjectionConfig, SceneSample, collate
from model.evaluate import (_floats, class_colours, format_result, plot_top_views,
                            write_points_ply)
from model.network.fusion import FusionModel
from model.metrics import class_iou, confusion_matrix, mean_iou
from model.sources import discover_stores, scene_sources
from pipeline.devices import resolve_device
from pipeline.prompts import (DEFAULT_TEMPLATES, SCANNET20_PROMPTS, add_templates_argument,
                              resolve_templates, templates_flag)
from storage.errors import StoreError
from storage.featureset import FeatureSetSpec
from storage.selection import choose_featureset
from storage.options import parse_storage_options
from storage.text import missing_prompts, read_text_embeddings

log = logging.getLogger(__name__)

Route = Literal["2d", "fused"]
UNKNOWN = -1
"""Label of a point without a feature (2d route: no view sees it)."""


@dataclass(frozen=True)
class QueryConfig:
    """One query; the CLI maps one-to-one onto it (see `build_parser` for each field's help)."""

    cache: str
    scenes: tuple[str, ...]
    text: tuple[str, ...] = ()
    evaluate: bool = False
    checkpoint: str | None = None
    featureset: str | None = None
    route: Literal["auto", "2d", "fused", "both"] = "auto"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    out: str | None = None
    device: str = "auto"
    storage_options: str | None = None

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.text or SCANNET20_PROMPTS


@dataclass
class PointLabels:
    """One route's answer for one scene: labels (N,) int64 prompt index or UNKNOWN, and
    score (N,) float32, the cosine of the point's feature with its prompt (NaN if unknown)."""

    labels: np.ndarray
    score: np.ndarray

    @property
    def unknown(self) -> int:
        return int((self.labels == UNKNOWN).sum())


def label_points(features: Tensor, text: Tensor, seen: Tensor) -> PointLabels:
    """Label each point by the prompt of highest cosine similarity.

    features: (N, D) float, points' features in CLIP's space (any norm). text: (K, D) float
    text embeddings. seen: (N,) bool, whether a point has a feature; others get UNKNOWN.
    """
    similarity = F.normalize(features.float(), dim=1) @ F.normalize(text.float(), dim=1).T
    score, labels = similarity.max(dim=1)
    labels = torch.where(seen, labels, UNKNOWN)
    score = torch.where(seen, score, torch.nan)
    return PointLabels(labels.cpu().numpy(), score.cpu().numpy().astype(np.float32))


@torch.no_grad()
def point_features(route: Route, sample: SceneSample, model: FusionModel | None,
                   amp: bool = False) -> tuple[Tensor, Tensor]:
    """A route's (N, D) point features in CLIP's space and (N,) bool where they exist."""
    if route == "2d":
        return sample.feat2d, sample.seen
    model.eval()
    batch = collate([sample])
    with torch.autocast(batch.device.type, dtype=torch.float16, enabled=amp):
        fused = model(batch).fused
    return model.point_clip_embed(fused), torch.ones_like(sample.seen)


def resolve_routes(route: str, spec: FeatureSetSpec, featureset: str,
                   has_model: bool) -> tuple[Route, ...]:
    """The routes to run: `auto` is 2d alone without a model, both with one (fused alone on a
    feature set outside CLIP's text space). Raises UserError for a route that cannot run, and
    for any route on a feature set whose encoder has no text tower (DINOv2)."""
    if not spec.has_text_tower:
        raise UserError(
            f"feature set {featureset} ({spec.model}, {spec.encoder}) is not text-aligned: its "
            "encoder has no text tower, so text queries cannot use it; query a CLIP feature set "
            "(extracted with --encoder open_clip) with --featureset")
    text_aligned = spec.text_aligned
    if route == "auto":
        if has_model and not text_aligned:
            log.info("feature set %s is not text-aligned (%s): the fused route only", featureset,
                     spec.spatial_kind)
        route = ("both" if text_aligned else "fused") if has_model else "2d"
    wanted: tuple[Route, ...] = ("2d", "fused") if route == "both" else (route,)
    if "fused" in wanted and not has_model:
        raise UserError("the fused route needs a trained model: pass --checkpoint "
                        "RUN/checkpoints/best.pt (written by python -m model.train)")
    if "2d" in wanted and not text_aligned:
        raise UserError(
            f"feature set {featureset} holds {spec.spatial_kind!r} spatial features "
            f"({spec.spatial_dim}-d ViT tokens), not in CLIP's image-text space: the "
            "2d route needs a feature set extracted with --spatial-kind maskclip; with a model "
            "trained on this one, pass --checkpoint and --route fused")
    return wanted


def text_command(store_url: str, featureset: str, prompts: tuple[str, ...] | None,
                 templates: tuple[str, ...], storage_options: str | None = None) -> list[str]:
    """The command that caches the embeddings of `prompts` (None: the ScanNet-20 prompts), as
    argv starting with `python`."""
    what = ["--scannet20"] if prompts is None else ["--prompts", *prompts]
    options = ["--storage-options", storage_options] if storage_options else []
    return ["python", "-m", "pipeline.text_embeddings", "--store", store_url,
            "--featureset", featureset, *what, *templates_flag(templates), *options]


def encode_missing_prompts(command: list[str], device: str = "auto") -> str:
    """Run `text_command(...)` as a child process with this interpreter: the feature set's own
    CLIP text tower encodes the prompts and caches them in the store, and this process never
    imports open_clip (stage 2 never runs CLIP). Returns the child's summary line; raises
    UserError with the child's one-line reason and the command to run by hand."""
    result = subprocess.run([sys.executable, *command[1:], "--device", device],
                            capture_output=True, text=True)
    if result.returncode != 0:
        reasons = [line.removeprefix("error: ") for line in result.stderr.splitlines()
                   if line.startswith("error: ")]
        reason = reasons[-1] if reasons else (result.stderr.strip().splitlines() or ["?"])[-1]
        raise UserError(f"could not encode the prompts with the feature set's text tower "
                        f"({reason}): fix that and run `{shlex.join(command)}`")
    return result.stdout.strip()


class Query:
    """The scenes, feature set, text embeddings and (optionally) trained model of a query."""

    def __init__(self, config: QueryConfig):
        self.config = config
        self.model: FusionModel | None = None
        self.amp = False
        device = resolve_device(config.device)
        stores = discover_stores(config.cache, parse_storage_options(config.storage_options))
        projection = ProjectionConfig()
        if config.checkpoint:
            loaded = load_trained_model(config.checkpoint, device)
            self.model, trained, featureset = loaded.model, loaded.config, loaded.featureset
            trained_on = loaded.spec
            if config.featureset not in (None, featureset):
                raise UserError(f"{config.checkpoint} was trained on feature set {featureset}, "
                                f"not {config.featureset}: drop --featureset")
            self.amp = device.type == "cuda" if trained.amp is None else trained.amp
            projection = ProjectionConfig(trained.depth_threshold, trained.relative_threshold)
            if distill_weight(trained, trained_on) == 0:
                log.warning("%s was trained without the per-point distillation loss: its CLIP "
                            "head knows view means only, expect the fused route near chance "
                            "(train on a maskclip feature set, or with --distill-weight)",
                            config.checkpoint)
            self.featureset, self.spec = choose_featureset(stores, featureset)
        else:
            self.featureset, self.spec = choose_featureset(  # text needs a text tower
                stores, config.featureset, "query", usable=lambda spec: spec.has_text_tower)
        self.scenes = CachedScenes(scene_sources(stores, self.featureset), self.featureset,
                                   device, projection)
        if "planted" in self.spec.notes:
            log.info("feature set %s is planted (pipeline.planted): its features are text "
                     "embeddings planted per labelled region, a yardstick", self.featureset)
        elif self.spec.random_weights:
            log.warning("feature set %s was extracted with RANDOM encoder weights: its zero-shot "
                        "labels carry no meaning", self.featureset)
        self.routes = resolve_routes(config.route, self.spec, self.featureset,
                                     self.model is not None)
        missing = sorted(set(config.scenes) - set(self.scenes.sources))
        if missing:
            raise UserError(f"no finished features of feature set {self.featureset} for scene "
                            f"{', '.join(missing)} in {config.cache} (scenes: "
                            f"{', '.join(sorted(self.scenes.sources)) or 'none'})")
        by_store = {}  # read once per store, not once per scene
        self.text = {}
        for scene_id in config.scenes:
            store = self.scenes.sources[scene_id]
            if store.url not in by_store:
                by_store[store.url] = self._text_embeddings(store)
            self.text[scene_id] = by_store[store.url]

    def _text_embeddings(self, store) -> Tensor:
        """(K, D) embeddings of the prompts, from one store; prompts it lacks are encoded
        first (encode_missing_prompts) and cached there."""
        prompts, templates = self.config.prompts, self.config.templates
        try:
            text = read_text_embeddings(store, self.featureset, prompts, templates)
        except StoreError:
            missing = missing_prompts(store, self.featureset, prompts, templates)
            command = text_command(store.url, self.featureset,
                                   tuple(missing) if self.config.text else None, templates,
                                   self.config.storage_options)
            log.info("encoding %d prompt(s) not cached in %s (%s) with the text tower of "
                     "feature set %s: %s", len(missing), store.url,
                     ", ".join(map(repr, missing[:5])), self.featureset, shlex.join(command))
            log.info("%s", encode_missing_prompts(command, self.config.device))
            text = read_text_embeddings(store, self.featureset, prompts, templates)
        text = torch.from_numpy(text)
        widths = {"2d": self.spec.spatial_dim,
                  "fused": self.model.config.clip_dim if self.model is not None else None}
        for route in self.routes:
            if widths[route] != text.shape[1]:
                raise UserError(f"text embeddings are {text.shape[1]}-d but the {route} route's "
                                f"features are {widths[route]}-d: not the same CLIP space")
        return text.to(self.scenes.device)

    def run(self, on_scene: Callable[[SceneSample, dict[str, PointLabels]], None] | None = None
            ) -> dict[str, Any]:
        """Label every scene by every route; with config.evaluate, mIoU per route (unknown
        points count as misses). on_scene(sample, {route: PointLabels}) sees each scene."""
        num_prompts = len(self.config.prompts)
        confusion = {route: torch.zeros(num_prompts + 1, num_prompts + 1, dtype=torch.int64)
                     for route in self.routes}
        scenes: dict[str, Any] = {}
        for scene_id in self.config.scenes:
            sample = self.scenes.get(scene_id)
            answers = {}
            for route in self.routes:
                features, seen = point_features(route, sample, self.model, self.amp)
                answers[route] = answer = label_points(features, self.text[scene_id], seen)
                if self.config.evaluate:
                    predicted = torch.from_numpy(np.where(answer.labels >= 0, answer.labels,
                                                          num_prompts))
                    confusion[route] += confusion_matrix(predicted, sample.semantic.cpu(),
                                                         num_prompts + 1)
            scenes[scene_id] = {route: {
                "points": int(answer.labels.size), "unknown": answer.unknown,
                "counts": {prompt: int(count) for prompt, count in zip(
                    self.config.prompts, np.bincount(answer.labels[answer.labels >= 0],
                                                     minlength=num_prompts))}}
                for route, answer in answers.items()}
            if on_scene is not None:
                on_scene(sample, answers)
        result: dict[str, Any] = {"featureset": self.featureset, "routes": list(self.routes),
                                  "prompts": list(self.config.prompts),
                                  "templates": list(self.config.templates), "scenes": scenes}
        if self.config.evaluate:
            # the unknown column (points no view sees) lowers the true class's IoU; it is no
            # class of its own (ScanNet's rule for predictions outside the classes)
            result["metrics"] = {route: {"miou": mean_iou(matrix[:num_prompts]),
                                         "class_iou": _floats(class_iou(matrix[:num_prompts]))}
                                 for route, matrix in confusion.items()}
        return result


def write_outputs(out: Path, sample: SceneSample, answers: dict[str, PointLabels],
                  prompts: tuple[str, ...], with_truth: bool) -> None:
    """`<scene>.<route>.ply` per route (colour by prompt, `label` and `score` properties) and
    `<scene>.png`: the routes' labels seen from above, beside the ground truth if `with_truth`."""
    xyz = sample.xyz.cpu().numpy()
    panels = {}
    if with_truth:
        panels["ground truth"] = class_colours(sample.semantic.cpu().numpy())
    for route, answer in answers.items():
        colours = class_colours(answer.labels)
        write_points_ply(out / f"{sample.scene_id}.{route}.ply", xyz,
                         np.round(colours * 255).astype(np.uint8),
                         {"label": answer.labels.astype(np.int16), "score": answer.score})
        panels[f"{route}: {answer.unknown} unknown" if answer.unknown else route] = colours
    legend = {prompt: class_colours(np.array([k]))[0] for k, prompt in enumerate(prompts)}
    legend["unknown / unlabelled"] = class_colours(np.array([UNKNOWN]))[0]
    plot_top_views(out / f"{sample.scene_id}.png", xyz, panels,
                   f"{sample.scene_id}: open-vocabulary labels", legend)


def format_summary(result: dict[str, Any]) -> str:
    """Per scene and route: points, unknown points, the most frequent prompts; then mIoU."""
    lines = []
    for scene_id, routes in result["scenes"].items():
        for route, figures in routes.items():
            top = sorted(figures["counts"].items(), key=lambda item: -item[1])[:5]
            unknown = f", {figures['unknown']} unknown (seen by no view)" if route == "2d" else ""
            lines.append(f"{scene_id} {route}: {figures['points']} points{unknown}; most labelled: "
                         + ", ".join(f"{prompt} {count}" for prompt, count in top if count))
    for route, metrics in result.get("metrics", {}).items():
        lines.append(f"[{route}] " + format_result(metrics))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.query",
        description="Open-vocabulary segmentation: label each point of a scene by the text "
        "prompt whose CLIP text embedding its feature matches best, from the projected 2D "
        "features (no training) and/or a trained model's fused features. Writes a PLY per "
        "route and a PNG per scene; --eval scores against the scene's labels. Text embeddings "
        "are read from the store; prompts not cached there are encoded first with the feature "
        "set's own CLIP text tower (`python -m pipeline.text_embeddings`, run for them).")
    parser.add_argument("--cache", required=True, help="a store or a folder of *.zarr stores")
    parser.add_argument("--scene", "--scenes", dest="scenes", nargs="+", required=True,
                        metavar="ID", help="scene id(s) to label")
    parser.add_argument("--text", nargs="+", default=[], metavar="PROMPT",
                        help="prompts, e.g. chair \"coffee table\"; each point takes the best one "
                        "(colours repeat after 20). With --eval: 20 prompts, one per ScanNet class "
                        "in class order (default there: the class names)")
    parser.add_argument("--eval", dest="evaluate", action="store_true",
                        help="mIoU and per-class IoU against the scene's ScanNet-20 labels, the 20 "
                        "class names as prompts; unknown points count as misses")
    parser.add_argument("--checkpoint", default=None,
                        help="a .pt file written by model.train: adds the fused route")
    parser.add_argument("--featureset", default=None,
                        help="feature set id (default: the checkpoint's, or the only one)")
    parser.add_argument("--route", choices=("auto", "2d", "fused", "both"), default="auto",
                        help="2d: projected cached features (needs a maskclip feature set); fused: "
                        "the model's fused features through its CLIP head (needs --checkpoint); "
                        "auto (default): 2d, or both with --checkpoint (fused alone on a tokens "
                        "feature set)")
    add_templates_argument(parser)
    parser.add_argument("--out", default=None,
                        help="folder for <scene>.<route>.ply, <scene>.png and query.json "
                        "(default runs/query-<date>-<time>)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    add_storage_options_argument(parser)
    return parser


def parse_config(argv: list[str] | None = None) -> QueryConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.text and not args.evaluate:
        parser.error("give --text PROMPT [PROMPT ...] or --eval")
    if args.evaluate and args.text and len(args.text) != len(SCANNET20_PROMPTS):
        parser.error(f"--eval with --text needs {len(SCANNET20_PROMPTS)} prompts, one per ScanNet "
                     f"class in class order; got {len(args.text)}")
    values = {**vars(args), "scenes": tuple(args.scenes), "text": tuple(args.text)}
    try:
        values["templates"] = resolve_templates(args.templates)
    except UserError as error:
        parser.error(str(error))
    return QueryConfig(**values)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    out = Path(config.out or f"runs/query-{time.strftime('%Y%m%d-%H%M%S')}")

    def query_command() -> None:
        query = Query(config)
        out.mkdir(parents=True, exist_ok=True)
        result = query.run(lambda sample, answers: write_outputs(
            out, sample, answers, config.prompts, config.evaluate))
        (out / "query.json").write_text(json.dumps(
            {"config": dataclasses.asdict(config), **result}, indent=1))
        print(format_summary(result))
        print(f"labels: {out}")

    return run_command(query_command)


if __name__ == "__main__":
    sys.exit(main())
