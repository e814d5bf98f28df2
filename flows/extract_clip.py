"""Stage 1 as a Prefect flow, `extract-clip`: a frozen image encoder over every frame into the store.

Run it directly (Prefect's ephemeral API, no server)::

    python -m flows.extract_clip --root /data/scannet --dataset scannet \
        --store storage/scannet.zarr --model ViT-B-16 --pretrained openai

or as a deployment on a Prefect server (`python -m flows.serve`, then
`prefect deployment run 'extract-clip/local' --param root=... --param store=...`).

The flow reads as a table of contents; the work is in pipeline.extraction. One task per
scene, retried only on errors a retry may heal (network, a flaky file system: `is_transient`);
a scene that cannot be read fails alone, the others finish, and the run fails at the end
naming it. The store's `done` masks make every run resumable: frames already done are never
encoded again, and frames whose chunks are missing (or, with --verify, corrupt) are redone.
"""

# No `from __future__ import annotations`: Prefect validates parameters with pydantic from the
# real annotations, and a served deployment loads this file where string annotations do not resolve.
import argparse
import contextlib
import dataclasses
import errno
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.context import FlowRunContext
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner
from tqdm.auto import tqdm

from cli.arguments import add_dataclass_arguments, dataclass_signature
from cli.errors import UserError
from cli.run import run_command
from flows.parameters import (ExtractParameters, check_numbers,  # noqa: F401
                              check_parameters, flag_names, name)
from pipeline.devices import claim_gpu
from pipeline.encoders import build_encoder
from pipeline.encoders.base import EncoderConfig, ImageEncoder
from pipeline.extraction import SceneReport, extract_scene
from pipeline.readers import SCENE_READERS
from pipeline.readers.discovery import list_scenes, not_scenes
from storage.chunks import reaching
from storage.errors import StoreUnreachable
from storage.inspect import featureset_sizes, format_bytes
from storage.options import check_storage_options, parse_storage_options
from storage.store import FeatureStore, open_store


class ExtractionFailed(UserError):
    """Some scenes failed; everything else is in the store."""


_encoder_lock = threading.Lock()


def _encoder(config_json: str) -> ImageEncoder:
    """The process's encoder of this configuration, built once even when threads ask at once."""
    with _encoder_lock:
        return _build_encoder(config_json)


@functools.lru_cache(maxsize=2)
def _build_encoder(config_json: str) -> ImageEncoder:
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
    return build_encoder(config)


def _in_dask_worker() -> bool:
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return False
    return True


_TRANSIENT_ERRNOS = {errno.EIO, errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.ETIMEDOUT,
                     errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ENETDOWN,
                     errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESTALE, errno.EREMOTEIO}
"""OS errors of a network or shared file system that a retry may not see again."""


def is_transient(error: BaseException) -> bool:
    """Whether a retry may heal `error`: an unreachable store, a dropped connection, a timeout,
    an I/O error of a (network) file system. Not: user errors (a missing mesh, a bad number),
    a file that cannot be read for good (ENOENT, EACCES, ELOOP), programming errors."""
    if isinstance(error, StoreUnreachable):
        return True
    if isinstance(error, UserError):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    if isinstance(error, OSError):
        return error.errno in _TRANSIENT_ERRNOS
    return type(error).__name__ in {"EndpointConnectionError", "ConnectTimeoutError",
                                    "ReadTimeoutError", "ConnectionClosedError",
                                    "ClientConnectionError", "ClientConnectorError",
                                    "ServerDisconnectedError", "ServerTimeoutError"}


def _worth_retrying(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a scene task only on a transient error."""
    try:
        state.result()
    except Exception as error:
        return is_transient(error)
    return False


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_worth_retrying,
      task_run_name="extract {scene_dir}")
def extract_scene_task(
    scene_dir: str, dataset: str, store_url: str, encoder_json: str, featureset: str,
    stride: int, batch_size: int, storage_options: dict[str, Any] | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Encode one scene's frames that are not done yet; returns its SceneReport as a dict,
    with the process that ran it ("worker": host:pid) and how many models that process has
    loaded so far ("model_loads": 1 on every worker, however many scenes it runs)."""
    scene = SCENE_READERS[dataset].open(Path(scene_dir))
    store = open_store(store_url, mode="a", storage_options=storage_options)
    encoder = _encoder(encoder_json)
    artifact = create_progress_artifact(0.0, description=f"{scene.scene_id}: frames encoded")
    bars: list[tqdm] = []  # made at the first report, when the scene's frame count is known

    def on_progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=scene.scene_id, unit="frame", leave=False))
        bars[0].n = done
        bars[0].refresh()
        update_progress_artifact(artifact, 100.0 * done / total)

    try:
        report = extract_scene(scene, store, encoder, featureset, stride=stride,
                               batch_size=batch_size, on_progress=on_progress, verify=verify)
    finally:
        for bar in bars:
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


