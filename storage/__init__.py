"""The feature store: `open_store(path_or_url, mode)` and the arrays it returns."""

from storage.errors import StoreError, UserError
from storage.featureset import featureset_id
from storage.store import FORMAT_VERSION, FeatureArrays, FeatureStore, SceneArrays, open_store

__all__ = [
    "FORMAT_VERSION",
    "FeatureArrays",
    "FeatureStore",
    "SceneArrays",
    "StoreError",
    "UserError",
    "featureset_id",
    "open_store",
]
