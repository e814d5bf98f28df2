"""Which stores, which feature set and which scenes a training run reads."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from storage.errors import StoreError, UserError
from storage.chunks import reaching
from storage.store import FeatureStore, check_storage_options, open_store

log = logging.getLogger(__name__)


def discover_stores(cache: str, storage_options: dict[str, Any] | None = None
                    ) -> list[FeatureStore]:
    """`cache` is one store or a folder (local, or a URL prefix such as s3://bucket/stores)
    of `*.zarr` stores. storage_options: fsspec options of a URL (see storage.open_store)."""
    if "://" not in cache or cache.startswith("file://"):
        path = Path(cache.removeprefix("file://"))
        if not path.is_dir() or (path / "zarr.json").exists():
            return [open_store(cache)]
        found = [str(p) for p in sorted(path.glob("*.zarr")) if (p / "zarr.json").exists()]
    else:
        import fsspec

        check_storage_options(storage_options)  # before anything is logged or sent
        with reaching(cache, storage_options):  # an unreachable server: one line naming it
            fs, root = fsspec.core.url_to_fs(cache, **(storage_options or {}))
            if fs.exists(f"{root.rstrip('/')}/zarr.json"):
                return [open_store(cache, storage_options=storage_options)]
            protocol = cache.split("://", 1)[0]
            found = [f"{protocol}://{key.removesuffix('/zarr.json')}"
                     for key in sorted(fs.glob(f"{root.rstrip('/')}/*.zarr/zarr.json"))]
    if not found:
        raise StoreError(
            f"no feature store in {cache}: run `python -m flows.extract_clip --root DATA "
            f"--store {cache.rstrip('/')}/features.zarr` first, or pass --cache STORE.zarr")
    return [open_store(url, storage_options=storage_options) for url in found]


def scene_sources(stores: list[FeatureStore], featureset: str) -> dict[str, FeatureStore]:
    """Scene id -> store, for the scenes whose frames this feature set has all done.

    Scenes with unfinished features are left out with a warning that says how to finish them;
    a scene id in two stores is an error.
    """
    sources: dict[str, FeatureStore] = {}
    unfinished: list[str] = []
    for store in stores:
        if featureset not in store.featuresets():
            continue
        for scene_id in store.scenes():
            if scene_id in sources:
                raise StoreError(f"scene {scene_id} is in both {sources[scene_id].url} and "
                                 f"{store.url}: pass one store with --cache")
            done = store.done(scene_id, featureset)
            if done.size and done.all():
                sources[scene_id] = store
            else:
                unfinished.append(f"{scene_id} ({int(done.sum())}/{done.size} frames)")
    if unfinished:
        log.warning("leaving out %d scenes whose features are not finished: %s; rerun "
                    "extract-clip on the same store to finish them", len(unfinished),
                    ", ".join(unfinished))
    if not sources:
        raise StoreError(f"no scene has finished features of feature set {featureset}: "
                         "run (or rerun) `python -m flows.extract_clip` to finish them")
    return sources


def split_scenes(scene_ids: list[str], val_list: str | None, val_fraction: float,
                 seed: int) -> tuple[list[str], list[str]]:
    """(train, val) scene ids: the ids in `val_list` (a file, one per line) or a seeded fraction.

    A single scene is used for both (with a warning): fine for a demo, meaningless as a metric.
    """
    ids = sorted(scene_ids)
    if val_list is not None:
        wanted = [line.strip() for line in Path(val_list).read_text().splitlines() if line.strip()]
        missing = sorted(set(wanted) - set(ids))
        if missing:
            raise UserError(f"{val_list} names scenes without finished features: "
                            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        val = sorted(wanted)
    elif len(ids) == 1:
        log.warning("one scene only (%s): it is both the training and the validation set", ids[0])
        return ids, ids
    else:
        count = min(len(ids) - 1, max(1, round(val_fraction * len(ids))))
        val = sorted(random.Random(seed).sample(ids, count))
    train = [scene_id for scene_id in ids if scene_id not in set(val)]
    if not train:
        raise UserError("every scene is a validation scene: shorten --val-list")
    return train, val
