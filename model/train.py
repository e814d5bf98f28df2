"""Stage 2: `python -m model.train --cache storage/` trains the fusion model on cached features.

The run reads as: pick stores, feature set and scenes (model.sources); build the model from
the feature set's widths; then per epoch, train steps over shuffled batches of projected scenes
(model.dataset), an evaluation on the validation scenes, a line in metrics.jsonl, TensorBoard
scalars, curves.png and a checkpoint. Ctrl-C saves a checkpoint at the current step; `--resume`
continues from any checkpoint exactly (same batches, same augmentation, same numbers).

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

from model.backbone import SparseUNetConfig
from model.batch import PointBatch
from model.config import TrainConfig, parse_config
from model.dataset import AugmentConfig, CachedScenes, ProjectionConfig, collate
from model.fusion import FusionConfig, FusionModel
from model.distributed import Distributed
from model.losses import (LossConfig, clip_weight_schedule, compute_losses, finite_or_skip,
                          rebalance_for_global_mean)
from model.evaluate import LOSS_TERMS, evaluate
from model.instance import ClusterConfig
from model.metrics import confusion_matrix, mean_iou
from model.report import format_summary, plot_curves
from model.sources import discover_stores, scene_sources, split_scenes
from pipeline.devices import resolve_device
from storage.errors import UserError
from storage.featureset import choose_featureset
from storage.store import parse_storage_options

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 30

def distill_weight(config: TrainConfig, description: dict[str, Any]) -> float:
    """The per-point distillation weight: --distill-weight, or by default 1 when the feature
    set's 2D features live in CLIP's text-aligned embedding space (maskclip), else 0."""
    aligned = (description.get("spatial_kind") == "maskclip"
               and int(description["spatial_dim"]) == int(description["global_dim"]))
    if config.distill_weight is None:
        return 1.0 if aligned else 0.0
    if config.distill_weight < 0:
        raise UserError(f"--distill-weight {config.distill_weight}: a weight is 0 or more")
    if config.distill_weight > 0 and not aligned:
        raise UserError(
            f"--distill-weight needs 2D features in CLIP's embedding space, and this feature set "
            f"holds {description.get('spatial_kind')} features ({description.get('spatial_dim')}-d "
            f"vs CLIP's {description.get('global_dim')}-d): extract with --spatial-kind maskclip, "
            "or drop --distill-weight")
    return config.distill_weight


def build_model(config: TrainConfig, description: dict[str, Any]) -> FusionModel:
    """The fusion model whose 2D and CLIP widths match the feature set's."""
    return FusionModel(FusionConfig(
        backbone=SparseUNetConfig(voxel_size=config.voxel_size, channels=config.channels,
                                  blocks=(1,) * len(config.channels), norm=config.norm),
        dim_2d=int(description["spatial_dim"]),
        clip_dim=int(description["global_dim"]),
        width=config.width,
        use_2d=config.use_2d,
        instance_head=config.instance_head,
        point_embed=distill_weight(config, description) > 0,
    ))


def load_trained_model(path: str, device: torch.device
                       ) -> tuple[FusionModel, TrainConfig, str, dict[str, Any]]:
    """A trained model for inference: (model in eval mode on `device`, the run's config, its
    feature set id and description). Unlike `Trainer(resume=...)` it needs none of the run's
    data (no store, no validation list)."""
    checkpoint = _load_checkpoint(path)
    saved = dict(checkpoint["config"])
    saved.setdefault("distill_weight", 0.0)  # checkpoints from before the term had none
    config = TrainConfig(**_tuples(saved))
    description = checkpoint["featureset_description"]
    model = build_model(config, description).to(device)
    model.load_state_dict(checkpoint["model"])
    return model.eval(), config, checkpoint["featureset"], description


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
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return ({name: float(losses[name].detach()) for name in LOSS_TERMS},
            output.semantic_logits.detach())


@dataclass
class EpochState:
    """Where a run stands inside an epoch: all a checkpoint needs to continue it exactly."""

    epoch: int = 0
    step: int = 0  # batches of `epoch` already done
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LOSS_TERMS, 0.0))
    steps_done: int = 0
    skipped: int = 0
    confusion: torch.Tensor | None = None


