"""Text prompts of open-vocabulary queries: template ensembles and the ScanNet-20 class prompts.

Data only, no CLIP: `pipeline.text_embeddings` encodes prompts with these templates, and stage 2
(`model.query`) needs the same template strings to find the cached embeddings, without ever
importing open_clip.

A prompt is a class name ("chair"); a template is a sentence with one `{}` ("a photo of a {}.").
A prompt's embedding is the normalised mean of the normalised embeddings of its templated
sentences, as in CLIP's zero-shot classifiers.
"""

from __future__ import annotations

import argparse
import string
from collections.abc import Sequence

from storage.labels import CLASS_NAMES
from storage.errors import UserError

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "scene": (
        "a {} in a scene.",
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of a {} in a room.",
        "there is a {} in the scene.",
        "a cropped photo of a {}.",
        "a close-up photo of a {}.",
    ),
    "openscene": ("a {} in a scene",),
    "plain": ("{}",),
}
"""Named template sets. "scene" (the default) is a small indoor ensemble in the style of CLIP's
ImageNet templates; "openscene" is OpenScene's single template; "plain" is the bare prompt."""

DEFAULT_TEMPLATE_SET = "scene"
DEFAULT_TEMPLATES = TEMPLATE_SETS[DEFAULT_TEMPLATE_SET]

SCANNET20_PROMPTS = tuple("other furniture" if name == "otherfurniture" else name
                          for name in CLASS_NAMES)
"""One prompt per ScanNet-20 benchmark class, index = class: the class names, with
"otherfurniture" written as words (as OpenScene prompts it)."""


def resolve_templates(values: Sequence[str] | None) -> tuple[str, ...]:
    """`--templates` as given -> template strings.

    values: None or empty (the default set), one set name (`scene`, `openscene`, `plain`), or
    template strings that each hold `{}` exactly once. Raises UserError otherwise.
    """
    if not values:
        return DEFAULT_TEMPLATES
    if len(values) == 1 and values[0] in TEMPLATE_SETS:
        return TEMPLATE_SETS[values[0]]
    for template in values:
        try:  # exactly one replacement field, and it is a bare {}
            fields = [field for _, field, _, _ in string.Formatter().parse(template)
                      if field is not None]
        except ValueError:
            fields = ["?"]
        if fields != [""]:
            raise UserError(f"template {template!r} must hold {{}} exactly once (where the prompt "
                            f"goes), or name a set: {', '.join(TEMPLATE_SETS)}")
    return tuple(values)


def add_templates_argument(parser: argparse.ArgumentParser) -> None:
    """`--templates`, which pipeline.text_embeddings and model.query take alike (the same
    templates find the same cached embeddings); `resolve_templates` reads its value."""
    parser.add_argument(
        "--templates", nargs="+", default=None, metavar="TEMPLATE",
        help=f"prompt templates: a set ({', '.join(TEMPLATE_SETS)}; default "
        f"{DEFAULT_TEMPLATE_SET}) or template strings with {{}} where the prompt goes, e.g. "
        "\"a photo of a {}.\"; text_embeddings and query must be given the same")


def templates_flag(templates: Sequence[str]) -> list[str]:
    """The `--templates ...` arguments that select `templates`: none for the default set."""
    templates = tuple(templates)
    if templates == DEFAULT_TEMPLATES:
        return []
    names = [name for name, members in TEMPLATE_SETS.items() if members == templates]
    return ["--templates", *(names[:1] or templates)]
