"""Which feature set a command works on, when a store holds several."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from cli.errors import UserError
from storage.errors import StoreError
from storage.featureset import FeatureSetSpec
from storage.store import FeatureStore


def choose_featureset(stores: Sequence[FeatureStore], requested: str | None,
                      purpose: str = "train on",
                      usable: Callable[[FeatureSetSpec], bool] | None = None,
                      ) -> tuple[str, FeatureSetSpec]:
    """The feature set id and spec a command works on (stage 2, queries, text).

    With `requested` None: the only feature set of the stores, or, of several, the only one
    `usable` accepts (a text command needs a text tower); else ask which to `purpose` on a
    terminal, otherwise raise a one-line UserError that lists them.
    """
    available: dict[str, FeatureSetSpec] = {}
    for store in stores:
        available.update(store.featuresets())
    listing = "; ".join(spec.describe(f) for f, spec in sorted(available.items())) or "none"
    where = stores[0].url if len(stores) == 1 else f"the {len(stores)} stores"
    if requested is not None:
        if requested not in available:
            raise StoreError(f"{where} has no feature set {requested} (it has: {listing}); "
                             "pick one of these with --featureset")
        return requested, available[requested]
    if not available:
        raise StoreError(f"{where} holds no feature set: run `python -m flows.extract_clip` "
                         "over your scenes first")
    if len(available) == 1:
        return next(iter(available.items()))
    candidates = [f for f, spec in available.items() if usable is not None and usable(spec)]
    if len(candidates) == 1:
        return candidates[0], available[candidates[0]]
    ids = sorted(available)
    if sys.stdin.isatty():
        choices = "\n".join(f"  [{i}] {available[f].describe(f)}"
                            for i, f in enumerate(ids))
        answer = input(f"several feature sets:\n{choices}\n{purpose} which? [0-{len(ids) - 1}] ")
        if answer.strip().isdigit() and int(answer) < len(ids):
            return ids[int(answer)], available[ids[int(answer)]]
    raise UserError(f"several feature sets in {where} ({listing}): pick one with --featureset")
