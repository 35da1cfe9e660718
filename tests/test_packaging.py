"""The package as a user installs it: packaged presets and recipes by name, and a wheel in a fresh environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lare_hf.configs import (
    available_presets,
    available_recipes,
    packaged_configs_dir,
    resolve_recipe,
    resolve_recipe_set,
)

REPO = Path(__file__).resolve().parents[1]


def test_packaged_configs_live_inside_the_package():
    import lare_hf

    assert packaged_configs_dir().parent == Path(lare_hf.__file__).parent
    assert {"lare-tiny", "lare-0.5b", "lare-1.5b", "lare-7b"} <= set(available_presets())
    assert {"stage1", "stage4", "tiny/stage1", "tiny/stage4"} <= set(available_recipes())


def test_recipes_resolve_by_name_and_a_users_own_path_wins(tmp_path, monkeypatch):
    assert resolve_recipe("tiny/stage2") == packaged_configs_dir() / "tiny" / "stage2.yaml"
    assert resolve_recipe("stage3.yaml") == packaged_configs_dir() / "stage3.yaml"
    assert resolve_recipe_set("tiny") == packaged_configs_dir() / "tiny"
    assert resolve_recipe_set("paper") == packaged_configs_dir()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "stage2.yaml").write_text("stage: 2\n")
    assert resolve_recipe("tiny/stage2.yaml") == Path("tiny/stage2.yaml")
    assert resolve_recipe_set("tiny") == Path("tiny")
    with pytest.raises(ValueError, match="'lare-tiny' is neither a file nor a packaged recipe.*tiny/stage2"):
        resolve_recipe("lare-tiny")
    with pytest.raises(ValueError, match="--recipes 'nope' is neither a folder nor a packaged recipe set.*paper"):
        resolve_recipe_set("nope")


@pytest.mark.slow
def test_wheel_installs_and_runs_from_a_scratch_folder(tmp_path):
    """`pip install` of the built wheel (not editable) into a fresh virtual environment; the `lare` it installs
    builds the tiny preset, trains one packaged tiny stage by name and shows the demo's help, from a folder
    outside the repository. The environment shares this one's site-packages for the dependencies (torch,
    transformers, ...), but imports lare_hf from the wheel: that is checked first."""
    source = tmp_path / "source"  # a copy, so that building leaves no build/ or egg-info in the checkout
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip_wheel, "--wheel-dir", str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("lare_hf-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def run(*command: str) -> str:
        result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    run(str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel))
    location = run(str(bin_dir / "python"), "-c", "import lare_hf; print(lare_hf.__file__)").strip()
    assert Path(location).is_relative_to(venv), f"lare_hf imported from {location}, not from the installed wheel"
    assert (Path(location).parent / "configs" / "tiny" / "stage1.yaml").is_file()

    assert "Wrote lare checkpoint" in run("lare", "build", "--preset", "tiny", "--output", "model")
    assert "--preset" in run("lare", "build", "--preset", "lare-1.5b", "--help")
    assert "--output" in run("lare", "demo", "--help")
    run("lare", "data", "synth", "--benchmark", "refocus_shapes", "--output", "data", "--num-train", "8",
        "--num-test", "2")  # fmt: skip
    run("lare", "train", "--config", "tiny/stage1", "--model", "model", "--train_file", "data/train.jsonl",
        "--output_dir", "stage1", "--max_steps", "2", "--save_steps", "2")  # fmt: skip
    assert (scratch / "stage1" / "model.safetensors").is_file()
    assert not (scratch / "outputs").exists()  # the recipe's own paths were overridden, nothing else written
