"""When the machine misbehaves: damaged checkpoints, a full disk, two runs into one folder, a killed run.

Real subprocesses, real signals and a real file size limit (`RLIMIT_FSIZE`, with SIGXFSZ ignored so a write fails
with EFBIG as on a full disk), on the tiny preset."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText
from transformers.testing_utils import CaptureLogger

from lare_hf.destinations import (
    CHECKPOINT_MANIFEST,
    LOCK_NAME,
    STAGING_NAME,
    checkpoint_damage,
    last_intact_checkpoint,
)
from lare_hf.output_lock import OutputFolderLockedError, OutputLock
from lare_hf.output_lock import logger as lock_logger
from lare_hf.training import run as run_module
from lare_hf.training.run import run_stage
from test_training import stage_args

TRAIN_STEPS = ("--max_steps", "4", "--save_steps", "2", "--seed", "3")


@pytest.fixture(scope="module")
def trained_run(tiny_checkpoint, reasoning_file, tmp_path_factory) -> Path:
    """A finished stage-II run of 4 steps with checkpoint-2 and checkpoint-4 (read-only for the tests)."""
    output = tmp_path_factory.mktemp("run") / "out"
    run_stage(*stage_args(2, tiny_checkpoint, reasoning_file, output, *TRAIN_STEPS))
    return output


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size)


def half(path: Path) -> None:
    truncate(path, path.stat().st_size // 2)


DAMAGES = {
    "weights-half": (lambda c: half(c / "model.safetensors"), "model.safetensors"),
    "weights-one-byte-short": (
        lambda c: truncate(c / "model.safetensors", (c / "model.safetensors").stat().st_size - 1),
        "model.safetensors",
    ),
    "weights-header-only": (lambda c: truncate(c / "model.safetensors", 4), "model.safetensors"),
    "optimizer-half": (lambda c: half(c / "optimizer.pt"), "optimizer.pt"),
    "scheduler-missing": (lambda c: (c / "scheduler.pt").unlink(), "scheduler.pt"),
    "trainer-state-half": (lambda c: half(c / "trainer_state.json"), "trainer_state.json"),
    "manifest-garbled": (lambda c: (c / CHECKPOINT_MANIFEST).write_text("{"), CHECKPOINT_MANIFEST),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_detected(trained_run, tmp_path, damage):
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(trained_run / "checkpoint-4", checkpoint)
    assert checkpoint_damage(checkpoint) is None
    apply, named = DAMAGES[damage]
    apply(checkpoint)
    found = checkpoint_damage(checkpoint)
    assert found is not None and named in found, found


def test_checkpoint_without_manifest_is_still_checked(trained_run, tmp_path):
    """Checkpoints written before the manifest existed: the safetensors header still tells a truncated file."""
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(trained_run / "checkpoint-4", checkpoint)
    (checkpoint / CHECKPOINT_MANIFEST).unlink()
    assert checkpoint_damage(checkpoint) is None
    half(checkpoint / "model.safetensors")
    assert "model.safetensors is truncated" in checkpoint_damage(checkpoint)


def test_resume_skips_a_truncated_latest_checkpoint(trained_run, tiny_checkpoint, reasoning_file, tmp_path):
    """The latest checkpoint's weights truncated (a crash mid-write): resume warns naming it, continues from the
    previous complete one and ends with the weights of the uninterrupted run."""
    output = tmp_path / "out"
    shutil.copytree(trained_run, output)
    for name in ("model.safetensors", "config.json"):
        (output / name).unlink()  # as if the run died before its final save
    half(output / "checkpoint-4" / "model.safetensors")
    assert last_intact_checkpoint(output)[0] == output / "checkpoint-2"
    with CaptureLogger(run_module.logger) as captured:
        run_stage(*stage_args(2, tiny_checkpoint, reasoning_file, output, *TRAIN_STEPS, "--resume", "True"))
    assert f"Skipping the damaged checkpoint {output / 'checkpoint-4'}" in captured.out
    assert "model.safetensors has 2" in captured.out and "bytes" in captured.out  # the manifest named the file
    assert str(output / "checkpoint-2") in captured.out
    straight, resumed = weights(trained_run), weights(output)
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert checkpoint_damage(output / "checkpoint-4") is None  # written again, whole


def test_resume_refuses_when_every_checkpoint_is_damaged(trained_run, tiny_checkpoint, reasoning_file, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(trained_run, output)
    for step in (2, 4):
        half(output / f"checkpoint-{step}" / "model.safetensors")
    with pytest.raises(ValueError, match=r"every checkpoint .* is damaged: .*checkpoint-4 .*checkpoint-2 .*Delete"):
        run_stage(*stage_args(2, tiny_checkpoint, reasoning_file, output, *TRAIN_STEPS, "--resume", "True"))


# ---------------------------------------------------------------- full disk (RLIMIT_FSIZE in a subprocess)
def lare(args: list[str], file_size_limit: int | None = None, **kwargs) -> subprocess.Popen:
    """`python -m lare_hf.cli ARGS` in a subprocess, optionally with every file it writes capped at a size."""

    def limit() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.RLIM_INFINITY))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "lare_hf.cli", *args], preexec_fn=limit, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs,
    )  # fmt: skip


def run_lare(args: list[str], file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    process = lare(args, file_size_limit)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def error_line(stderr: str) -> str:
    """The CLI's one-line `error: ...` (progress bars may be flushed after it)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines, stderr[-3000:]
    return lines[-1]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_args(model: str, data: str, output: Path, *extra: str) -> list[str]:
    """`lare train` with the arguments `stage_args(2, ...)` gives run_stage in-process (the same run)."""
    return ["train", "--config", "tiny/stage2", "--model_name_or_path", model,
            "--train_file", data, "--output_dir", str(output), "--max_steps", "2", "--per_device_train_batch_size",
            "2", "--learning_rate", "1e-2", "--projector_lr", "1e-2", "--latent_lr", "1e-2", "--language_model_lr",
            "1e-2", "--save_steps", "1000", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("fails_at", ["model.safetensors", "optimizer.pt"])
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(
    trained_run, tiny_checkpoint, reasoning_file, tmp_path, fails_at
):
    """Resuming a 4-step run to 6 steps, the step-6 checkpoint save hits the size limit (in the weights file, or in
    the optimizer state after the weights): the error says the disk is full and where, checkpoint-4 and the final
    model are untouched and loadable, and nothing half-written is left for --resume to pick up."""
    output = tmp_path / "out"
    shutil.copytree(trained_run, output)
    checkpoint = output / "checkpoint-4"
    weights_size = (checkpoint / "model.safetensors").stat().st_size
    optimizer_size = (checkpoint / "optimizer.pt").stat().st_size
    assert optimizer_size > weights_size + 4096
    limit = weights_size // 2 if fails_at == "model.safetensors" else weights_size + 4096
    before = snapshot(output)
    args = train_args(tiny_checkpoint, reasoning_file, output, "--max_steps", "6", "--save_steps", "2", "--seed", "3")
    result = run_lare([*args, "--resume", "True"], file_size_limit=limit)
    assert result.returncode == 2, result.stderr[-3000:]
    error = error_line(result.stderr)
    assert "The disk is full: writing checkpoint-6 to" in error and str(output) in error, error
    assert f"the last complete checkpoint {checkpoint} is intact" in error
    assert sorted(p.name for p in output.iterdir()) == sorted({p.split("/")[0] for p in before})  # nothing new
    assert snapshot(output) == before
    assert last_intact_checkpoint(output)[0] == checkpoint
    AutoModelForImageTextToText.from_pretrained(checkpoint)


@pytest.mark.slow
def test_full_disk_during_build_keeps_the_previous_checkpoint(tmp_path):
    output = tmp_path / "built"
    assert run_lare(["build", "--preset", "tiny", "--output", str(output)]).returncode == 0
    before = snapshot(output)
    limit = (output / "model.safetensors").stat().st_size // 2
    result = run_lare(["build", "--preset", "tiny", "--seed", "1", "--output", str(output), "--overwrite"], limit)
    assert result.returncode == 2, result.stderr[-3000:]
    error = error_line(result.stderr)
    assert "The disk is full: writing the checkpoint to" in error and str(output) in error, error
    assert "previous files are unchanged" in error
    assert snapshot(output) == before  # no staging folder, no lock, the same bytes
    AutoModelForImageTextToText.from_pretrained(output)


@pytest.mark.slow
def test_full_disk_during_merge_keeps_the_previous_merge(tiny_checkpoint, reasoning_file, tmp_path):
    adapters = tmp_path / "lora"
    run_stage(*stage_args(3, tiny_checkpoint, reasoning_file, adapters, "--max_steps", "1", "--lora", "True"))
    merged = tmp_path / "merged"
    assert run_lare(["merge", "--adapter", str(adapters), "--output", str(merged)]).returncode == 0
    before = snapshot(merged)
    limit = (merged / "model.safetensors").stat().st_size // 2
    result = run_lare(["merge", "--adapter", str(adapters), "--output", str(merged), "--overwrite"], limit)
    assert result.returncode == 2, result.stderr[-3000:]
    error = error_line(result.stderr)
    assert "The disk is full: writing the merged model to" in error and str(merged) in error, error
    assert snapshot(merged) == before


# ---------------------------------------------------------------- two runs, one folder
def wait_for(condition, timeout: float = 300.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended first: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
def test_second_run_into_a_locked_folder_refuses_and_a_dead_ones_lock_is_taken_over(
    tiny_checkpoint, reasoning_file, tmp_path
):
    output = tmp_path / "out"
    first = lare(train_args(tiny_checkpoint, reasoning_file, output, "--max_steps", "500", "--save_steps", "1000"))
    try:
        lock = output / LOCK_NAME
        wait_for(lambda: lock.is_file() and f'"pid": {first.pid}' in lock.read_text(), process=first)
        second = run_lare(train_args(tiny_checkpoint, reasoning_file, output, "--max_steps", "2"))
        assert second.returncode == 2
        error = error_line(second.stderr)
        assert f"{output} is being written by another LaRe run: pid {first.pid} on host" in error, error
        assert "Loading weights" not in second.stderr  # refused before loading anything
        built = run_lare(["build", "--preset", "tiny", "--output", str(output), "--overwrite"])
        assert built.returncode == 2 and f"pid {first.pid}" in built.stderr
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    assert (output / LOCK_NAME).is_file()  # a killed process leaves its lock file behind...
    third = run_lare(train_args(tiny_checkpoint, reasoning_file, output, "--max_steps", "2", "--overwrite", "True"))
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"Taking over the stale lock {output / LOCK_NAME} left by pid {first.pid}" in third.stderr
    assert "no longer running" in third.stderr
    assert not (output / LOCK_NAME).exists() and (output / "model.safetensors").is_file()


def test_lock_of_another_host_is_refused_naming_the_file(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-" + socket.gethostname()}))
    with pytest.raises(OutputFolderLockedError, match=f"another host.*delete {tmp_path / LOCK_NAME}"):
        OutputLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "x"}))
    with CaptureLogger(lock_logger) as captured, OutputLock(tmp_path, "test"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
        with pytest.raises(OutputFolderLockedError, match=f"pid {os.getpid()}"):
            OutputLock(tmp_path).acquire()  # a second holder in the same process is refused too
    assert f"left by pid {pid}" in captured.out and "no longer running" in captured.out
    assert not (tmp_path / LOCK_NAME).exists()


# ---------------------------------------------------------------- SIGKILL at real kill points, then resume
KILL_POINTS = {
    "after-checkpoint-2": lambda out: (out / "checkpoint-2").is_dir(),
    "during-checkpoint-4-save": lambda out: (out / ".partial-checkpoint-4").is_dir(),
    "after-checkpoint-4": lambda out: (out / "checkpoint-4").is_dir(),
}


@pytest.fixture(scope="module")
def straight_cli_run(tiny_checkpoint, reasoning_file, tmp_path_factory) -> Path:
    """The uninterrupted run as a `lare train` subprocess (the same threads as the killed ones: bit for bit)."""
    output = tmp_path_factory.mktemp("straight") / "out"
    result = run_lare(train_args(tiny_checkpoint, reasoning_file, output, *TRAIN_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
def test_sigkill_then_resume_is_bit_identical(straight_cli_run, tiny_checkpoint, reasoning_file, tmp_path, kill_point):
    """`lare train` killed with SIGKILL at a kill point, then `--resume True`: the same weights, bit for bit, as
    the uninterrupted run."""
    output = tmp_path / "out"
    args = train_args(tiny_checkpoint, reasoning_file, output, *TRAIN_STEPS)
    process = lare(args)
    try:
        wait_for(lambda: KILL_POINTS[kill_point](output), process=process)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    assert not (output / "model.safetensors").exists(), "the run ended before the kill point"
    result = run_lare([*args, "--resume", "True"])
    assert result.returncode == 0, result.stderr[-3000:]
    straight, resumed = weights(straight_cli_run), weights(output)
    for name in straight:
        assert torch.equal(resumed[name], straight[name]), name
    assert not (output / STAGING_NAME).exists() and not (output / ".partial-checkpoint-4").exists()


@pytest.mark.slow
def test_full_disk_during_export_lm_keeps_the_previous_export(tiny_checkpoint, tmp_path):
    exported = tmp_path / "lm"
    assert run_lare(["export-lm", "--model", tiny_checkpoint, "--output", str(exported)]).returncode == 0
    before = snapshot(exported)
    limit = (exported / "model.safetensors").stat().st_size // 2
    result = run_lare(["export-lm", "--model", tiny_checkpoint, "--output", str(exported), "--overwrite"], limit)
    assert result.returncode == 2, result.stderr[-3000:]
    error = error_line(result.stderr)
    assert "The disk is full: writing the exported language model to" in error and str(exported) in error, error
    assert snapshot(exported) == before
