"""Stage 1 as a Prefect flow, `extract-clip`: frozen CLIP over every frame into the store.

Run it directly (Prefect's ephemeral API, no server)::

    python -m flows.extract_clip --root /data/scannet --dataset scannet \
        --store storage/scannet.zarr --model ViT-B-16 --pretrained openai

or as a deployment on a Prefect server (`python -m flows.serve`, then
`prefect deployment run 'extract-clip/local' --param root=... --param store=...`).

The flow reads as a table of contents; the work is in pipeline.extraction. One task per
scene, with retries for transient failures; a scene that cannot be read fails alone, the
others finish, and the run fails at the end naming it. The store's `done` masks make every
run resumable: frames already done are never encoded again.
"""

# No `from __future__ import annotations`: Prefect validates parameters with pydantic from the
# real annotations, and a served deployment loads this file where string annotations do not resolve.
import argparse
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from pipeline.clip_encoder import EncoderConfig, FrozenClipEncoder, parse_image_size
from pipeline.extraction import SceneReport, extract_scene
from pipeline.scannet import ScanNetScene, list_scenes
from pipeline.synthetic import SyntheticScene
from storage.errors import UserError
from storage.inspect import summarise
from storage.store import open_store

SCENE_READERS = {"scannet": ScanNetScene, "synthetic": SyntheticScene}


class ExtractionFailed(UserError):
    """Some scenes failed; everything else is in the store."""


@functools.lru_cache(maxsize=2)
def _encoder(config_json: str) -> FrozenClipEncoder:
    """One frozen encoder per process and configuration (threads and Dask workers share it)."""
    return FrozenClipEncoder(EncoderConfig(**json.loads(config_json)))


def _retry_unless_user_error(task, task_run, state) -> bool:
    """A scene with a missing mesh will not heal on retry; a flaky file system might."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_user_error,
      task_run_name="extract {scene_dir}")
def extract_scene_task(
    scene_dir: str, dataset: str, store_url: str, encoder_json: str, featureset: str,
    stride: int, batch_size: int,
) -> dict[str, Any]:
    """Encode one scene's frames that are not done yet; returns its SceneReport as a dict."""
    scene = SCENE_READERS[dataset].open(Path(scene_dir))
    store = open_store(store_url, mode="a")
    encoder = _encoder(encoder_json)
    artifact = create_progress_artifact(0.0, description=f"{scene.scene_id}: frames encoded")
    bar = tqdm(desc=scene.scene_id, unit="frame", leave=False)

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        update_progress_artifact(artifact, 100.0 * done / total)

    try:
        report = extract_scene(scene, store, encoder, featureset, stride=stride,
                               batch_size=batch_size, on_progress=on_progress)
    finally:
        bar.close()
    update_progress_artifact(artifact, 100.0)
    get_run_logger().info(
        "%s: %d frames encoded, %d already done, %d invalid, %.1f frames/s",
        report.scene_id, report.encoded, report.already_done, len(report.invalid),
        report.frames_per_second,
    )
    return report.__dict__


@flow(name="extract-clip-scenes")
def _extract_scenes(scene_dirs: list[str], **kwargs: Any) -> list[dict[str, Any] | str]:
    """Submit one task per scene to this subflow's task runner; failures come back as text."""
    futures = [extract_scene_task.submit(scene_dir, **kwargs) for scene_dir in scene_dirs]
    results: list[dict[str, Any] | str] = []
    for scene_dir, future in zip(scene_dirs, futures):
        try:
            results.append(future.result())
        except Exception as error:  # reported per scene; the flow fails at the end
            results.append(f"{Path(scene_dir).name}: {error}")
    return results


def make_task_runner(task_runner: str, workers: int):
    """`threads` (default), `dask` (a LocalCluster of `workers` processes) or a scheduler address."""
    if task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner  # only when asked: starting Dask costs seconds

    if task_runner == "dask":
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return DaskTaskRunner(address=task_runner)


@flow(name="extract-clip")
def extract_clip(
    root: str,
    store: str = "storage/features.zarr",
    dataset: Literal["scannet", "synthetic"] = "scannet",
    scenes: list[str] | str | None = None,
    stride: int = 1,
    model: str = "ViT-B-16",
    pretrained: str = "openai",
    image_size: str | None = None,
    resize: Literal["squash", "crop"] = "squash",
    spatial_kind: Literal["tokens", "maskclip"] = "tokens",
    batch_size: int = 16,
    device: str = "auto",
    task_runner: str = "threads",
    workers: int = 2,
) -> dict[str, Any]:
    """Run frozen CLIP over every frame of every selected scene into the store.

    Returns the run summary (feature set id, per-scene reports, failures, frames/s, bytes).
    Raises ExtractionFailed after all scenes ran when any scene failed.
    """
    logger = get_run_logger()
    start = time.perf_counter()
    feature_store = open_store(store, mode="a")  # fails fast on a read-only path, before the model
    scene_dirs = [str(path) for path in list_scenes(Path(root), scenes)]
    if not scene_dirs:
        raise UserError(f"no scenes under {root} match {scenes or 'any'}: check --root and --scenes")
    encoder_config = EncoderConfig(model=model, pretrained=pretrained,
                                   image_size=parse_image_size(image_size), resize=resize,
                                   spatial_kind=spatial_kind, device=device)
    encoder_json = json.dumps(encoder_config.__dict__, sort_keys=True)
    featureset = feature_store.register_featureset(_encoder(encoder_json).describe())
    logger.info("feature set %s: %d scenes from %s into %s", featureset, len(scene_dirs), root, store)
    extraction_start = time.perf_counter()
    results = _extract_scenes.with_options(task_runner=make_task_runner(task_runner, workers))(
        scene_dirs, dataset=dataset, store_url=store, encoder_json=encoder_json,
        featureset=featureset, stride=stride, batch_size=batch_size,
    )
    reports = [SceneReport(**r) for r in results if isinstance(r, dict)]
    failures = [r for r in results if isinstance(r, str)]
    summary = _summary(feature_store, featureset, reports, failures,
                       extraction_seconds=time.perf_counter() - extraction_start,
                       seconds=time.perf_counter() - start)
    create_markdown_artifact(_summary_markdown(summary), key="extract-clip-summary",
                             description="extract-clip: scenes, frames, throughput, store size")
    if failures:
        raise ExtractionFailed(
            f"{len(failures)} of {len(scene_dirs)} scenes failed (the others are stored in {store}): "
            + "; ".join(failures)
        )
    return summary


