"""L_sym's in-batch negatives across processes (issue 9, item 4).

Two gloo processes on CPU (torch.multiprocessing.spawn) each hold half of a batch; the results are compared with one
process holding the whole batch: the mean of the per-rank losses and, after DDP's gradient averaging, every parameter
gradient (projection and temperature) must be the single-process ones. The gradient that reaches a rank's own input
rows is world_size times the single-process one (the all_gather backward sums the ranks' losses; DDP then divides).
The spawned processes run once per module and save what the tests check.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from conftest import chat, free_port, make_image
from lare_hf.modeling.configuration_lare import LaReConfig
from lare_hf.modeling.losses import LaReAlignmentHead, gather_rows

WORLD_SIZE = 2
HIDDEN = 16
# Two samples whose prompts and rationales tokenize to the same length: one batch of 2 has no padding, so it matches
# two batches of 1 exactly.
PROMPTS = ["Which digit is in the square? 0", "Which digit is in the square? 1"]
ANSWERS = ["seven", "nine"]
RATIONALES = ["The square holds a seven.", "The square holds a nine."]
# Rows of the 4-sample batch per rank: an even split, and an uneven one (1 + 3 rows).
EVEN_SPLIT = [(0, 2), (2, 4)]
UNEVEN_SPLIT = [(0, 1), (1, 4)]
EMPTY_RANK_SPLIT = [(0, 0), (0, 4)]  # rank 0 has no sample (e.g. none with a rationale) but joins the gather


class PooledAlignment(nn.Module):
    """A trainable projection of the latents followed by the alignment head (learnable temperature)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.projection = nn.Linear(HIDDEN, HIDDEN)
        self.head = LaReAlignmentHead(LaReConfig(alignment_temperature=0.1, learnable_temperature=True))

    def forward(self, latents, text, text_mask, visual):
        return self.head(self.projection(latents), None, text, text_mask, visual, None)


def alignment_inputs() -> dict[str, torch.Tensor]:
    """A global batch of 4: latents, rationale hidden states with padding, window features."""
    generator = torch.Generator().manual_seed(1)
    text_mask = torch.ones(4, 6, dtype=torch.long)
    text_mask[1, 4:] = 0
    text_mask[3, 2:] = 0
    return {
        "latents": torch.randn(4, 3, HIDDEN, generator=generator),
        "text": torch.randn(4, 6, HIDDEN, generator=generator),
        "text_mask": text_mask,
        "visual": torch.randn(4, 5, HIDDEN, generator=generator),
    }


