"""LaRe under FSDP2 (issue 24): `fully_shard` with `apply_fsdp2`'s wrap policy on 2 gloo CPU processes.

(a) Stage II- and stage IV-like steps on a global batch of 4 split 2 + 2, every loss on (L_img included: its noise
    and timesteps are seeded per sample, `reconstruction.noise_seeds`), give, per step, the losses of one process
    holding the 4 rows (mean over the ranks) and, after the steps, the same full parameters.
(b) Uneven data, every latent loss on; a hang fails on the timeout instead of blocking:
    - rank 0 holds image rows with rationales, rank 1 text-only rows (it gets a phantom image row so that it makes
      the same module calls, `synchronised_calls`): the losses are those of one process holding the 4 rows;
    - rank 0 holds image rows with rationales, rank 1 an image row without one and a text-only row;
    - both ranks text-only: both finish.
(c) The full state dict gathered on rank 0 (`get_model_state_dict(full_state_dict=True)`) loads into a plain
    single-process `LaReForConditionalGeneration`, which generates the tokens of the single-process reference.

The spawned processes run once per module and save what the tests check.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import chat, free_port, make_image

WORLD_SIZE = 2
TIMEOUT_S = 600
# Prompts, answers and rationales that tokenize to the same length, so 2 + 2 rows pad as 4 rows do.
PROMPTS = ["Which digit is in the square? 0", "Which digit is in the square? 1"]
ANSWERS = ["seven", "nine"]
RATIONALES = ["The square holds a seven.", "The square holds a nine."]
STEPS = 2
LEARNING_RATE = 0.05
LOSS_NAMES = ("loss", "lm_loss", "alignment_loss", "text_reconstruction_loss", "image_reconstruction_loss")
UNEVEN_LOSSES = ("loss", "lm_loss", "image_reconstruction_loss", "text_reconstruction_loss", "alignment_loss")

pytestmark = pytest.mark.slow


def global_batch(processor, step: int, rows: slice) -> dict[str, torch.Tensor]:
    """Rows `rows` of step `step`'s global batch of 4 image samples with rationales."""
    samples = [(4 * step + index, index % 2) for index in range(4)][rows]
    return processor.build_training_inputs(
        [chat(make_image(seed), PROMPTS[kind]) for seed, kind in samples],
        [ANSWERS[kind] for _, kind in samples],
        rationales=[RATIONALES[kind] for _, kind in samples],
    )


def uneven_batch(processor, rank: int, text_only: bool = False) -> dict[str, torch.Tensor]:
    """Rank 0: two image rows with rationales; rank 1: an image row without a rationale and a text-only row, or
    (`text_only`) two text-only rows. Rank -1: the 4 rows of rank 0 and of rank 1 (`text_only`) in one batch."""
    image_prompts = [chat(make_image(20), PROMPTS[0]), chat(make_image(21), PROMPTS[1])]
    text_prompts = [chat(None, PROMPTS[0]), chat(None, PROMPTS[1])]
    if rank == -1:
        return processor.build_training_inputs(
            image_prompts + text_prompts, ANSWERS + ANSWERS, rationales=RATIONALES + [None, None]
        )
    if rank == 0:
        prompts, rationales = image_prompts, RATIONALES
    elif text_only:
        prompts, rationales = text_prompts, [None, None]
    else:
        prompts, rationales = [chat(make_image(22), PROMPTS[0]), chat(None, PROMPTS[1])], [None, None]
    return processor.build_training_inputs(prompts, ANSWERS, rationales=rationales)


def load_for_stage(checkpoint: str, stage: int):
    """The checkpoint in training mode with the stage's trainable modules, every loss on."""
    from transformers import AutoModelForImageTextToText

    from lare_hf.training.trainer import StageIILatentAlignmentTrainer, StageIVReasoningTrainer

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    trainer_class = {2: StageIILatentAlignmentTrainer, 4: StageIVReasoningTrainer}[stage]
    trainer_class.configure_model(model)
    return model.train()


def loss_terms(outputs, names=LOSS_NAMES) -> dict[str, float]:
    return {name: float(value.detach()) for name in names if (value := getattr(outputs, name)) is not None}


def train_steps(model, processor, rows: slice) -> list[dict[str, float]]:
    """`STEPS` SGD steps on rows `rows` of each global batch; the loss terms of each step."""
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=LEARNING_RATE)
    history = []
    for step in range(STEPS):
        outputs = model(**global_batch(processor, step, rows), compute_latent_losses=True)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(loss_terms(outputs))
    return history


def generate_tokens(model, processor) -> torch.Tensor:
    inputs = processor(
        text=[
            processor.apply_chat_template(chat(make_image(30), PROMPTS[0]), add_generation_prompt=True, tokenize=False)
        ],
        images=[make_image(30)],
        return_tensors="pt",
    )
    return model.eval().generate(**inputs, max_new_tokens=6, do_sample=False)


