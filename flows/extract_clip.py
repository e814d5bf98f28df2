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
import contextlib
import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from pipeline.clip_encoder import EncoderConfig, FrozenClipEncoder, parse_image_size
from pipeline.devices import claim_gpu
from pipeline.extraction import SceneReport, extract_scene
from pipeline.scannet import ScanNetScene, list_scenes
from pipeline.synthetic import SyntheticScene
from storage.errors import UserError
from storage.inspect import summarise
from storage.store import (add_storage_options_argument, check_storage_options, open_store,
                           parse_storage_options)

SCENE_READERS = {"scannet": ScanNetScene, "synthetic": SyntheticScene}


class ExtractionFailed(UserError):
    """Some scenes failed; everything else is in the store."""


_encoder_lock = threading.Lock()


def _encoder(config_json: str) -> FrozenClipEncoder:
    """The process's encoder of this configuration, built once even when threads ask at once."""
    with _encoder_lock:
        return _build_encoder(config_json)


@functools.lru_cache(maxsize=2)
def _build_encoder(config_json: str) -> FrozenClipEncoder:
    """One frozen encoder per process and configuration (threads and Dask workers share it).

    In a Dask worker process with device auto or cuda, the encoder takes a GPU that no other
    worker on the machine has claimed (pipeline.devices.claim_gpu), so that
    `dask worker --nworkers 4 --resources GPU=1` on a 4-GPU machine uses all four."""
    config = EncoderConfig(**json.loads(config_json))
    if config.device in ("auto", "cuda") and _in_dask_worker() and torch.cuda.is_available():
        gpu = claim_gpu()
        if gpu is None:
            logging.getLogger(__name__).warning(
                "every GPU of this machine is claimed by another worker: this one shares "
                "cuda:0; start at most one worker process per GPU")
        else:
            config = dataclasses.replace(config, device=f"cuda:{gpu}")
    return FrozenClipEncoder(config)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


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
    stride: int, batch_size: int, storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Encode one scene's frames that are not done yet; returns its SceneReport as a dict,
    with the process that ran it ("worker": host:pid) and how many models that process has
    loaded so far ("model_loads": 1 on every worker, however many scenes it runs)."""
    scene = SCENE_READERS[dataset].open(Path(scene_dir))
    store = open_store(store_url, mode="a", storage_options=storage_options)
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
    return {**report.__dict__, "worker": f"{socket.gethostname()}:{os.getpid()}",
            "model_loads": _build_encoder.cache_info().misses}


@flow(name="extract-clip-scenes")
def _extract_scenes(scene_dirs: list[str], resources: dict[str, float] | None = None,
                    **kwargs: Any) -> list[dict[str, Any] | str]:
    """Submit one task per scene to this subflow's task runner; failures come back as text.

    resources: Dask worker resources each scene task needs, e.g. {"GPU": 1}: a worker started
    with `--resources GPU=1` runs one scene at a time (Dask task runners only)."""
    with dask_annotations(resources):
        futures = [extract_scene_task.submit(scene_dir, **kwargs) for scene_dir in scene_dirs]
    results: list[dict[str, Any] | str] = []
    for scene_dir, future in zip(scene_dirs, futures):
        try:
            results.append(future.result())
        except Exception as error:  # reported per scene; the flow fails at the end
            results.append(f"{Path(scene_dir).name}: {error}")
    return results


def make_task_runner(task_runner: str, workers: int, dask_address: str | None = None):
    """`threads` (default) or `dask`: a LocalCluster of `workers` processes, or with
    `dask_address` the existing cluster whose scheduler listens there (tcp://host:8786)."""
    if task_runner == "threads" and dask_address is None:
        return ThreadPoolTaskRunner(max_workers=workers)
    from prefect_dask import DaskTaskRunner  # only when asked: starting Dask costs seconds

    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                          "processes": True, "dashboard_address": None})


def check_dask_resources(address: str, resources: dict[str, float]) -> None:
    """Raise a UserError unless some worker of the cluster at `address` offers `resources`."""
    from distributed import Client

    with Client(address, timeout=30) as client:
        offered = [worker.get("resources", {})
                   for worker in client.scheduler_info(n_workers=-1)["workers"].values()]
    if not any(all(have.get(name, 0) >= need for name, need in resources.items())
               for have in offered):
        wanted = ",".join(f"{name}={need:g}" for name, need in resources.items())
        raise UserError(f"no worker of the Dask cluster at {address} offers {wanted} (workers "
                        f"offer: {offered or 'no workers'}): start workers with "
                        f"`dask worker {address} --resources {wanted}` or drop --dask-resources")


