"""What the store's numbers mean, written into the store itself: dimension names, CF-style
attributes (`units`, `long_name`, `flag_values` / `flag_meanings`) on every array, and the
conventions (frames, axes, label values, feature grid) in the root's attributes.

With them the store reads without this project: `xarray.open_zarr(store, group=...)`,
`dask.array.from_zarr(store, component=...)` or plain zarr find the axes by name and each
array's meaning beside it. Stores written before (format_version 1 without `conventions`) hold
the same arrays without this metadata; this project reads both, and `python -m storage.inspect`
says which a store is.

Dimension names are unique within a group, and a name means one length throughout a scene
(`frame`, `point`), so xarray can open each group as one Dataset and line groups up.
"""

from __future__ import annotations

from typing import Any

import zarr

from storage.featureset import FeatureSetSpec
from storage.labels import CLASS_NAMES, IGNORE_INDEX, NO_INSTANCE, NO_SEGMENT

CONVENTIONS_VERSION = 1
"""Version of the metadata below; readers compare it, this project writes it."""

DIMENSIONS: dict[str, tuple[str, ...]] = {
    # scenes/<id>/frames
    "frame_id": ("frame",),
    "pose": ("frame", "pose_row", "pose_column"),
    "valid": ("frame",),
    "reason": ("frame",),
    "intrinsic_color": ("intrinsic_row", "intrinsic_column"),
    "intrinsic_depth": ("intrinsic_row", "intrinsic_column"),
    "depth": ("frame", "depth_y", "depth_x"),
    # scenes/<id>/points
    "xyz": ("point", "axis"),
    "rgb": ("point", "color_channel"),
    "semantic": ("point",),
    "instance": ("point",),
    "segment": ("point",),
    # scenes/<id>/features/<featureset_id>
    "spatial": ("frame", "y", "x", "channel"),
    "global": ("frame", "embedding"),
    "done": ("frame",),
    "clamped": ("frame",),
    # featuresets/<featureset_id>/text
    "text": ("embedding",),
}
"""Array name (the last part of its path) -> the names of its dimensions."""

POSE = ("4x4 camera-to-world transform: world = pose @ [x, y, z, 1] of a point in the camera "
        "frame; camera axes as OpenCV's (x right, y down, z forward); metres. Colour and depth "
        "share it (registered); NaN for a frame whose pose is unknown")
INTRINSICS = ("3x3 pinhole intrinsics [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] in pixels: a point "
              "(x, y, z) of the camera frame lands at column u = fx x / z + cx, row "
              "v = fy y / z + cy; integer (u, v) is the centre of a pixel, which spans "
              "[u - 0.5, u + 0.5]")
FEATURE_GRID = (
    "spatial[frame, y, x, channel]: y the grid row (top to bottom), x the grid column (left to "
    "right) of the model input (image_size = (H_in, W_in)), which the (gh, gw) grid covers "
    "exactly, edge to edge: cell (y, x) spans input pixels [y H_in/gh, (y+1) H_in/gh) x "
    "[x W_in/gw, (x+1) W_in/gw). A colour pixel (u, v) of a frame of color_size (Hc, Wc) lands "
    "at input coordinates, through pixel edges (u + 0.5, v + 0.5): resize 'squash' (the whole "
    "frame resized, aspect not kept): x' = (u + 0.5) W_in / Wc, y' = (v + 0.5) H_in / Hc; "
    "resize 'crop' (open_clip's: shorter side scaled to fit, then a centre crop): s = max(H_in / "
    "Hc, W_in / Wc), x' = (u + 0.5) s - (Wc s - W_in) / 2, y' = (v + 0.5) s - (Hc s - H_in) / 2; "
    "a pixel with x' outside [0, W_in) or y' outside [0, H_in) was cropped away. Stage 2 samples "
    "the grid bilinearly between cell centres (border cells extend to the edge)")
USABLE_FRAMES = ("a frame's features are usable where frames/valid and features/<id>/done are "
                 "both true; other frames hold the fill value (NaN) and must not be used")


def _labels() -> dict[str, Any]:
    """The label values, from their one definition (storage.labels)."""
    return {"class_names": list(CLASS_NAMES), "ignore_index": IGNORE_INDEX,
            "no_instance": NO_INSTANCE, "no_segment": NO_SEGMENT}


