"""Building, saving and loading the fusion model: the one place that knows a checkpoint's layout.

A checkpoint is a dict of tensors and plain data (numbers, strings, lists, dicts): "model" (the
state dict), "config" (the run's TrainConfig as a dict), "featureset" and
"featureset_description" (the id and the spec's attributes of the feature set it trained on),
"data" (stores, scenes and split), and for resuming "optimizer", "scheduler", "scaler", "state" and "history". It is written
atomically (`save_checkpoint`) and read with `torch.load(weights_only=True)`
(`load_checkpoint`), so a checkpoint can never run code. `model.train` writes and resumes
checkpoints; `model.evaluate`, `model.query` and the benchmarks load models through
`load_trained_model`.
"""

from __future__ import annotations

import dataclasses
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cli.errors import UserError
from model.network.backbone import SparseUNetConfig
from model.config import TrainConfig
from model.network.fusion import FusionConfig, FusionModel
from model.network.losses import LossConfig
from storage.featureset import FeatureSetSpec


def distill_weight(config: TrainConfig, spec: FeatureSetSpec) -> float:
    """The per-point distillation weight: --distill-weight, or by default 1 when the feature
    set's 2D features are text-aligned, else 0."""
    aligned = spec.text_aligned
    if config.distill_weight is None:
        return 1.0 if aligned else 0.0
    if config.distill_weight < 0:
        raise UserError(f"--distill-weight {config.distill_weight}: a weight is 0 or more")
    if config.distill_weight > 0 and not aligned:
        raise UserError(
            f"--distill-weight needs 2D features in CLIP's embedding space, and this feature set "
            f"holds {spec.model} {spec.spatial_kind} features ({spec.spatial_dim}-d, not "
            "text-aligned): extract with --encoder open_clip --spatial-kind maskclip, "
            "or drop --distill-weight")
    return config.distill_weight


def build_model(config: TrainConfig, spec: FeatureSetSpec) -> FusionModel:
    """The fusion model of `config` whose 2D and CLIP widths match the feature set's."""
    return FusionModel(FusionConfig(
        backbone=SparseUNetConfig(voxel_size=config.voxel_size, channels=config.channels,
                                  blocks=(1,) * len(config.channels), norm=config.norm),
        backbone_name=config.backbone,
        dim_2d=spec.spatial_dim,
        clip_dim=spec.global_dim,
        width=config.width,
        use_2d=config.use_2d,
        instance_head=config.instance_head,
        point_embed=distill_weight(config, spec) > 0,
    ))


def loss_config(config: TrainConfig, spec: FeatureSetSpec) -> LossConfig:
    """The loss terms and weights of a run. The semantic weight defaults to 0.4 with fusion
    and 0.5 for the 3D-only model (--no-use-2d), the weights BiFusion trains with."""
    semantic_weight = config.semantic_weight
    if semantic_weight is None:
        semantic_weight = 0.4 if config.use_2d else 0.5
    return LossConfig(semantic_weight=semantic_weight, offset_weight=config.offset_weight,
                      direction_weight=config.direction_weight,
                      clip_schedule=config.clip_schedule, clip_loss=config.clip_loss,
                      temperature=config.temperature,
                      distill_weight=distill_weight(config, spec))


@contextmanager
def fitting(path: str | Path) -> Iterator[None]:
    """Turn a checkpoint whose contents do not fit this code (weights of other shapes, a config
    or state of other types: another version's file, or a damaged one that still unpickles)
    into one UserError naming the file."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise UserError(
            f"checkpoint {path} does not fit this model ({' '.join(str(error).split())[:200]}): "
            "it is damaged or was written by another version; pass another checkpoint or train "
            "again") from None


def restore_config(saved: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a checkpoint recorded. Tuples come back from lists; settings a newer
    version added take their defaults, except the distillation weight, which runs from before
    the term had none (0); settings an older version had and this one dropped are ignored."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {key: value for key, value in saved.items() if key in known}
    values.setdefault("distill_weight", 0.0)
    if "channels" in values:
        values["channels"] = tuple(values["channels"])
    if "clip_schedule" in values:
        values["clip_schedule"] = tuple(tuple(step) for step in values["clip_schedule"])
    return TrainConfig(**values)


@dataclass
class TrainedModel:
    """A trained model ready for inference, and what its run recorded.

    model: the FusionModel in eval mode on the device asked for. config: the run's TrainConfig.
    featureset, spec: the feature set it trained on. epochs: epochs finished; step: batches
    done of the next one (0 unless the run was interrupted inside it).
    data: the run's stores, scenes and split (model.train.data_identity), or None for runs
    from before it was recorded. path: the checkpoint file.
    """

    model: FusionModel
    config: TrainConfig
    featureset: str
    spec: FeatureSetSpec
    epochs: int
    step: int
    data: dict[str, Any] | None
    path: Path


def load_trained_model(path: str | Path, device: torch.device) -> TrainedModel:
    """The model of a checkpoint (a .pt file or a run folder), for inference: it needs none of
    the run's data (no store, no validation list)."""
    checkpoint, target = load_checkpoint(path)
    with fitting(target):
        config = restore_config(checkpoint["config"])
        spec = FeatureSetSpec.from_attrs(checkpoint["featureset_description"])
        model = build_model(config, spec).to(device)
        model.load_state_dict(checkpoint["model"])
        state = checkpoint.get("state", {})
        return TrainedModel(model.eval(), config, checkpoint["featureset"], spec,
                            int(state.get("epoch", 0)), int(state.get("step", 0)),
                            checkpoint.get("data"), target)


def plain(value: Any) -> Any:
    """`value` as tensors and plain data only (dict, list, tuple, str, int, float, bool,
    None): numpy scalars become Python numbers and numpy arrays tensors; anything else is a
    TypeError, so that nothing a checkpoint holds needs code to load it."""
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return value
    if isinstance(value, dict):  # dict or OrderedDict (a state dict), both plain to torch
        return type(value)((key, plain(item)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(plain(item) for item in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"a checkpoint holds tensors and plain data only, not {type(value).__name__}")


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> Path:
    """Write `checkpoint` (made `plain`) to `path` through a temporary file, so a kill
    mid-save leaves the previous checkpoint whole."""
    temporary = path.with_suffix(".tmp")
    torch.save(plain(checkpoint), temporary)
    temporary.replace(path)
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(the checkpoint, its file): `path` is a .pt file or a run folder (its newest of
    interrupted.pt and last.pt). Loaded with weights_only=True: a file holding anything but
    tensors and plain data is refused with one line, and nothing in it runs."""
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
        checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))  # what the restricted unpickler refused
        what = f"a reference to {found.group(1)}" if found else "objects other than tensors"
        raise UserError(
            f"refusing to load checkpoint {target}: it holds {what}, not only tensors and "
            "plain data, so loading it could run code; model.train never writes such a file: "
            "use a checkpoint you made, or one from a source you trust") from None
    except Exception as error:
        raise UserError(f"cannot read checkpoint {target} ({' '.join(str(error).split())[:200]}):"
                        " it may be truncated; resume from another one in the same folder"
                        ) from None
    if not isinstance(checkpoint, dict) or not {"model", "config", "featureset"} <= set(checkpoint):
        raise UserError(f"{target} is not a checkpoint written by model.train (it lacks model, "
                        "config or featureset)")
    return checkpoint, target