def dask_annotations(resources: dict[str, float] | None):
    """A context in which Dask submissions ask for `resources` (no-op without)."""
    if not resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=resources)


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
    task_runner: Literal["threads", "dask"] = "threads",
    workers: int = 2,
    dask_address: str | None = None,
    dask_resources: dict[str, float] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run frozen CLIP over every frame of every selected scene into the store.

    dask_address: run the scene tasks on the Dask cluster whose scheduler is there.
    dask_resources: what each scene task asks of a Dask worker, e.g. {"GPU": 1}.
    storage_options: fsspec options of a store URL (endpoint_url, region_name, ...), never
    credentials: those come from the environment (AWS_ACCESS_KEY_ID, ...), on every worker.
    Returns the run summary (feature set id, per-scene reports, failures, frames/s, bytes,
    which worker ran how many scenes). Raises ExtractionFailed after all scenes ran when any
    scene failed.
    """
    logger = get_run_logger()
    start = time.perf_counter()
    check_storage_options(storage_options)
    # fails fast on a read-only path, before the model
    feature_store = open_store(store, mode="a", storage_options=storage_options)
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
    if dask_address and dask_resources:
        check_dask_resources(dask_address, dask_resources)  # else the tasks would wait forever
    runner = make_task_runner(task_runner, workers, dask_address)
    results = _extract_scenes.with_options(task_runner=runner)(
        scene_dirs, resources=dask_resources, dataset=dataset, store_url=store,
        encoder_json=encoder_json, featureset=featureset, stride=stride, batch_size=batch_size,
        storage_options=storage_options,
    )
    done = [r for r in results if isinstance(r, dict)]
    workers_used: dict[str, dict[str, int]] = {}
    for result in done:
        worker = workers_used.setdefault(result.pop("worker"), {"scenes": 0, "model_loads": 0})
        worker["scenes"] += 1
        worker["model_loads"] = max(worker["model_loads"], result.pop("model_loads"))
    reports = [SceneReport(**r) for r in done]
    failures = [r for r in results if isinstance(r, str)]
    summary = _summary(feature_store, featureset, reports, failures, workers_used,
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


def _summary(store, featureset, reports, failures, workers, *, extraction_seconds,
             seconds) -> dict[str, Any]:
    """frames_per_second is over the wall time of the scene tasks, all scenes together.
    workers: "host:pid" -> {"scenes": run there, "model_loads": models that process loaded}."""
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
        "workers": workers,
    }


def _summary_markdown(summary: dict[str, Any]) -> str:
    rows = "\n".join(
        f"| {sid} | {s['frames']} | {s['encoded']} | {s['already_done']} | {len(s['invalid'])} |"
        for sid, s in summary["scenes"].items()
    )
    failed = "\n".join(f"- {failure}" for failure in summary["failed"]) or "none"
    workers = "\n".join(f"- {name}: {w['scenes']} scenes, {w['model_loads']} model load(s)"
                        for name, w in summary["workers"].items()) or "none"
    return (
        f"# extract-clip\n\nStore `{summary['store']}`, feature set `{summary['featureset']}`.\n\n"
        f"| scene | frames | encoded | already done | invalid |\n|---|---|---|---|---|\n{rows}\n\n"
        f"{summary['frames_encoded']} frames encoded at {summary['frames_per_second']:.1f} frames/s, "
        f"{summary['frames_invalid']} invalid; store {summary['bytes'] / 1e6:.1f} MB.\n\n"
        f"Failed scenes: {failed}\n\nWorkers:\n{workers}\n"
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
    parser.add_argument("--task-runner", choices=["threads", "dask"], default="threads",
                        help="threads in this process (default), or dask: a LocalCluster of "
                        "--workers processes")
    parser.add_argument("--workers", type=int, default=2,
                        help="scenes processed at once: threads, or LocalCluster workers (default 2)")
    parser.add_argument("--dask-address", default=None,
                        help="run the scene tasks on an existing Dask cluster, its scheduler's "
                        "address such as tcp://10.0.0.5:8786 (implies --task-runner dask)")
    parser.add_argument("--dask-resources", default=None, type=_resources,
                        help="worker resources each scene task needs, e.g. GPU=1 for workers "
                        "started with `dask worker ... --resources GPU=1` (one scene per GPU)")
    add_storage_options_argument(parser)
    return parser


def _resources(text: str) -> dict[str, float]:
    """`GPU=1,MEM=8e9` -> {"GPU": 1.0, "MEM": 8e9}."""
    try:
        return {name.strip(): float(value) for name, value in
                (part.split("=") for part in text.split(",") if part.strip())}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=AMOUNT[,NAME=AMOUNT]") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scenes = args.scenes[0] if args.scenes and len(args.scenes) == 1 and "*" in args.scenes[0] else args.scenes
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        storage_options = parse_storage_options(args.storage_options)  # before Prefect logs them
        summary = extract_clip(
            root=args.root, store=args.store, dataset=args.dataset, scenes=scenes,
            stride=args.stride, model=args.model, pretrained=args.pretrained,
            image_size=args.image_size, resize=args.resize, spatial_kind=args.spatial_kind,
            batch_size=args.batch_size, device=args.device, task_runner=args.task_runner,
            workers=args.workers, dask_address=args.dask_address,
            dask_resources=args.dask_resources, storage_options=storage_options,
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