def worker(rank: int, port: int, checkpoint: str, out_dir: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoProcessor

    from lare_hf.training.fsdp import apply_fsdp2

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        processor = AutoProcessor.from_pretrained(checkpoint)
        rows = slice(2 * rank, 2 * rank + 2)
        results = {}
        for stage in (2, 4):
            model = apply_fsdp2(load_for_stage(checkpoint, stage), mesh)
            results[f"stage{stage}"] = train_steps(model, processor, rows)
            state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(state, os.path.join(out_dir, f"stage{stage}_state.pt"))
        for case, text_only in (("uneven_text_only", True), ("uneven_mixed", False)):
            model = apply_fsdp2(load_for_stage(checkpoint, 4), mesh)
            optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=0.05)
            outputs = model(**uneven_batch(processor, rank, text_only), compute_latent_losses=True)
            outputs.loss.backward()
            optimizer.step()
            results[case] = loss_terms(outputs, UNEVEN_LOSSES)
            results[f"{case}_logits_shape"] = tuple(outputs.logits.shape)
        # both ranks text-only: the same calls on both (no phantom row: no rank has images)
        outputs = model(**processor.build_training_inputs([chat(None, PROMPTS[rank])], ANSWERS[:1]))
        outputs.loss.backward()
        results["text_only"] = loss_terms(outputs, UNEVEN_LOSSES)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def assert_text_only_rank_matches(per_rank: list[dict], expected: dict[str, float]) -> None:
    """Rank 1 text-only beside rank 0's image rows: L_ntp and L_sym averaged over the ranks, L_img and L_text on
    rank 0 (which holds all their rows) equal one process with the combined batch; rank 1's are 0."""
    for name in ("lm_loss", "alignment_loss"):
        mean = sum(rank["uneven_text_only"][name] for rank in per_rank) / WORLD_SIZE
        assert mean == pytest.approx(expected[name], abs=1e-5), name
    for name in ("image_reconstruction_loss", "text_reconstruction_loss"):
        assert per_rank[0]["uneven_text_only"][name] == pytest.approx(expected[name], abs=1e-5), name
        assert per_rank[1]["uneven_text_only"][name] == 0.0, name


def run_ranks(worker, tiny_checkpoint: str, out_dir, engine: str) -> list[dict]:
    """Run `worker` on WORLD_SIZE processes and load what each rank saved (`rank{r}.pt` in `out_dir`); a process still
    running after TIMEOUT_S (a hang) is killed and fails the test."""
    context = mp.spawn(worker, args=(free_port(), tiny_checkpoint, str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"The {engine} processes did not finish within {TIMEOUT_S}s (a collective mismatch hangs).")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint, tmp_path_factory) -> tuple[list[dict], str]:
    """The 2 FSDP2 processes' results (`run_ranks`)."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    return run_ranks(worker, tiny_checkpoint, out_dir, "FSDP2"), str(out_dir)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint) -> dict:
    """One process, the global batches of 4 rows: the losses, the parameters and the generated tokens."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    results = {}
    for stage in (2, 4):
        model = load_for_stage(tiny_checkpoint, stage)
        results[f"stage{stage}_initial"] = {name: value.detach().clone() for name, value in model.state_dict().items()}
        results[f"stage{stage}"] = train_steps(model, processor, slice(0, 4))
        results[f"stage{stage}_state"] = {name: value.detach().clone() for name, value in model.state_dict().items()}
        results[f"stage{stage}_tokens"] = generate_tokens(model, processor)
    model = load_for_stage(tiny_checkpoint, 4)
    results["uneven_text_only"] = loss_terms(model(**uneven_batch(processor, -1), compute_latent_losses=True))
    return results


@pytest.mark.parametrize("stage", [2, 4])
def test_fsdp2_steps_give_the_single_process_losses_and_parameters(ranks, reference, stage):
    per_rank, out_dir = ranks
    for step in range(STEPS):
        for name in LOSS_NAMES:
            mean = sum(rank[f"stage{stage}"][step][name] for rank in per_rank) / WORLD_SIZE
            assert mean == pytest.approx(reference[f"stage{stage}"][step][name], abs=1e-5), (step, name)
    state = torch.load(os.path.join(out_dir, f"stage{stage}_state.pt"))
    expected = reference[f"stage{stage}_state"]
    assert set(state) == set(expected)
    changed = 0
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, atol=1e-5, rtol=0, msg=name)
        changed += not torch.equal(value, reference[f"stage{stage}_initial"][name])
    assert changed > 0  # the steps trained something


def test_a_text_only_rank_gives_the_losses_of_one_process_with_the_combined_batch(ranks, reference):
    """Rank 1 holds only text rows: it runs a phantom image row (no hang), its outputs are its own 2 rows, and the
    losses are those of one process with the 4 rows: L_ntp and L_sym averaged over the ranks (equal answer tokens
    per rank; L_sym gathers its negatives), L_img and L_text (all their rows on rank 0) on rank 0, 0 on rank 1."""
    per_rank, _ = ranks
    expected = reference["uneven_text_only"]
    assert set(per_rank[0]["uneven_text_only"]) == set(UNEVEN_LOSSES) == set(expected)
    assert_text_only_rank_matches(per_rank, expected)
    assert per_rank[1]["uneven_text_only_logits_shape"][0] == 2  # the phantom row is not in the outputs


def test_uneven_ranks_finish_the_step_with_finite_losses(ranks):
    per_rank, _ = ranks
    for rank in per_rank:
        assert set(rank["uneven_mixed"]) == set(UNEVEN_LOSSES)
        assert all(torch.isfinite(torch.tensor(value)) for value in rank["uneven_mixed"].values())
        assert torch.isfinite(torch.tensor(rank["text_only"]["loss"]))  # both ranks text-only
    assert per_rank[1]["uneven_mixed"]["text_reconstruction_loss"] == 0.0  # no rationale on rank 1: masked, weight 0
    assert per_rank[0]["uneven_mixed"]["text_reconstruction_loss"] > 0


def test_gathered_state_dict_loads_into_a_plain_model_that_generates_the_same_tokens(
    ranks, reference, tiny_checkpoint
):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, out_dir = ranks
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint)
    model.load_state_dict(torch.load(os.path.join(out_dir, "stage4_state.pt")), strict=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    assert torch.equal(generate_tokens(model, processor), reference["stage4_tokens"])
