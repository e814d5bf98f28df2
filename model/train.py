"""Stage 2: `python -m model.train --cache storage/` trains the fusion model on cached features.

The run reads as: pick stores, feature set and scenes (model.sources); build the model from
the feature set's widths; then per epoch, train steps over shuffled batches of projected scenes
(model.dataset), an evaluation on the validation scenes, a line in metrics.jsonl, TensorBoard
scalars, curves.png and a checkpoint. Ctrl-C saves a checkpoint at the current step; `--resume`
continues from any checkpoint exactly (same batches, same augmentation, same numbers), in the
folder the user points at, after checking that the store, feature set and scenes still match.

Checkpoints hold tensors and plain data only (numbers, strings, lists, dicts) and are loaded
with `torch.load(weights_only=True)`: a checkpoint can never run code.

Never imports open_clip: CLIP features are constants from the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from model.batch import PointBatch
from model.checkpoint import (build_model, fitting, load_checkpoint, loss_config, restore_config,
                              save_checkpoint)
from model.config import TrainConfig, parse_config
from model.dataset import AugmentConfig, CachedScenes, ProjectionConfig, collate
from model.distributed import Distributed
from model.network.losses import (LOSS_TERMS, LossConfig, clip_weight_schedule, compute_losses,
                          finite_or_skip, rebalance_for_global_mean)
from model.evaluate import evaluate
from model.network.instance import ClusterConfig
from model.metrics import confusion_matrix, mean_iou
from model.report import format_summary, plot_curves
from model.sources import discover_stores, scene_sources, split_scenes
from pipeline.devices import resolve_device
from cli.errors import UserError
from cli.run import run_command
from storage.errors import StoreError
from storage.featureset import FeatureSetSpec
from storage.selection import choose_featureset
from storage.store import parse_storage_options

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 30

GRADIENT_GROUPS = {
    "backbone_3d": ("backbone.", "proj_3d."),
    "proj_2d": ("proj_2d.",),
    "gate": ("gate_mlp.",),
    "heads": ("heads.",),
    "clip_head": ("clip_proj.",),
}
"""Module groups whose gradient norms training logs (parameter-name prefixes of FusionModel):
the 3D backbone with its projection, the 2D projection, the fusion gate, the semantic and
instance heads, and the CLIP head that the CLIP consistency loss reaches first."""

def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Step -> learning-rate factor: linear warm-up, then cosine to 0.01 or poly (power 0.9)."""

    warmup_steps = min(warmup_steps, total_steps // 10)  # short runs warm up for 10% of steps

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "cosine":
            return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
        return (1 - progress) ** 0.9

    return factor


def train_step(
    model: nn.Module, batch: PointBatch, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler, epoch: int, loss_config: LossConfig, *,
    grad_clip: float, amp: bool, distributed: Distributed = Distributed(),
) -> tuple[dict[str, float], torch.Tensor] | None:
    """One optimisation step; returns (loss terms as floats, (P, K) detached logits), or None
    when the loss was not finite and the step was skipped (weights untouched).

    Under DDP (`model` wrapped, `batch` this process's share) every process takes the same
    decision to step or skip, and the loss is rebalanced to the mean over the global batch."""
    model.train()
    with torch.autocast(batch.device.type, dtype=torch.float16, enabled=amp):
        output = model(batch)
    losses = compute_losses(output, batch, epoch, loss_config)
    if distributed.enabled:
        losses = rebalance_for_global_mean(losses, distributed.sum(losses["counts"]),
                                           distributed.world_size, epoch, loss_config)
    optimizer.zero_grad(set_to_none=True)
    if not distributed.all(finite_or_skip(losses["total"])):
        return None
    scaler.scale(losses["total"]).backward()
    scaler.unscale_(optimizer)  # true gradients, for their norms and for clipping
    norms = gradient_norms(model)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    terms = {name: float(losses[name].detach()) for name in LOSS_TERMS}
    terms.update({f"grad_norm/{group}": value for group, value in norms.items()})
    return terms, output.semantic_logits.detach()


def gradient_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of the gradient of each GRADIENT_GROUPS group (before clipping), as floats; a
    group without parameters or gradients (the 3D-only model has no gate) is left out. One
    device synchronisation. Under DDP the gradients are already averaged over processes."""
    module = getattr(model, "module", model)  # DistributedDataParallel wraps the model
    squares: dict[str, list[torch.Tensor]] = {}
    for name, parameter in module.named_parameters():
        group = next((g for g, prefixes in GRADIENT_GROUPS.items() if name.startswith(prefixes)),
                     None)
        if group is not None and parameter.grad is not None:
            squares.setdefault(group, []).append(parameter.grad.detach().float().square().sum())
    if not squares:
        return {}
    norms = torch.stack([torch.stack(parts).sum() for parts in squares.values()]).sqrt()
    return dict(zip(squares, norms.tolist()))


def summarise_gradient_norms(steps: list[dict[str, float]]) -> dict[str, dict[str, float | int]]:
    """Per group, over an epoch's steps: median, 90th and 99th percentile and maximum of the
    finite norms, and how many steps had a non-finite norm (AMP's loss scaler skips those)."""
    summary: dict[str, dict[str, float | int]] = {}
    for group in dict.fromkeys(key for step in steps for key in step):
        values = np.array([step[group] for step in steps if group in step], dtype=np.float64)
        finite = values[np.isfinite(values)]
        figures: dict[str, float | int] = {"nonfinite": int((~np.isfinite(values)).sum())}
        if finite.size:
            p50, p90, p99 = np.percentile(finite, [50, 90, 99])
            figures.update(p50=float(p50), p90=float(p90), p99=float(p99), max=float(finite.max()))
        summary[group] = figures
    return summary


@dataclass
class EpochState:
    """Where a run stands inside an epoch: all a checkpoint needs to continue it exactly."""

    epoch: int = 0
    step: int = 0  # batches of `epoch` already done
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    steps_done: int = 0
    skipped: int = 0
    confusion: torch.Tensor | None = None
    grad_norms: list[dict[str, float]] = field(default_factory=list)  # per step, by group


class Trainer:
    """Owns the model, optimiser, data and run folder of one training run."""

    def __init__(self, config: TrainConfig):
        checkpoint, checkpoint_path = (load_checkpoint(config.resume) if config.resume
                                       else (None, None))
        if checkpoint is not None:
            # the resumed run's settings win, except where to read the stores from and where to
            # write (the folder given: --out, or the one of --resume, never the folder recorded
            # in the checkpoint, which may be another copy of the run), the device and, if
            # given, a new number of epochs (which stretches the learning-rate schedule)
            with fitting(checkpoint_path):
                saved = restore_config(checkpoint["config"])
            config = dataclasses.replace(saved, cache=config.cache, resume=config.resume,
                                         storage_options=(config.storage_options
                                                          or saved.storage_options),
                                         epochs=config.epochs or saved.epochs,
                                         device=config.device,
                                         out=config.out or str(_run_folder_of(Path(config.resume))),
                                         allow_different_store=config.allow_different_store)
        elif config.epochs is None:
            config = dataclasses.replace(config, epochs=DEFAULT_EPOCHS)
        self.config = config
        self.distributed = Distributed.from_environment(resolve_device(config.device))
        self.device = self.distributed.device
        if config.batch_scenes % self.distributed.world_size:
            fix = (f"resume it on a number of processes that divides {config.batch_scenes}"
                   if checkpoint is not None else
                   f"pass a multiple of {self.distributed.world_size} (it is the global batch)")
            raise UserError(f"--batch-scenes {config.batch_scenes} does not split across "
                            f"{self.distributed.world_size} processes: {fix}")
        self.amp = self.device.type == "cuda" if config.amp is None else config.amp
        if self.amp and self.device.type != "cuda":
            raise UserError("--amp needs a CUDA device (float16 autocast on a CPU is slow and "
                            "unscaled); drop --amp or use --device cuda")
        _seed_everything(config.seed)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True, warn_only=True)
        stores = discover_stores(config.cache, parse_storage_options(config.storage_options))
        try:
            self.featureset, self.spec = choose_featureset(
                stores, checkpoint["featureset"] if checkpoint else config.featureset)
        except StoreError as error:
            if checkpoint is None:
                raise
            trained_on = FeatureSetSpec.from_attrs(checkpoint["featureset_description"]).describe(
                checkpoint["featureset"])
            raise UserError(
                f"cannot use {checkpoint_path}: its run trained on feature set {trained_on}, "
                f"which --cache {config.cache} does not hold ({error}); point --cache at the "
                "run's store") from None
        # rank 0 decides which scenes are finished (a store still being written could otherwise
        # give the processes different scene lists, and so different step counts)
        chosen = self.distributed.broadcast(
            lambda: {s: stores.index(store) for s, store in
                     scene_sources(stores, self.featureset).items()})
        sources = {scene_id: stores[index] for scene_id, index in chosen.items()}
        resumed = checkpoint.get("data") if checkpoint is not None else None
        if resumed is not None:
            check_same_data(resumed, sources, checkpoint_path, config)
        if resumed is not None and set(resumed["train"] + resumed["val"]) <= set(sources):
            self.train_ids, self.val_ids = list(resumed["train"]), list(resumed["val"])
        else:
            if checkpoint is not None:
                log.warning("%s records no scene split (written by an older version): the split "
                            "is recomputed and the store cannot be checked", checkpoint_path)
            self.train_ids, self.val_ids = split_scenes(list(sources), config.val_list,
                                                        config.val_fraction, config.seed)
        self.data = data_identity(sources, self.train_ids, self.val_ids)
        if self.spec.random_weights:
            warnings.warn(f"feature set {self.featureset} ({self.spec.model}) was "
                          "extracted with RANDOM encoder weights: its features carry no meaning; "
                          "fine for plumbing, not for results", stacklevel=2)
        self.scenes = CachedScenes(
            sources, self.featureset, self.device,
            ProjectionConfig(config.depth_threshold, config.relative_threshold),
            cache_bytes=config.scene_cache_gb * 1e9)
        with fitting(checkpoint_path) if checkpoint is not None else contextlib.nullcontext():
            self.model = build_model(config, self.spec).to(self.device)
        self.net = self._wrap_for_ddp()  # what train steps call: the model, or DDP around it
        self.loss_config = loss_config(config, self.spec)
        if (config.clip_loss == "contrastive" and self.distributed.is_main
                and config.batch_scenes // self.distributed.world_size < 2):
            log.warning("--clip-loss contrastive takes its negatives from the other scenes a "
                        "process holds in a step, and each holds one (--batch-scenes %d over %d "
                        "processes): the CLIP term has no negatives", config.batch_scenes,
                        self.distributed.world_size)
        self.cluster = ClusterConfig(config.cluster_radius, config.min_instance_points)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.steps_per_epoch = len(self._batches(0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            config.schedule, config.warmup_steps, config.epochs * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.state = EpochState()
        self.history: list[dict[str, Any]] = []
        self._writer = None  # TensorBoard, on rank 0 while fit() runs
        if checkpoint is not None:
            with fitting(checkpoint_path):
                self._restore(checkpoint)
        self.out = Path(config.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")

    def _wrap_for_ddp(self) -> nn.Module:
        """DDP around the model when torchrun started several processes; else the model."""
        if not self.distributed.enabled:
            return self.model
        if self.device.type == "cuda":  # one set of BatchNorm statistics over the global batch
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        elif self.config.norm == "batch" and self.distributed.is_main:
            log.warning("BatchNorm statistics are per process on CPUs (SyncBatchNorm needs CUDA): "
                        "the run differs slightly from one process; --norm layer does not")
        # every parameter gets a gradient each step (the losses keep even a 0-weighted CLIP
        # term and an empty offset term in the graph), so DDP need not search for unused ones
        return nn.parallel.DistributedDataParallel(self.model)

    def _gather_partial_epoch(self) -> None:
        """Before an interrupted DDP run saves: rank 0's epoch state takes every process's
        loss sums, step count and confusion so far (the others then start from zero)."""
        if not self.distributed.enabled:
            return
        state = self.state
        totals = self.distributed.sum(torch.tensor(
            [state.sums[name] for name in LOSS_TERMS] + [state.steps_done], dtype=torch.float64))
        confusion = self.distributed.sum(state.confusion)
        if self.distributed.is_main:
            state.sums = {name: float(totals[i]) for i, name in enumerate(LOSS_TERMS)}
            state.steps_done, state.confusion = int(totals[-1]), confusion

    def _batches(self, epoch: int) -> list[list[str]]:
        """The global batches of scene ids of one epoch (see `_epoch_batches`)."""
        return _epoch_batches(self.train_ids, self.config.seed, epoch, self.config.batch_scenes,
                              self.distributed.world_size)

    # ------------------------------------------------------------------ the loop

    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns one metrics record per epoch of the run (rank 0;
        the other processes of a DDP run return the history they resumed from)."""
        from torch.utils.tensorboard import SummaryWriter

        config, main = self.config, self.distributed.is_main
        if main:
            (self.out / "checkpoints").mkdir(parents=True, exist_ok=True)
            _write_history(self.out / "metrics.jsonl", self.history)  # a resumed run's, truncated
        log.info("training on %d scenes, validating on %d, feature set %s, %s%s%s; run folder %s",
                 len(self.train_ids), len(self.val_ids), self.featureset, self.device,
                 " with AMP" if self.amp else "",
                 f" x {self.distributed.world_size} processes" if self.distributed.enabled else "",
                 self.out)
        if self.state.epoch >= config.epochs:
            log.info("%s has trained its %d epochs already: pass a larger --epochs to train on",
                     config.resume or self.out, config.epochs)
        elif self.state.epoch or self.state.step:
            log.info("resuming %s at epoch %d, step %d", config.resume, self.state.epoch + 1,
                     self.state.step)
        writer = SummaryWriter(str(self.out / "tensorboard")) if main else contextlib.nullcontext()
        with writer, _StopOnCtrlC() as stop:
            self._stop = stop
            self._writer = writer if main else None
            try:
                while self.state.epoch < config.epochs:
                    record = self._run_epoch()
                    self.state = EpochState(epoch=self.state.epoch + 1)
                    if not main:
                        continue
                    self.history.append(record)
                    _write_history(self.out / "metrics.jsonl", self.history)
                    _log_scalars(writer, record)
                    if config.plot:
                        plot_curves(self.history, self.out / "curves.png")
                    self.save("last.pt")
                    if record["val"]["miou"] >= max(r["val"]["miou"] for r in self.history):
                        self.save("best.pt")
            except _Stopped:
                path = self.save("interrupted.pt") if main else None
                self.distributed.barrier()  # the others exit once the checkpoint is whole
                if main:
                    launcher = (f"torchrun --nproc_per_node {self.distributed.world_size}"
                                if self.distributed.enabled else "python")
                    log.warning("interrupted at epoch %d step %d: resume with `%s -m model.train "
                                "--cache %s --resume %s`", self.state.epoch, self.state.step,
                                launcher, config.cache, path)
                raise KeyboardInterrupt from None
        return self.history

    def _run_epoch(self) -> dict[str, Any]:
        config, state, distributed = self.config, self.state, self.distributed
        epoch = state.epoch
        batches = self._batches(epoch)
        num_classes = self.model.config.num_classes
        if state.confusion is None:
            state.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        augmentation = AugmentConfig() if config.augment else None
        start = time.perf_counter()
        data_seconds = 0.0
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step",
                   initial=state.step, leave=False, disable=not distributed.is_main)
        # this process's scenes of each remaining batch, with their positions in the epoch
        todo = [distributed.shard(list(enumerate(batch, step * config.batch_scenes)))
                for step, batch in enumerate(batches) if step >= state.step]
        # closing(bar): an error mid-epoch clears the bar, so its one line starts a line
        with ThreadPoolExecutor(1, thread_name_prefix="scene-prefetch") as prefetch, \
                contextlib.closing(bar):
            load = lambda share: [self.scenes.get(scene_id) for _, scene_id in share]  # noqa: E731
            upcoming = prefetch.submit(load, todo[0]) if todo else None
            for index, share in enumerate(todo):
                waited = time.perf_counter()
                samples = upcoming.result()
                if index + 1 < len(todo):  # read and project the next scenes during this step
                    upcoming = prefetch.submit(load, todo[index + 1])
                generators = [_augment_generator(config.seed, epoch, position)
                              for position, _ in share]
                batch = collate(samples, augmentation, generators)
                data_seconds += time.perf_counter() - waited
                result = train_step(self.net, batch, self.optimizer, self.scaler, epoch,
                                    self.loss_config, grad_clip=config.grad_clip, amp=self.amp,
                                    distributed=distributed)
                self.scheduler.step()
                if result is None:
                    state.skipped += 1
                    log.warning("epoch %d: skipped a step with a non-finite loss (scenes %s)",
                                epoch, ", ".join(scene_id for _, scene_id in share))
                else:
                    losses, logits = result
                    for name in LOSS_TERMS:
                        state.sums[name] += losses[name]
                    norms = {key.split("/", 1)[1]: value for key, value in losses.items()
                             if key.startswith("grad_norm/")}
                    state.grad_norms.append(norms)
                    if self._writer is not None:  # each step's norms, as training goes
                        global_step = epoch * self.steps_per_epoch + state.step
                        for group, value in norms.items():
                            self._writer.add_scalar(f"grad_norm/{group}", value, global_step)
                    state.steps_done += 1
                    state.confusion += confusion_matrix(logits.argmax(1), batch.semantic,
                                                        num_classes).cpu()
                    bar.set_postfix(loss=f"{losses['total']:.3f}")
                state.step += 1
                bar.update()
                if distributed.any(self._stop.requested):
                    self._gather_partial_epoch()
                    raise _Stopped
        bar.close()
        seconds = time.perf_counter() - start
        # sums over processes: each process's terms average to the global batch's
        sums = distributed.sum(torch.tensor([state.sums[name] for name in LOSS_TERMS]
                                            + [state.steps_done], dtype=torch.float64))
        confusion = distributed.sum(state.confusion)
        train = {name: float(sums[i]) / max(1.0, float(sums[-1]))
                 for i, name in enumerate(LOSS_TERMS)}
        record = {
            "epoch": epoch + 1,
            "lr": self.optimizer.param_groups[0]["lr"],
            "clip_weight": clip_weight_schedule(epoch, self.loss_config.clip_schedule),
            "train": {**train, "miou": mean_iou(confusion)},
            "skipped_steps": state.skipped,
            "grad_norm": summarise_gradient_norms(state.grad_norms),
            "seconds": seconds,
            "data_wait_fraction": data_seconds / seconds if seconds > 0 else 0.0,
        }
        if not distributed.is_main:  # rank 0 validates alone
            return record
        record["val"] = val = evaluate(
            self.model, self.scenes, self.val_ids, epoch, self.loss_config, self.amp,
            self.cluster, min_region_size=config.min_region_size)
        log.info("epoch %d: train loss %.4f mIoU %.3f | val loss %.4f mIoU %.3f AP50 %.3f | %.1f s",
                 epoch + 1, train["total"], record["train"]["miou"], val["total"], val["miou"],
                 val.get("ap50", float("nan")), seconds)
        return record

    # ------------------------------------------------------------------ checkpoints

    def save(self, name: str) -> Path:
        """Model, optimiser, scheduler, scaler, epoch state, feature set id and spec,
        config and the data it trains on (stores, scenes, split): tensors and plain data only,
        so that `torch.load(weights_only=True)` reads it back."""
        state = dataclasses.asdict(self.state)
        return save_checkpoint(self.out / "checkpoints" / name, {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": state,
            "history": self.history,
            "featureset": self.featureset,
            "featureset_description": self.spec.to_attrs(),
            "config": dataclasses.asdict(self.config),
            "data": self.data,
        })

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        known = {f.name for f in dataclasses.fields(EpochState)}  # older checkpoints had more
        self.state = EpochState(**{k: v for k, v in checkpoint["state"].items() if k in known})
        self.state.sums = {**dict.fromkeys(LOSS_TERMS, 0.0), **self.state.sums}
        if not self.distributed.is_main:  # rank 0 carries the interrupted epoch's totals
            self.state.sums = dict.fromkeys(LOSS_TERMS, 0.0)
            self.state.steps_done, self.state.confusion = 0, None
        self.history = checkpoint["history"]


def data_identity(sources: dict[str, Any], train_ids: list[str],
                  val_ids: list[str]) -> dict[str, Any]:
    """What a run trains on, as a checkpoint records it: the split and, per scene, the store it
    came from (an absolute path or URL) with its frame and point counts."""
    scenes = {}
    for scene_id in sorted(set(train_ids) | set(val_ids)):
        store = sources[scene_id]
        scenes[scene_id] = {
            "store": _absolute(store.url),
            "frames": int(store.node(f"scenes/{scene_id}/frames/frame_id").shape[0]),
            "points": int(store.node(f"scenes/{scene_id}/points/xyz").shape[0]),
        }
    return {"train": list(train_ids), "val": list(val_ids), "scenes": scenes}


def check_same_data(recorded: dict[str, Any], sources: dict[str, Any], checkpoint: Path,
                    config: TrainConfig) -> None:
    """Raise a one-line UserError unless the scenes a resumed run trained on are all in the
    stores of --cache, with the same frames and points, in the same store (or
    --allow-different-store)."""
    scenes = recorded["train"] + recorded["val"]
    stores = sorted({entry["store"] for entry in recorded["scenes"].values()})
    missing = [scene_id for scene_id in scenes if scene_id not in sources]
    if missing:
        raise UserError(
            f"cannot resume {checkpoint}: {len(missing)} of the run's {len(scenes)} scenes are "
            f"not (finished) in --cache {config.cache} ({', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); the run read {', '.join(stores)}: point "
            "--cache there, or start a new run without --resume")
    now = data_identity(sources, recorded["train"], recorded["val"])["scenes"]
    for scene_id in scenes:
        before, after = recorded["scenes"][scene_id], now[scene_id]
        if (before["frames"], before["points"]) != (after["frames"], after["points"]):
            raise UserError(
                f"cannot resume {checkpoint}: scene {scene_id} had {before['frames']} frames and "
                f"{before['points']} points in {before['store']}, --cache gives "
                f"{after['frames']} and {after['points']} from {after['store']}: it is other data; "
                "point --cache at the run's store, or start a new run")
        if before["store"] != after["store"] and not config.allow_different_store:
            raise UserError(
                f"cannot resume {checkpoint}: its scenes came from {before['store']}, --cache "
                f"reads them from {after['store']}: point --cache at the run's store, or pass "
                "--allow-different-store to continue on this one (same feature set and scenes)")
    moved = sorted({now[s]["store"] for s in scenes} - set(stores))
    if moved:
        log.warning("continuing on %s instead of %s (--allow-different-store)",
                    ", ".join(moved), ", ".join(stores))


def _absolute(url: str) -> str:
    if "://" in url and not url.startswith("file://"):
        return url.rstrip("/")
    return str(Path(url.removeprefix("file://")).resolve())


class _Stopped(Exception):
    """Raised between two steps after Ctrl-C, so the checkpoint holds a whole step."""


class _StopOnCtrlC:
    """The first Ctrl-C (or SIGTERM, as torchrun, SLURM and Kubernetes send before they kill)
    asks the loop to stop after the current step and save; a second one aborts."""

    requested = False
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> _StopOnCtrlC:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr)


def _epoch_batches(train_ids: list[str], seed: int, epoch: int, batch_scenes: int,
                   world_size: int = 1) -> list[list[str]]:
    """The global batches of one epoch: the scenes in an order that depends only on (seed,
    epoch), cut into batches of `batch_scenes`. Under DDP the order is padded with its first
    scenes to a multiple of world_size (as torch's DistributedSampler does), so every process
    has a scene in every batch."""
    order = list(train_ids)
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    padding = -len(order) % world_size
    order += [order[i % len(order)] for i in range(padding)]
    return [order[i:i + batch_scenes] for i in range(0, len(order), batch_scenes)]


def _augment_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The random generator of the scene at `position` of an epoch's order: a scene's
    augmentation is the same whichever process or batch it lands in, and on resume."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 100_003 + position)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _run_folder_of(resume: Path) -> Path:
    return resume if resume.is_dir() else resume.parent.parent


def _write_history(path: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite metrics.jsonl whole, so a resumed run never repeats or loses an epoch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in history))


def _log_scalars(writer, record: dict[str, Any]) -> None:
    epoch = record["epoch"]
    for split in ("train", "val"):
        for name in (*LOSS_TERMS, "miou", "ap", "ap50", "ap25"):
            if name in record[split]:
                writer.add_scalar(f"{split}/{name}", record[split][name], epoch)
    writer.add_scalar("lr", record["lr"], epoch)
    writer.add_scalar("clip_weight", record["clip_weight"], epoch)
    for group, figures in record.get("grad_norm", {}).items():
        for name, value in figures.items():
            writer.add_scalar(f"grad_norm_epoch/{group}/{name}", value, epoch)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, the other processes only warn

    def train() -> int:
        trainer = None
        try:
            trainer = Trainer(config)
            history = trainer.fit()
            trainer.distributed.barrier()  # the others wait for rank 0's last validation and save
        except KeyboardInterrupt:
            return 130
        finally:
            if trainer is not None:
                trainer.distributed.close()
        if trainer.distributed.is_main:
            print(format_summary(history, trainer.out, trainer.featureset))
        return 0

    return run_command(train, level=logging.INFO if rank == 0 else logging.WARNING,
                       log_format=f"%(levelname)s {f'[rank {rank}] ' if rank else ''}%(name)s: "
                       "%(message)s")


if __name__ == "__main__":
    sys.exit(main())