def _summary(store, featureset, reports, failures, *, extraction_seconds, seconds) -> dict[str, Any]:
    """frames_per_second is over the wall time of the scene tasks, all scenes together."""
    encoded = sum(r.encoded for r in reports)
    return {
        "store": store.url,
        "featureset": featureset,
        "scenes": {r.scene_id: {"frames": r.frames, "encoded": r.encoded,
                                "already_done": r.already_done, "invalid": r.invalid}
                   for r in reports},
        "failed": failures,
        "frames_encoded": encoded,
        "frames_invalid": sum(len(r.invalid) for r in reports),
        "frames_per_second": encoded / extraction_seconds,
        "seconds": seconds,
        "bytes": summarise(store)["bytes"],
    }


def _summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {sid} | {s['frames']} | {s['encoded']} | {s['already_done']} | {len(s['invalid'])} |"
        for sid, s in summary["scenes"].items()
    )
    failed = "\n".join(f"- {failure}" for failure in summary["failed"]) or "none"
    return (
        f"# extract-clip\n\nStore `{summary['store']}`, feature set `{summary['featureset']}`.\n\n"
        f"| scene | frames | encoded | already done | invalid |\n|---|---|---|---|---|\n{rows}\n\n"
        f"{summary['frames_encoded']} frames encoded at {summary['frames_per_second']:.1f} frames/s, "
        f"{summary['frames_invalid']} invalid; store {summary['bytes'] / 1e6:.1f} MB.\n\n"
        f"Failed scenes: {failed}\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.extract_clip",
        description="Stage 1: run frozen CLIP over every RGB frame of every scene and write spatial "
        "and global features to a Zarr store (resumable: frames already done are skipped).",
    )
    parser.add_argument("--root", required=True, help="dataset root: a folder of scene folders")
    parser.add_argument("--dataset", choices=["scannet", "synthetic"], default="scannet",
                        help="layout of the scenes (synthetic scenes use ScanNet's layout plus exact "
                        "ground truth); default scannet")
    parser.add_argument("--store", default="storage/features.zarr",
                        help="store path or fsspec URL, created if missing (default %(default)s)")
    parser.add_argument("--scenes", nargs="*", default=None,
                        help="scene ids, or one glob such as 'scene00*' (default: all)")
    parser.add_argument("--stride", type=int, default=1, help="keep every N-th frame (default 1)")
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip model name, e.g. ViT-B-16 or test-ViT-tiny (default %(default)s)")
    parser.add_argument("--pretrained", default="openai",
                        help="open_clip tag (openai, laion2b_s34b_b88k), a checkpoint path, or none "
                        "for seeded random weights (default %(default)s)")
    parser.add_argument("--image-size", default=None,
                        help="model input size, S or HxW such as 240x320 (default: the model's own)")
    parser.add_argument("--resize", choices=["squash", "crop"], default="squash",
                        help="squash: whole frame resized to the input (default); crop: shortest side "
                        "then centre crop, as open_clip's preprocess")
    parser.add_argument("--spatial-kind", choices=["tokens", "maskclip"], default="tokens",
                        help="tokens: last block's token grid (768-d for ViT-B-16, default); maskclip: "
                        "text-aligned dense features (512-d)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per forward pass")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--task-runner", default="threads",
                        help="threads (default), dask (a LocalCluster), or a Dask scheduler address "
                        "such as tcp://10.0.0.5:8786")
    parser.add_argument("--workers", type=int, default=2,
                        help="scenes processed at once: threads, or LocalCluster workers (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenes = args.scenes[0] if args.scenes and len(args.scenes) == 1 and "*" in args.scenes[0] else args.scenes
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = extract_clip(
            root=args.root, store=args.store, dataset=args.dataset, scenes=scenes,
            stride=args.stride, model=args.model, pretrained=args.pretrained,
            image_size=args.image_size, resize=args.resize, spatial_kind=args.spatial_kind,
            batch_size=args.batch_size, device=args.device, task_runner=args.task_runner,
            workers=args.workers,
        )
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"stored {summary['frames_encoded']} frames ({summary['frames_invalid']} invalid) of "
          f"{len(summary['scenes'])} scenes at {summary['frames_per_second']:.1f} frames/s into "
          f"{summary['store']}, feature set {summary['featureset']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