def run_alignment(module: nn.Module, rows: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Forward + backward on `rows` of the global batch; the losses and the gradients of inputs and parameters."""
    inputs = alignment_inputs()
    if rows is not None:
        inputs = {name: value[rows[0] : rows[1]] for name, value in inputs.items()}
    latents = inputs["latents"].requires_grad_()
    text = inputs["text"].requires_grad_()
    total, z_t, z_v = module(latents, text, inputs["text_mask"], inputs["visual"])
    total.backward()
    inner = module.module if isinstance(module, DistributedDataParallel) else module
    return {
        "total": total.detach(),
        "z_t": z_t.detach(),
        "z_v": z_v.detach(),
        "latents_grad": latents.grad,
        "text_grad": text.grad,
        "projection_grad": inner.projection.weight.grad.clone(),
        "logit_scale_grad": inner.head.logit_scale.grad.clone(),
    }


def model_batch(processor, indices: list[int], with_rationale: list[bool] | None = None) -> dict[str, torch.Tensor]:
    with_rationale = with_rationale or [True] * len(indices)
    return processor.build_training_inputs(
        [chat(make_image(index), PROMPTS[index]) for index in indices],
        [ANSWERS[index] for index in indices],
        rationales=[RATIONALES[index] if keep else None for index, keep in zip(indices, with_rationale)],
    )


# A mixed global batch: rank 0 holds two samples with rationales, rank 1 one sample without a rationale, so only
# rank 0 has rows for L_sym's text part (rank 1 must still join its gather, or the ranks' collectives fall out of step).
MIXED_RANKS = [([0, 1], [True, True]), ([0], [False])]


def warnings_at_batch_of_one() -> tuple[list[float], int]:
    """Two L_sym evaluations on a batch of one in this process: their losses and how many warnings were logged."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    losses_logger = logging.getLogger("lare_hf.modeling.losses")
    losses_logger.addHandler(handler)
    try:
        head = LaReAlignmentHead(LaReConfig())
        values = [float(head(torch.randn(1, 3, 8), None, None, None, torch.randn(1, 5, 8), None)[0]) for _ in "ab"]
    finally:
        losses_logger.removeHandler(handler)
    return values, sum("L_sym (Eq. 6) is inactive" in record.getMessage() for record in records)


def worker(rank: int, world_size: int, port: int, checkpoint: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # A fresh process: the once-per-process warning has not been logged yet. No process group exists yet either.
    results: dict = {"batch_of_one": warnings_at_batch_of_one()}
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        gathered, offset, world = gather_rows(torch.full((rank + 1, 2), float(rank)))
        results["gather"] = (gathered, offset, world)
        results["even"] = run_alignment(DistributedDataParallel(PooledAlignment()), EVEN_SPLIT[rank])
        results["uneven"] = run_alignment(PooledAlignment(), UNEVEN_SPLIT[rank])
        results["empty_rank"] = run_alignment(PooledAlignment(), EMPTY_RANK_SPLIT[rank])

        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
        processor = AutoProcessor.from_pretrained(checkpoint)
        outputs = model(**model_batch(processor, [rank]), compute_latent_losses=True)
        outputs.alignment_loss.backward()
        extractor_grad = sum(
            param.grad.abs().sum() for param in model.model.extractor.parameters() if param.grad is not None
        )
        results["model"] = {
            "alignment_loss": outputs.alignment_loss.detach(),
            "alignment_text_loss": outputs.alignment_text_loss.detach(),
            "alignment_visual_loss": outputs.alignment_visual_loss.detach(),
            "extractor_grad": float(extractor_grad),
        }
        model.zero_grad()
        outputs = model(**model_batch(processor, *MIXED_RANKS[rank]), compute_latent_losses=True)
        outputs.alignment_loss.backward()
        results["mixed"] = {
            name: getattr(outputs, name).detach()
            for name in ("alignment_loss", "alignment_text_loss", "alignment_visual_loss")
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("distributed_alignment")
    mp.spawn(worker, args=(WORLD_SIZE, free_port(), tiny_checkpoint, str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def test_gather_rows_concatenates_ranks_in_order_with_unequal_sizes(ranks):
    expected = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    for rank, result in enumerate(ranks):
        gathered, offset, world = result["gather"]
        torch.testing.assert_close(gathered, expected)
        assert (offset, world) == ([0, 1][rank], WORLD_SIZE)
    assert gather_rows(torch.ones(3, 2))[1:] == (0, 1)  # no process group: the local rows


@pytest.mark.parametrize(
    "split_name, split", [("even", EVEN_SPLIT), ("uneven", UNEVEN_SPLIT), ("empty_rank", EMPTY_RANK_SPLIT)]
)
def test_two_processes_give_the_single_process_loss_and_gradients(ranks, split_name, split):
    reference = run_alignment(PooledAlignment())
    results = [result[split_name] for result in ranks]
    for name in ("total", "z_t", "z_v", "logit_scale_grad"):
        mean = torch.stack([result[name] for result in results]).mean(0)
        torch.testing.assert_close(mean, reference[name], msg=f"{split_name}: {name}")
    for name in ("latents_grad", "text_grad"):
        local = torch.cat([result[name] for result in results])
        torch.testing.assert_close(local / WORLD_SIZE, reference[name], msg=f"{split_name}: {name}")
    if split_name == "even":
        # DDP averaged the projection's gradient over the ranks: the single-process gradient on every rank.
        for result in results:
            torch.testing.assert_close(result["projection_grad"], reference["projection_grad"])
        # Each rank alone (local negatives only) would give a different loss: the gather changed something.
        local_only = [run_alignment(PooledAlignment(), rows)["total"] for rows in split]
        assert not torch.allclose(torch.stack(local_only).mean(), reference["total"])


def test_global_batch_of_one_warns_once_that_l_sym_is_inactive(ranks):
    for result in ranks:
        values, warnings = result["batch_of_one"]
        assert values == [0.0, 0.0]
        assert warnings == 1


def test_model_at_per_device_batch_one_trains_l_sym_across_two_processes(ranks, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    reference = model(**model_batch(processor, [0, 1]), compute_latent_losses=True)
    assert reference.alignment_loss > 0
    for name in ("alignment_loss", "alignment_text_loss", "alignment_visual_loss"):
        per_rank = torch.stack([result["model"][name] for result in ranks])
        assert (per_rank > 0).all(), (name, per_rank)
        torch.testing.assert_close(per_rank.mean(), getattr(reference, name).detach(), msg=name)
    assert all(result["model"]["extractor_grad"] > 0 for result in ranks)


def test_ranks_without_rationales_join_the_text_gather(ranks, tiny_model_and_processor):
    model, processor = tiny_model_and_processor
    reference = model(**model_batch(processor, [0, 1, 0], [True, True, False]), compute_latent_losses=True)
    for name in ("alignment_text_loss", "alignment_visual_loss"):
        per_rank = torch.stack([result["mixed"][name] for result in ranks])
        torch.testing.assert_close(per_rank.mean(), getattr(reference, name).detach(), msg=name)
    assert float(ranks[1]["mixed"]["alignment_text_loss"]) == 0.0  # no rationale on rank 1: no text query there
    assert float(ranks[0]["mixed"]["alignment_text_loss"]) > 0