@contextlib.contextmanager
def quiet_dask_logs() -> Iterator[None]:
    """While the context runs: keep Dask's warnings and errors, drop its INFO lines (nannies
    starting, plugins, comms closing at shutdown; one of these carries a harmless
    CommClosedError traceback when a worker leaves first), in this process and in the worker
    processes a LocalCluster spawns meanwhile, which read DASK_LOGGING__DISTRIBUTED. A user who
    set that variable keeps their level; both are restored afterwards."""
    saved = os.environ.get("DASK_LOGGING__DISTRIBUTED")
    logger = logging.getLogger("distributed")
    level = logger.level
    os.environ["DASK_LOGGING__DISTRIBUTED"] = saved or "warning"
    logger.setLevel(os.environ["DASK_LOGGING__DISTRIBUTED"].upper())
    try:
        yield
    finally:
        logger.setLevel(level)
        if saved is None:
            os.environ.pop("DASK_LOGGING__DISTRIBUTED", None)


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
                        f"`dask worker {address} --resources {wanted}` or drop "
                        f"{name('dask_resources')}")


def flow_api_settings():
    """A context in which Prefect hands this flow's API URL to every task it sends to Dask.

    A Dask worker is another process: without the URL, each worker running a Prefect task
    starts a temporary Prefect server of its own (which outlives the worker) and reports
    there. With it, task runs, logs and artifacts land in the flow's API: the ephemeral
    server of `python -m flows.extract_clip` (on 127.0.0.1, so workers on this machine), or
    the server PREFECT_API_URL names (what workers on other machines need)."""
    url = str(FlowRunContext.get().client.api_url).rstrip("/")
    return temporary_settings(updates={PREFECT_API_URL: url})


def dask_annotations(resources: dict[str, float] | None):
    """A context in which Dask submissions ask for `resources` (no-op without)."""
    if not resources:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources=resources)


def extract_clip(**parameters: Any) -> dict[str, Any]:
    """Run the frozen encoder over every frame of every selected scene into the store.

    parameters: those of flows.parameters.ExtractParameters, by name (the flow's signature is
    generated from it, below). Relative paths (root, store) resolve against the working directory of the process that
    runs the flow: for a deployment, the folder `python -m flows.serve` was started in.
    dask_address: run the scene tasks on the Dask cluster whose scheduler is there.
    dask_resources: what each scene task asks of a Dask worker, e.g. {"GPU": 1}.
    storage_options: non-secret fsspec options of a store URL (endpoint_url,
    client_kwargs.region_name, ...), never credentials: those come from the environment
    (AWS_ACCESS_KEY_ID, ...), on every worker.
    decode: scaled decodes each JPEG at the smallest DCT scale at least the model input (about 4x
    faster than the whole frame; the model input differs from the full decode's by under 1%),
    full decodes it whole; the feature set records which (a different id).
    verify: read every stored chunk of the selected scenes back and redo the frames whose
    chunks are corrupt (without it, a run redoes the frames whose chunks are missing).
    Returns the run summary (feature set id, per-scene reports, failures, frames/s, bytes,
    which worker ran how many scenes). An expected failure (bad parameters, failed scenes)
    ends the run Failed with the one-line reason as its state message (what `prefect
    deployment run --watch` and the UI show) and raises that UserError to a Python caller;
    ExtractionFailed, after all scenes ran, when any scene failed.
    """
    try:
        return _extract_clip(ExtractParameters(**parameters))
    except UserError as error:  # Prefect logs "Finished in state Failed('<reason>')", no traceback
        announce_failure(str(error))
        return Failed(message=str(error), data=error)


