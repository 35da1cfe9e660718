"""The YAML files shipped inside the package: model presets (`lare-*.yaml`), the paper's stage recipes
(`stage1.yaml` ... `stage4.yaml`), their small-scale variants (`tiny/`) and accelerate configs (`accelerate/`).

They are package data, found through `importlib.resources`, so an installed wheel has them as well as a checkout.
A name is looked up here only when it is not an existing file or folder: a user's own YAML path always wins.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# Recipe sets reachable by name with `lare train --all --recipes NAME`: the folder holding stage1.yaml ... stage4.yaml.
RECIPE_SETS = {"paper": ".", "tiny": "tiny"}


def packaged_configs_dir() -> Path:
    """The folder of the packaged YAML files. Wheels install unpacked, so this is a real directory."""
    return Path(str(files(__name__)))


def available_presets() -> list[str]:
    """Names of the packaged model presets (`lare-*.yaml`)."""
    return sorted(path.stem for path in packaged_configs_dir().glob("lare-*.yaml"))


def available_recipes() -> list[str]:
    """Packaged stage recipes by the name `--config` accepts (`stage2`, `tiny/stage2`, ...)."""
    root = packaged_configs_dir()
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.glob("**/stage*.yaml"))


def resolve_recipe(name_or_path: str) -> Path:
    """A stage recipe YAML: an existing file path, else a packaged recipe by name (`tiny/stage2` or
    `tiny/stage2.yaml`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = name_or_path if name_or_path.endswith((".yaml", ".yml")) else f"{name_or_path}.yaml"
    packaged = packaged_configs_dir() / name
    if packaged.is_file() and packaged.name.startswith("stage"):
        return packaged
    raise ValueError(
        f"Recipe {name_or_path!r} is neither a file nor a packaged recipe. Pass the path of a recipe YAML file or "
        f"one of the packaged recipes: {', '.join(available_recipes())}."
    )


def resolve_recipe_set(name_or_dir: str) -> Path:
    """The folder with stage1.yaml ... stage4.yaml for `lare train --all`: an existing folder, else a packaged
    recipe set by name (`paper`, `tiny`)."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if name_or_dir in RECIPE_SETS:
        return packaged_configs_dir() / RECIPE_SETS[name_or_dir]
    raise ValueError(
        f"--recipes {name_or_dir!r} is neither a folder nor a packaged recipe set. Pass a folder with stage1.yaml ... "
        f"stage4.yaml or one of the packaged sets: {', '.join(RECIPE_SETS)}."
    )


__all__ = [
    "RECIPE_SETS",
    "available_presets",
    "available_recipes",
    "packaged_configs_dir",
    "resolve_recipe",
    "resolve_recipe_set",
]
