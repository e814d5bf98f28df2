"""argparse flags generated from typed dataclasses, and the flags several commands share.

A dataclass field declared with `option(default, help)` becomes the flag `--field-name`: a bool
becomes `--x/--no-x`, a Literal a choice, `tuple[int, ...]` a comma list (`32,64`), and
`tuple[tuple[int, float], ...]` a list of `epoch:weight` steps. A settings dataclass and its
command line therefore cannot drift apart (`model.config.TrainConfig`,
`flows.parameters.ExtractParameters`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any, Literal, get_args, get_origin, get_type_hints

STORAGE_OPTIONS_HELP = (
    "JSON fsspec options of a store URL, e.g. '{\"endpoint_url\": \"http://minio:9000\"}' "
    "(non-secret options only: endpoint, region, timeouts...); credentials are refused here: set "
    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment")
"""The help of every command's --storage-options (read by storage.options.parse_storage_options)."""


def add_storage_options_argument(parser: argparse.ArgumentParser) -> None:
    """`--storage-options JSON`, read with `storage.options.parse_storage_options`."""
    parser.add_argument("--storage-options", default=None, help=STORAGE_OPTIONS_HELP)


def option(default: Any, help: str, **metadata: Any) -> Any:
    """A dataclass field with its flag's help text (and any other metadata, e.g. `flag=False`
    for a field that has no flag)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def parse_value(kind: Any, text: str) -> Any:
    """One flag's text as the field's type."""
    if kind == tuple[int, ...]:
        return tuple(int(part) for part in text.split(","))
    if kind == tuple[tuple[int, float], ...]:
        steps = []
        for part in text.split(","):
            epoch, _, weight = part.partition(":")
            steps.append((int(epoch), float(weight)))
        return tuple(steps)
    return kind(text)


def format_default(value: Any) -> str:
    """A default as the flag would be typed."""
    if isinstance(value, tuple) and value and isinstance(value[0], tuple):
        return ",".join(f"{a}:{b:g}" for a, b in value)
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def add_dataclass_arguments(parser: argparse.ArgumentParser, settings: type) -> None:
    """A flag per field of the dataclass `settings` that has help metadata and not
    `flag=False`, its default and help from the field. A field without a default is a required
    flag. Metadata may also give argparse's `type` (a callable replacing the one derived from
    the annotation), `nargs`, and `choices` (a list, or a callable returning one, for choices
    that come from a registry)."""
    hints = get_type_hints(settings)
    for item in dataclasses.fields(settings):
        meta = item.metadata
        if "help" not in meta or meta.get("flag") is False:
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        required = item.default is dataclasses.MISSING
        default = None if required else item.default
        help_text = meta["help"]
        if kind is bool:
            help_text += f" (default {'on' if default else 'off'})"
        elif default is not None:
            help_text += f" (default {format_default(default)})"
        extra: dict[str, Any] = {"nargs": meta["nargs"]} if "nargs" in meta else {}
        if required:
            extra["required"] = True
        if kind in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        if "choices" in meta:
            choices = meta["choices"]
            extra["choices"] = list(choices() if callable(choices) else choices)
        elif get_origin(kind) is Literal:
            extra["choices"] = list(get_args(kind))
        if "type" in meta:
            extra["type"] = meta["type"]
        elif "choices" not in extra and not required:
            base = next((a for a in get_args(kind) if a is not type(None)), kind) \
                if default is None else kind
            extra["type"] = lambda text, base=base: parse_value(base, text)
        parser.add_argument(flag, default=default, help=help_text, **extra)


def dataclass_signature(settings: type,
                        returns: Any = inspect.Signature.empty) -> inspect.Signature:
    """The signature of a function whose keyword-only parameters are the fields of the
    dataclass `settings`, with their annotations and defaults (a field without a default is
    required): what a Prefect flow that takes these settings declares as its parameters."""
    hints = get_type_hints(settings)
    parameters = [
        inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY,
                          default=(inspect.Parameter.empty
                                   if item.default is dataclasses.MISSING else item.default),
                          annotation=hints[item.name])
        for item in dataclasses.fields(settings)]
    return inspect.Signature(parameters, return_annotation=returns)