def announce_failure(reason: str) -> None:
    """Emit an event `extract-clip.failed` whose name is the reason, tied to this flow run,
    before the run turns Failed. `prefect deployment run --watch` prints a run's events (its
    logs only where the server streams them out), so it shows the reason; so does the UI, with
    the Failed state's message."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    run = FlowRunContext.get().flow_run
    emit_event(event="extract-clip.failed",
               resource={"prefect.resource.id": f"extract-clip.failure.{run.id}",
                         "prefect.resource.name": reason},
               related=[{"prefect.resource.id": f"prefect.flow-run.{run.id}",
                         "prefect.resource.role": "flow-run", "prefect.resource.name": run.name}])
    EventsWorker.instance().wait_until_empty()  # sent before the state that ends the watch


def _extract_clip(p: ExtractParameters) -> dict[str, Any]:
    """The flow's body (see extract_clip); raises UserError for expected failures."""
    check_parameters(dataclasses.asdict(p))  # again: a deployment run reaches the flow unchecked
    logger = get_run_logger()
    start = time.perf_counter()
    check_storage_options(p.storage_options)
    reader = SCENE_READERS[p.dataset]
    scene_dirs = [str(path) for path in list_scenes(Path(p.root), p.scenes, reader)]
    skipped = not_scenes(Path(p.root), p.scenes, reader)
    for folder, why in skipped.items():
        logger.warning("%s under %s is not a scene (%s): skipped", folder, p.root, why)
    if not scene_dirs:  # scenes="x*" matching none of the scenes check_parameters found
        folders = "; ".join(f"{folder}: {why}" for folder, why in skipped.items())
        raise UserError(f"no scenes under {p.root} match {p.scenes or 'any'}"
                        f"{f' (folders that are no scene: {folders})' if folders else ''}: "
                        f"check {name('root')} and {name('scenes')}")
    if p.dask_address and p.dask_resources:
        check_dask_resources(p.dask_address, p.dask_resources)  # else tasks would wait forever
    encoder_config = p.encoder_config()
    encoder_json = json.dumps(encoder_config.__dict__, sort_keys=True)
    spec = _encoder(encoder_json).describe()  # the model loads before a store exists
    created = not _store_exists(p.store, p.storage_options)
    feature_store = open_store(p.store, mode="a", storage_options=p.storage_options)
    featureset = feature_store.register_featureset(spec)
    logger.info("feature set %s: %d scenes from %s into %s", featureset, len(scene_dirs), p.root,
                p.store)
    extraction_start = time.perf_counter()
    runner = make_task_runner(p.task_runner, p.workers, p.dask_address)
    dask = not isinstance(runner, ThreadPoolTaskRunner)
    with flow_api_settings() if dask else contextlib.nullcontext(), \
            quiet_dask_logs() if dask else contextlib.nullcontext():
        results = _extract_scenes.with_options(task_runner=runner)(
            scene_dirs, resources=p.dask_resources, dataset=p.dataset, store_url=p.store,
            encoder_json=encoder_json, featureset=featureset, stride=p.stride,
            batch_size=p.batch_size, storage_options=p.storage_options, verify=p.verify,
        )
    done = [r for r in results if isinstance(r, dict)]
    workers_used: dict[str, dict[str, int]] = {}
    for result in done:
        worker = workers_used.setdefault(result.pop("worker"), {"scenes": 0, "model_loads": 0})
        worker["scenes"] += 1
        worker["model_loads"] = max(worker["model_loads"], result.pop("model_loads"))
    reports = [SceneReport(**r) for r in done]
    failures = [r for r in results if isinstance(r, str)]
    if failures and created and _remove_if_empty(feature_store, p.storage_options):
        raise ExtractionFailed(f"all {len(scene_dirs)} scenes failed and {p.store}, which this "
                               "run created, was removed again: " + "; ".join(failures))
    try:  # readers then open the store with one request (storage.store, "consolidated")
        feature_store.consolidate()
    except (OSError, StoreUnreachable) as error:  # nothing lost: readers read every zarr.json
        logger.warning("could not consolidate the metadata of %s (%s); readers open it "
                       "without them, more slowly", p.store, error)
    summary = _summary(feature_store, featureset, reports, failures, workers_used,
                       extraction_seconds=time.perf_counter() - extraction_start,
                       seconds=time.perf_counter() - start)
    summary["skipped_folders"] = skipped
    create_markdown_artifact(_summary_markdown(summary), key="extract-clip-summary",
                             description="extract-clip: scenes, frames, throughput, feature bytes")
    if failures:
        raise ExtractionFailed(f"{len(failures)} of {len(scene_dirs)} scenes failed (the others "
                               f"are stored in {p.store}): " + "; ".join(failures))
    return summary


extract_clip.__signature__ = dataclass_signature(ExtractParameters, dict[str, Any])
extract_clip.__annotations__ = {name: parameter.annotation for name, parameter
                                in extract_clip.__signature__.parameters.items()}
extract_clip.__annotations__["return"] = dict[str, Any]
extract_clip = flow(name="extract-clip")(extract_clip)


