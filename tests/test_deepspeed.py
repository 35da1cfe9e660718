"""LaRe under DeepSpeed ZeRO-3 on 2 CPU processes (issue 24, item 3): gloo, fp32, DeepSpeed's CPU accelerator.

Skipped where DeepSpeed is not installed (it is not a dependency of lare-hf; `pip install deepspeed` builds from its
source archive and compiles its CPU communication op with the C++ compiler on first use). Checks, with the data and
helpers of `test_fsdp.py`: a stage IV-like step on 2 + 2 rows gives the losses of one process with the 4 rows, and
uneven ranks (image rows with rationales / an image row without one and a text-only row, every loss on) finish the
step (a hang fails on the timeout).
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from test_fsdp import LEARNING_RATE, LOSS_NAMES, WORLD_SIZE, free_port, global_batch, load_for_stage, uneven_batch

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
TIMEOUT_S = 600


def zero3(model):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "SGD", "params": {"lr": LEARNING_RATE}},
        "zero_allow_untested_optimizer": True,
    }
    parameters = [param for param in model.parameters() if param.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameters, config=config)
    return engine


def worker(rank: int, port: int, checkpoint: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    import deepspeed
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from lare_hf.training.trainer import StageIVReasoningTrainer

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    processor = AutoProcessor.from_pretrained(checkpoint)
    results = {}
    engine = zero3(load_for_stage(checkpoint, 4))
    outputs = engine(**global_batch(processor, 0, slice(2 * rank, 2 * rank + 2)), compute_latent_losses=True)
    engine.backward(outputs.loss)
    engine.step()
    results["stage4"] = {name: float(getattr(outputs, name).detach()) for name in LOSS_NAMES}
    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    StageIVReasoningTrainer.configure_model(model)
    engine = zero3(model.train())
    outputs = engine(**uneven_batch(processor, rank), compute_latent_losses=True)
    engine.backward(outputs.loss)
    engine.step()
    results["uneven"] = {name: float(getattr(outputs, name).detach()) for name in LOSS_NAMES}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("zero3")
    context = mp.spawn(worker, args=(free_port(), tiny_checkpoint, str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"The ZeRO-3 processes did not finish within {TIMEOUT_S}s (a collective mismatch hangs).")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def test_zero3_step_gives_the_single_process_losses(ranks, tiny_checkpoint):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = load_for_stage(tiny_checkpoint, 4)
    outputs = model(**global_batch(processor, 0, slice(0, 4)), compute_latent_losses=True)
    for name in LOSS_NAMES:
        mean = sum(rank["stage4"][name] for rank in ranks) / WORLD_SIZE
        assert mean == pytest.approx(float(getattr(outputs, name)), abs=1e-5), name


def test_zero3_uneven_ranks_finish_the_step(ranks):
    for rank in ranks:
        assert all(torch.isfinite(torch.tensor(value)) for value in rank["uneven"].values())
    assert ranks[1]["uneven"]["text_reconstruction_loss"] == 0.0