class Trainer:
    """Owns the model, optimiser, data and run folder of one training run."""

    def __init__(self, config: TrainConfig):
        checkpoint = _load_checkpoint(config.resume) if config.resume else None
        if checkpoint is not None:
            # the resumed run's settings win, except where to read the stores from, the device
            # and, if given, a new number of epochs (which stretches the learning-rate schedule)
            saved = dict(checkpoint["config"])
            saved.setdefault("distill_weight", 0.0)  # a run from before the term keeps without it
            saved = TrainConfig(**_tuples(saved))
            config = dataclasses.replace(saved, cache=config.cache, resume=config.resume,
                                         storage_options=(config.storage_options
                                                          or saved.storage_options),
                                         epochs=config.epochs or saved.epochs,
                                         device=config.device)
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
        self.featureset, self.description = choose_featureset(
            stores, checkpoint["featureset"] if checkpoint else config.featureset)
        if self.description.get("random_weights"):
            warnings.warn(f"feature set {self.featureset} ({self.description.get('model')}) was "
                          "extracted with RANDOM CLIP weights: its features carry no meaning; "
                          "fine for plumbing, not for results", stacklevel=2)
        # rank 0 decides which scenes are finished (a store still being written could otherwise
        # give the processes different scene lists, and so different step counts)
        chosen = self.distributed.broadcast(
            lambda: {s: stores.index(store) for s, store in
                     scene_sources(stores, self.featureset).items()})
        sources = {scene_id: stores[index] for scene_id, index in chosen.items()}
        self.train_ids, self.val_ids = split_scenes(list(sources), config.val_list,
                                                    config.val_fraction, config.seed)
        self.scenes = CachedScenes(
            sources, self.featureset, self.device,
            ProjectionConfig(config.depth_threshold, config.relative_threshold),
            cache_bytes=config.scene_cache_gb * 1e9)
        self.model = build_model(config, self.description).to(self.device)
        self.net = self._wrap_for_ddp()  # what train steps call: the model, or DDP around it
        semantic_weight = config.semantic_weight
        if semantic_weight is None:  # the seed's weights: 0.4 with fusion, 0.5 without
            semantic_weight = 0.4 if config.use_2d else 0.5
        self.loss_config = LossConfig(semantic_weight=semantic_weight,
                                      offset_weight=config.offset_weight,
                                      direction_weight=config.direction_weight,
                                      clip_schedule=config.clip_schedule,
                                      temperature=config.temperature,
                                      distill_weight=distill_weight(config, self.description))
        self.cluster = ClusterConfig(config.cluster_radius, config.min_instance_points)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.steps_per_epoch = len(self._batches(0))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(
            config.schedule, config.warmup_steps, config.epochs * self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        self.state = EpochState()
        self.history: list[dict[str, Any]] = []
        if checkpoint is not None:
            self._restore(checkpoint)
            self.out = Path(config.out) if config.out else _run_folder_of(Path(config.resume))
        else:
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
        writer = SummaryWriter(str(self.out / "tensorboard")) if main else contextlib.nullcontext()
        with writer, _StopOnCtrlC() as stop:
            self._stop = stop
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
        with ThreadPoolExecutor(1, thread_name_prefix="scene-prefetch") as prefetch:
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
        """Model, optimiser, scheduler, scaler, epoch state, feature set id and config."""
        path = self.out / "checkpoints" / name
        state = dataclasses.asdict(self.state)
        torch.save({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": state,
            "history": self.history,
            "featureset": self.featureset,
            "featureset_description": self.description,
            "config": dataclasses.asdict(self.config),
        }, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)  # a kill mid-save leaves the previous checkpoint
        return path

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
        log.info("resumed at epoch %d, step %d of %s", self.state.epoch + 1, self.state.step,
                 self.config.resume)


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


def _load_checkpoint(path: str) -> dict[str, Any]:
    target = Path(path)
    if target.is_dir():
        candidates = [target / "checkpoints" / n for n in ("interrupted.pt", "last.pt")]
        existing = [c for c in candidates if c.exists()]
        if not existing:
            raise UserError(f"no checkpoint in {target / 'checkpoints'}: pass a run folder that "
                            "has finished an epoch, or a .pt file")
        target = max(existing, key=lambda c: c.stat().st_mtime)
    if not target.exists():
        raise UserError(f"no checkpoint at {target}")
    try:
        return torch.load(target, map_location="cpu", weights_only=False)
    except Exception as error:
        raise UserError(f"cannot read checkpoint {target} ({error}): it may be truncated; "
                        "resume from another one in the same folder") from None


def _run_folder_of(resume: Path) -> Path:
    return resume if resume.is_dir() else resume.parent.parent


def _tuples(config: dict[str, Any]) -> dict[str, Any]:
    """Checkpoints store tuples as lists; TrainConfig wants them back as tuples."""
    fixed = dict(config)
    fixed["channels"] = tuple(fixed["channels"])
    fixed["clip_schedule"] = tuple(tuple(step) for step in fixed["clip_schedule"])
    return fixed


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


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun, the other processes only warn
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(levelname)s {f'[rank {rank}] ' if rank else ''}%(name)s: "
                        "%(message)s")
    trainer = None
    try:
        trainer = Trainer(config)
        history = trainer.fit()
        trainer.distributed.barrier()  # the others wait for rank 0's last validation and save
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if trainer is not None:
            trainer.distributed.close()
    if trainer.distributed.is_main:
        print(format_summary(history, trainer.out, trainer.featureset))
    return 0


if __name__ == "__main__":
    sys.exit(main())
