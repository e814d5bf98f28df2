"""extract-clip's parameters are declared once (flows.parameters.ExtractParameters): the flow's
signature, Prefect's parameter schema and the command line all come from it."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import flows.parameters

from flows.extract_clip import build_parser, extract_clip
from flows.parameters import ExtractParameters
from pipeline.encoders import ENCODERS
from pipeline.encoders.base import DEFAULT_MODEL, DEFAULT_PRETRAINED, EncoderConfig
from pipeline.extraction import extract_scene
from pipeline.preprocess import Preprocess
from pipeline.readers import SCENE_READERS


def test_the_flow_the_schema_and_the_cli_derive_from_one_dataclass():
    fields = {field.name: field for field in dataclasses.fields(ExtractParameters)}
    signature = inspect.signature(extract_clip.fn).parameters
    assert list(signature) == list(fields)
    for name, parameter in signature.items():
        default = fields[name].default
        assert parameter.default == (inspect.Parameter.empty
                                     if default is dataclasses.MISSING else default), name
    assert set(extract_clip.parameters.properties) == set(fields)  # what a deployment takes
    assert extract_clip.parameters.required == ["root"]
    actions = {action.dest: action for action in build_parser()._actions if action.dest != "help"}
    assert set(actions) == set(fields)
    assert list(actions["dataset"].choices) == list(SCENE_READERS)
    assert list(actions["encoder"].choices) == list(ENCODERS)


def test_one_default_per_constant():
    """The flow's encoder options, batch size and stride take their defaults from the encoder's
    and the extraction's definitions (a name in flows/parameters.py, never a second literal),
    and the pre-processing's decode path is the encoder's."""
    tree = ast.parse(inspect.getsource(flows.parameters))
    (cls,) = [node for node in tree.body
              if isinstance(node, ast.ClassDef) and node.name == "ExtractParameters"]
    defaults = {node.target.id: node.value.args[0] for node in cls.body
                if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call)
                and node.value.args}
    shared = ("model", "pretrained", "resize", "decode", "spatial_kind", "device", "stride",
              "batch_size")
    literal = [name for name in shared if isinstance(defaults[name], ast.Constant)]
    assert literal == [], f"defaults written again in flows/parameters.py: {literal}"
    parameters = ExtractParameters(root="scans")
    config = parameters.encoder_config()
    assert config == EncoderConfig(image_size=None)  # same defaults, field by field
    assert (config.model, config.pretrained) == (DEFAULT_MODEL, DEFAULT_PRETRAINED)
    assert Preprocess((224, 224), (0, 0, 0), (1, 1, 1)).decode == config.decode
    extract = inspect.signature(extract_scene).parameters
    assert (parameters.stride, parameters.batch_size) == (extract["stride"].default,
                                                          extract["batch_size"].default)
    args = build_parser().parse_args(["--root", "scans", "--scenes", "scene00*"])
    assert ExtractParameters(**vars(args)) == dataclasses.replace(parameters, scenes="scene00*")