def root_attributes() -> dict[str, Any]:
    """The `conventions` attribute of the root: everything a reader must know, in one place."""
    from storage.chunks import MISSING_DEPTH

    labels = _labels()
    return {
        "version": CONVENTIONS_VERSION,
        "attributes": "CF-style: units (UDUNITS; '1' dimensionless), long_name, flag_values and "
                      "flag_meanings on label arrays",
        "layout": "scenes/<scene_id>/{frames,points,features/<featureset_id>}; "
                  "featuresets/<featureset_id> holds each feature set's spec (its attributes)",
        "pose": POSE,
        "intrinsics": INTRINSICS,
        "depth": "uint16 in units of the scene's depth_scale metres (the array's scale_factor); "
                 f"0 = no reading; {MISSING_DEPTH} = chunk never written",
        "semantic": {"meaning": "ScanNet-20 benchmark class, index into class_names",
                     "class_names": labels["class_names"], "ignore_index": labels["ignore_index"]},
        "instance": {"meaning": "annotated object id within the scene, 0..K-1",
                     "none": labels["no_instance"]},
        "segment": {"meaning": "over-segmentation (superpoint) id", "unknown": labels["no_segment"]},
        "feature_grid": FEATURE_GRID,
        "usable_frames": USABLE_FRAMES,
        "scene_attributes": {
            "color_size": "(height, width) of the colour frames, pixels",
            "depth_size": "(height, width) of the depth maps, pixels",
            "depth_scale": "metres per unit of depth",
            "axis_alignment": "4x4 row by row, world frame -> ScanNet's axis-aligned frame "
                              "(identity when has_axis_alignment is false)",
            "complete": "the scene's geometry is completely written"},
        "featureset_attributes": {
            "image_size": "(H_in, W_in) of the model input, pixels",
            "grid_size": "(gh, gw) of the spatial feature grid",
            "resize": "how a colour frame became the model input: squash or crop "
                      "(see feature_grid)",
            "mean, std": "per-channel normalisation of the model input",
            "spatial_dim, global_dim": "C of spatial, D of global",
            "random_weights": "true: the model had random weights, its features mean nothing"},
        "dimensions": {name: list(dims) for name, dims in DIMENSIONS.items()},
    }


_STATIC: dict[str, dict[str, Any]] = {
    "frame_id": {"long_name": "frame number in the scan (color/<frame_id>.jpg)", "units": "1"},
    "pose": {"long_name": POSE, "units": "m"},
    "valid": {"long_name": "frame usable: decoded, rigid finite pose, depth present",
              "units": "1", "comment": USABLE_FRAMES},
    "reason": {"long_name": "why the frame is not valid ('' when valid or not read yet)"},
    "intrinsic_color": {"long_name": "colour camera " + INTRINSICS, "units": "pixel"},
    "intrinsic_depth": {"long_name": "depth camera " + INTRINSICS, "units": "pixel"},
    "xyz": {"long_name": "point position, world frame (that of pose)", "units": "m"},
    "rgb": {"long_name": "point colour, red green blue, 0-255", "units": "1"},
    "text": {"long_name": "text embedding of the prompt, unit norm", "units": "1"},
}
"""Attributes of the arrays whose meaning does not depend on the scene or feature set."""


def array_attributes(name: str, *, featureset: str | None = None,
                     spec: FeatureSetSpec | None = None,
                     color_size: tuple[int, int] | None = None,
                     depth_scale: float | None = None) -> dict[str, Any]:
    """CF-style attributes of the array `name` (as in DIMENSIONS). Feature arrays take their
    feature set's id and spec and the scene's color_size; depth takes depth_scale.
    Attributes whose value is unknown (None) are left out."""
    attributes = _attributes(name, featureset, spec, color_size, depth_scale)
    return {key: value for key, value in attributes.items() if value is not None}


def _attributes(name: str, featureset: str | None, spec: FeatureSetSpec | None,
                color_size: tuple[int, int] | None, depth_scale: float | None) -> dict[str, Any]:
    if name in _STATIC:
        return dict(_STATIC[name])
    if name == "depth":
        return {"long_name": "depth along the camera's z axis (metres = value * scale_factor); "
                             "0 = no reading", "units": "m", "scale_factor": depth_scale}
    if name in ("semantic", "instance", "segment"):
        labels = _labels()
        if name == "semantic":
            names, ignore = labels["class_names"], labels["ignore_index"]
            return {"long_name": f"ScanNet-20 benchmark class (index into class_names); "
                                 f"{ignore} = ignored", "units": "1",
                    "flag_values": [*range(len(names)), ignore],
                    "flag_meanings": " ".join([n.replace(" ", "_") for n in names] + ["ignored"]),
                    "class_names": names, "ignore_index": ignore}
        if name == "instance":
            return {"long_name": "annotated object id within the scene, 0..K-1; "
                                 f"{labels['no_instance']} = none", "units": "1",
                    "flag_values": [labels["no_instance"]], "flag_meanings": "none"}
        return {"long_name": f"over-segmentation (superpoint) id; {labels['no_segment']} = "
                             "unknown", "units": "1",
                "flag_values": [labels["no_segment"]], "flag_meanings": "unknown"}
    common = {"units": "1", "featureset": featureset, "comment": USABLE_FRAMES}
    model = spec.model if spec else None
    if name == "spatial":
        return {"long_name": f"{model} spatial features "
                             f"({spec.spatial_kind if spec else None}) on the model input's grid",
                **common, "image_size": list(spec.image_size) if spec else None,
                "grid_size": list(spec.grid_size) if spec else None,
                "resize": spec.resize if spec else None,
                "color_size": list(color_size) if color_size else None,
                "grid_mapping_description": FEATURE_GRID}
    if name == "global":
        return {"long_name": f"{model} global image embedding (not normalised)", **common}
    if name == "done":
        return {"long_name": "frame processed by this feature set", **common}
    if name == "clamped":
        return {"long_name": "feature values of the frame clamped to float16's range (+-65504)",
                **common}
    raise KeyError(f"no conventions for an array named {name!r}")