def _store_exists(url: str, storage_options: dict[str, Any] | None) -> bool:
    import fsspec

    options = (storage_options or {}) if "://" in url else {}
    with reaching(url, storage_options):  # an unreachable server is one line naming it
        fs, path = fsspec.core.url_to_fs(url, **options)
        return fs.exists(f"{path.rstrip('/')}/zarr.json")


def _remove_if_empty(store: FeatureStore, storage_options: dict[str, Any] | None) -> bool:
    """Remove a store that holds no scene at all (not even one another run is creating);
    returns whether it did. Only for a store this run created: a failed first run leaves
    nothing behind."""
    if "scenes" in store.root:
        return False
    import fsspec

    options = (storage_options or {}) if "://" in store.url else {}
    fs, path = fsspec.core.url_to_fs(store.url, **options)
    fs.rm(path, recursive=True)
    return True


def _summary(store, featureset, reports, failures, workers, *, extraction_seconds,
             seconds) -> dict[str, Any]:
    """frames_per_second is over the wall time of the scene tasks, all scenes together.
    workers: "host:pid" -> {"scenes": run there, "model_loads": models that process loaded}."""
    encoded = sum(r.encoded for r in reports)
    return {
        "store": store.url,
        "featureset": featureset,
        "scenes": {r.scene_id: {"frames": r.frames, "encoded": r.encoded,
                                "already_done": r.already_done, "invalid": r.invalid,
                                "repaired": r.repaired, "clamped": r.clamped,
                                "ignored_files": r.ignored_files}
                   for r in reports},
        "failed": failures,
        "frames_encoded": encoded,
        "frames_invalid": sum(len(r.invalid) for r in reports),
        "frames_repaired": sum(r.repaired for r in reports),
        "values_clamped": sum(r.clamped for r in reports),
        "frames_per_second": encoded / extraction_seconds,
        "seconds": seconds,
        # this feature set's arrays in these scenes: their metadata only, no listing of the store
        "bytes": featureset_sizes(store, [r.scene_id for r in reports],
                                  [featureset])[featureset]["bytes"],
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
    ignored = "\n".join(f"- {sid}/{path}: {why}" for sid, s in summary["scenes"].items()
                        for path, why in s["ignored_files"].items()) or "none"
    skipped = "\n".join(f"- {name}: {why}" for name, why in
                        summary.get("skipped_folders", {}).items()) or "none"
    return (
        f"# extract-clip\n\nStore `{summary['store']}`, feature set `{summary['featureset']}`.\n\n"
        f"| scene | frames | encoded | already done | invalid |\n|---|---|---|---|---|\n{rows}\n\n"
        f"{summary['frames_encoded']} frames encoded at {summary['frames_per_second']:.1f} frames/s, "
        f"{summary['frames_invalid']} invalid, {summary['frames_repaired']} redone (missing or "
        f"corrupt chunks); {summary['values_clamped']} feature values clamped to float16's range; "
        f"features {format_bytes(summary['bytes'])}.\n\n"
        f"Failed scenes: {failed}\n\nIgnored files:\n{ignored}\n\n"
        f"Folders that are no scene:\n{skipped}\n\nWorkers:\n{workers}\n"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.extract_clip",
        description="Stage 1: run a frozen image encoder (CLIP by default) over every RGB frame "
        "of every scene and write spatial and global features to a Zarr store (resumable: "
        "frames already done are skipped).",
    )
    add_dataclass_arguments(parser, ExtractParameters)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def extract_command() -> None:
        with flag_names():  # messages say --root, not root
            # storage options are checked before Prefect logs them
            options = parse_storage_options(args.storage_options)
            parameters = ExtractParameters(**{**vars(args), "storage_options": options})
            # before Prefect starts and before any store exists
            check_parameters(dataclasses.asdict(parameters))
            summary = extract_clip(**dataclasses.asdict(parameters))
        print(f"stored {summary['frames_encoded']} frames ({summary['frames_invalid']} invalid) "
              f"of {len(summary['scenes'])} scenes at {summary['frames_per_second']:.1f} "
              f"frames/s into {summary['store']} ({format_bytes(summary['bytes'])}), "
              f"feature set {summary['featureset']}")
        if len(summary["workers"]) > 1:
            print("workers: " + "; ".join(f"{worker} {w['scenes']} scene(s), {w['model_loads']} "
                                          "model load(s)"
                                          for worker, w in summary["workers"].items()))

    return run_command(extract_command)


if __name__ == "__main__":
    # Call the imported module, not this `__main__` copy of it: Dask sends tasks to its
    # workers by reference (module and name), and `__main__` names another module there.
    from flows.extract_clip import main as module_main

    sys.exit(module_main())
