"""LaRe under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (issue 24, item 3): gloo, fp32, DeepSpeed's CPU
accelerator.

Skipped where DeepSpeed is not installed (it is not a dependency of lare-hf; `pip install deepspeed` builds from its
source archive and compiles its CPU communication op with the C++ compiler on first use). With the data and helpers
of `test_fsdp.py`, every loss on (L_img included, its noise seeded per sample):
- ZeRO-2 and ZeRO-3: a stage IV-like SGD step on 2 + 2 rows gives the losses of one process with the 4 rows (mean
  over the ranks) and, after the step, the same full parameters;
- ZeRO-3, uneven ranks: image rows with rationales / only text rows (a phantom image row keeps the calls in step):
  the losses of one process with the 4 rows; image rows with rationales / an image row without one and a text-only
  row: both finish the step. A hang fails on the timeout.
"""

from __future__ import annotations

import os

import pytest
import torch

from test_fsdp import (
    LEARNING_RATE,
    LOSS_NAMES,
    UNEVEN_LOSSES,
    WORLD_SIZE,
    assert_text_only_rank_matches,
    global_batch,
    load_for_stage,
    loss_terms,
    run_ranks,
    uneven_batch,
)

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow
ZERO_STAGES = (2, 3)


def zero_engine(model, zero_stage: int):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {"type": "SGD", "params": {"lr": LEARNING_RATE}},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 clips to 1.0 by default; the reference does not clip
    }
    parameters = [param for param in model.parameters() if param.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=parameters, config=config)
    return engine


def full_parameters(engine) -> dict[str, torch.Tensor]:
    """Every parameter, whole (gathered one at a time under ZeRO-3)."""
    import deepspeed

    values = {}
    for name, parameter in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([parameter]):
            values[name] = parameter.detach().clone()
    return values


def worker(rank: int, port: int, checkpoint: str, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD_SIZE), DS_ACCELERATOR="cpu",
    )  # fmt: skip
    import deepspeed
    from transformers import AutoProcessor

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    processor = AutoProcessor.from_pretrained(checkpoint)
    results = {}
    for zero_stage in ZERO_STAGES:
        engine = zero_engine(load_for_stage(checkpoint, 4), zero_stage)
        outputs = engine(**global_batch(processor, 0, slice(2 * rank, 2 * rank + 2)), compute_latent_losses=True)
        engine.backward(outputs.loss)
        engine.step()
        results[f"zero{zero_stage}"] = loss_terms(outputs)
        parameters = full_parameters(engine)
        if rank == 0:
            torch.save(parameters, os.path.join(out_dir, f"zero{zero_stage}_parameters.pt"))
    for case, text_only in (("uneven_text_only", True), ("uneven_mixed", False)):
        engine = zero_engine(load_for_stage(checkpoint, 4), 3)
        outputs = engine(**uneven_batch(processor, rank, text_only), compute_latent_losses=True)
        engine.backward(outputs.loss)
        engine.step()
        results[case] = loss_terms(outputs, UNEVEN_LOSSES)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint, tmp_path_factory) -> tuple[list[dict], str]:
    out_dir = tmp_path_factory.mktemp("zero")
    return run_ranks(worker, tiny_checkpoint, out_dir, "ZeRO"), str(out_dir)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> dict:
    """One process with the 4 rows: the losses and the parameters after one SGD step; the uneven case's losses."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = load_for_stage(tiny_checkpoint, 4)
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=LEARNING_RATE)
    outputs = model(**global_batch(processor, 0, slice(0, 4)), compute_latent_losses=True)
    outputs.loss.backward()
    optimizer.step()
    results = {"losses": loss_terms(outputs)}
    results["parameters"] = {name: value.detach().clone() for name, value in model.named_parameters()}
    model = load_for_stage(tiny_checkpoint, 4)
    results["uneven_text_only"] = loss_terms(model(**uneven_batch(processor, -1), compute_latent_losses=True))
    return results


@pytest.mark.parametrize("zero_stage", ZERO_STAGES)
def test_zero_step_gives_the_single_process_losses_and_parameters(ranks, reference, zero_stage):
    per_rank, out_dir = ranks
    assert set(per_rank[0][f"zero{zero_stage}"]) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        mean = sum(rank[f"zero{zero_stage}"][name] for rank in per_rank) / WORLD_SIZE
        assert mean == pytest.approx(reference["losses"][name], abs=1e-5), name
    parameters = torch.load(os.path.join(out_dir, f"zero{zero_stage}_parameters.pt"))
    assert set(parameters) == set(reference["parameters"])
    for name, value in reference["parameters"].items():
        torch.testing.assert_close(parameters[name], value, atol=1e-5, rtol=0, msg=name)


def test_zero3_text_only_rank_gives_the_losses_of_one_process_with_the_combined_batch(ranks, reference):
    per_rank, _ = ranks
    expected = reference["uneven_text_only"]
    assert_text_only_rank_matches(per_rank, expected)


def test_zero3_uneven_ranks_finish_the_step(ranks):
    per_rank, _ = ranks
    for rank in per_rank:
        assert all(torch.isfinite(torch.tensor(value)) for value in rank["uneven_mixed"].values())
    assert per_rank[1]["uneven_mixed"]["text_reconstruction_loss"] == 0.0