def dimension_names(name: str) -> tuple[str, ...]:
    return DIMENSIONS[name]


def found_in(store: Any) -> dict[str, Any]:
    """What a store records about itself (storage.store.FeatureStore): the conventions'
    version (None for a store written before them), whether its metadata are consolidated, and
    per kind of array ("frames/pose", "features/*/spatial", ...) the dimension names and units
    found, with how many arrays have dimension names at all."""
    conventions = store.root.attrs.get("conventions")
    kinds: dict[str, dict[str, Any]] = {}
    arrays = named = 0
    for scene_id in store.scenes():
        groups = ["frames", "points"] + [f"features/{fid}" for fid in
                                         store.children(f"scenes/{scene_id}/features")]
        for group in groups:
            for name in store.children(f"scenes/{scene_id}/{group}"):
                metadata = store.node(f"scenes/{scene_id}/{group}/{name}").metadata
                dims = getattr(metadata, "dimension_names", None)
                arrays += 1
                named += dims is not None
                kind = f"{group.split('/')[0]}/*/{name}" if group != group.split("/")[0] \
                    else f"{group}/{name}"
                entry = kinds.setdefault(kind, {"dimension_names": None, "units": None})
                if dims is not None and entry["dimension_names"] is None:
                    entry["dimension_names"] = list(dims)
                    entry["units"] = store.node(f"scenes/{scene_id}/{group}/{name}").attrs.get(
                        "units")
    return {"version": conventions.get("version") if isinstance(conventions, dict) else None,
            "format_version": store.root.attrs.get("format_version"),
            "consolidated": _has_snapshot(store),
            "class_names": (conventions or {}).get("semantic", {}).get("class_names"),
            "ignore_index": (conventions or {}).get("semantic", {}).get("ignore_index"),
            "arrays": arrays, "with_dimension_names": named, "kinds": kinds}


def _has_snapshot(store: Any) -> bool:
    """Whether the root's zarr.json holds consolidated metadata, also when `store` was opened
    without them (`inspect --verify` reads every zarr.json as it is)."""
    if store.root.metadata.consolidated_metadata is not None:
        return True
    root = zarr.open_group(store.root.store, path=store.root.path, mode="r")
    return root.metadata.consolidated_metadata is not None


def format_found(found: dict[str, Any]) -> list[str]:
    """`found_in`'s answer as lines for `python -m storage.inspect`."""
    consolidated = ("consolidated metadata: yes (a snapshot of the last finished run)"
                    if found["consolidated"] else "consolidated metadata: no (readers read "
                    "every zarr.json; the end of an extract-clip run writes them)")
    if found["version"] is None and not found["with_dimension_names"]:
        return [f"conventions: none recorded: this store was written before stores recorded "
                f"dimension names, units and conventions (0 of {found['arrays']} arrays have "
                "dimension names). This project reads it as before; xarray cannot open its "
                "groups and other readers must rely on this project's documentation. Extract "
                "into a new store to get them.", consolidated]
    lines = [f"conventions: version {found['version']} (format version "
             f"{found['format_version']}); {consolidated}"]
    if found["class_names"]:
        names = found["class_names"]
        lines.append(f"  semantic: ScanNet-20, {len(names)} classes ({names[0]}, {names[1]}, ..., "
                     f"{names[-1]}), {found['ignore_index']} ignored; instance -1 none; segment "
                     "-1 unknown")
    lines.append(f"  dimension names on {found['with_dimension_names']} of {found['arrays']} "
                 "arrays" + ("" if found["with_dimension_names"] == found["arrays"] else
                             " (the others were written by an older version)"))
    for kind, entry in found["kinds"].items():
        dims = ", ".join(entry["dimension_names"]) if entry["dimension_names"] else "none"
        units = f"  [{entry['units']}]" if entry["units"] else ""
        lines.append(f"    {kind:<22} ({dims}){units}")
    return lines
