"""LaRe under FSDP2 (issue 24): `fully_shard` with `apply_fsdp2`'s wrap policy on 2 gloo CPU processes.

(a) Stage II- and stage IV-like steps on a global batch of 4 split 2 + 2 give, per step, the losses of one process
    holding the 4 rows (mean over the ranks) and, after the steps, the same full parameters. L_img is off in this part
    (image_loss_weight=0): its diffusion noise is drawn from each process's generator, so 2 + 2 rows cannot draw what
    4 rows draw in one process; the uneven part runs it.
(b) Uneven data: rank 0 holds image rows with rationales, rank 1 an image row without one and a text-only row, every
    latent loss on (L_img included): both ranks finish the step (a hang fails on the timeout instead of blocking).
    A rank whose whole batch is text-only would make one language-model pass where the others make K+1: the forward
    refuses it, naming the fix.
(c) The full state dict gathered on rank 0 (`get_model_state_dict(full_state_dict=True)`) loads into a plain
    single-process `LaReForConditionalGeneration`, which generates the tokens of the single-process reference.

The spawned processes run once per module and save what the tests check.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import chat, make_image

WORLD_SIZE = 2
TIMEOUT_S = 600
# Prompts, answers and rationales that tokenize to the same length, so 2 + 2 rows pad as 4 rows do.
PROMPTS = ["Which digit is in the square? 0", "Which digit is in the square? 1"]
ANSWERS = ["seven", "nine"]
RATIONALES = ["The square holds a seven.", "The square holds a nine."]
STEPS = 2
LEARNING_RATE = 0.05
LOSS_NAMES = ("loss", "lm_loss", "alignment_loss", "text_reconstruction_loss")

pytestmark = pytest.mark.slow


def global_batch(processor, step: int, rows: slice) -> dict[str, torch.Tensor]:
    """Rows `rows` of step `step`'s global batch of 4 image samples with rationales."""
    samples = [(4 * step + index, index % 2) for index in range(4)][rows]
    return processor.build_training_inputs(
        [chat(make_image(seed), PROMPTS[kind]) for seed, kind in samples],
        [ANSWERS[kind] for _, kind in samples],
        rationales=[RATIONALES[kind] for _, kind in samples],
    )


def uneven_batch(processor, rank: int) -> dict[str, torch.Tensor]:
    """Rank 0: two image rows with rationales; rank 1: an image row without a rationale and a text-only row."""
    if rank == 0:
        prompts = [chat(make_image(20), PROMPTS[0]), chat(make_image(21), PROMPTS[1])]
        rationales = RATIONALES
    else:
        prompts = [chat(make_image(22), PROMPTS[0]), chat(None, PROMPTS[1])]
        rationales = [None, None]
    return processor.build_training_inputs(prompts, ANSWERS, rationales=rationales)


def load_for_stage(checkpoint: str, stage: int):
    """The checkpoint in training mode with the stage's trainable modules, L_img off (see the module docstring)."""
    from transformers import AutoModelForImageTextToText

    from lare_hf.training.trainer import StageIILatentAlignmentTrainer, StageIVReasoningTrainer

    model = AutoModelForImageTextToText.from_pretrained(checkpoint, image_loss_weight=0.0)
    trainer_class = {2: StageIILatentAlignmentTrainer, 4: StageIVReasoningTrainer}[stage]
    trainer_class.configure_model(model)
    return model.train()


def train_steps(model, processor, rows: slice) -> list[dict[str, float]]:
    """`STEPS` SGD steps on rows `rows` of each global batch; the loss terms of each step."""
    optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=LEARNING_RATE)
    history = []
    for step in range(STEPS):
        outputs = model(**global_batch(processor, step, rows), compute_latent_losses=True)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append({name: float(getattr(outputs, name).detach()) for name in LOSS_NAMES})
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
        from transformers import AutoModelForImageTextToText

        from lare_hf.training.trainer import StageIVReasoningTrainer

        model = AutoModelForImageTextToText.from_pretrained(checkpoint)  # every latent loss on, L_img included
        StageIVReasoningTrainer.configure_model(model)
        model = apply_fsdp2(model.train(), mesh)
        optimizer = torch.optim.SGD([param for param in model.parameters() if param.requires_grad], lr=LEARNING_RATE)
        outputs = model(**uneven_batch(processor, rank), compute_latent_losses=True)
        outputs.loss.backward()
        optimizer.step()
        results["uneven"] = {
            name: float(value.detach())
            for name in ("loss", "image_reconstruction_loss", "text_reconstruction_loss", "alignment_loss")
            if (value := getattr(outputs, name)) is not None
        }
        # both ranks text-only: refused with the fix named (one text-only rank would hang the others)
        try:
            model(**processor.build_training_inputs([chat(None, PROMPTS[0])], ANSWERS[:1]), compute_latent_losses=True)
        except ValueError as error:
            results["text_only_error"] = str(error)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tiny_checkpoint, tmp_path_factory) -> tuple[list[dict], str]:
    """Run the 2 FSDP2 processes; a process still running after TIMEOUT_S (a hang) is killed and fails the test."""
    out_dir = tmp_path_factory.mktemp("fsdp")
    context = mp.spawn(worker, args=(free_port(), tiny_checkpoint, str(out_dir)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"The FSDP2 processes did not finish within {TIMEOUT_S}s (a collective mismatch hangs).")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)], str(out_dir)


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


def test_uneven_ranks_finish_the_step_with_finite_losses(ranks):
    per_rank, _ = ranks
    for rank in per_rank:
        assert set(rank["uneven"]) == {
            "loss",
            "image_reconstruction_loss",
            "text_reconstruction_loss",
            "alignment_loss",
        }
        assert all(torch.isfinite(torch.tensor(value)) for value in rank["uneven"].values())
    assert per_rank[1]["uneven"]["text_reconstruction_loss"] == 0.0  # no rationale on rank 1: masked, weight 0
    assert per_rank[0]["uneven"]["text_reconstruction_loss"] > 0


def test_a_text_only_batch_under_fsdp_is_refused_with_the_fix_named(ranks):
    per_rank, _ = ranks
    for rank in per_rank:
        assert "at least one image row" in rank.get("text_only_error", "")


def test_gathered_state_dict_loads_into_a_plain_model_that_generates_the_same_tokens(
    ranks, reference, tiny_checkpoint
):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    _, out_dir = ranks
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(tiny_checkpoint, image_loss_weight=0.0)
    model.load_state_dict(torch.load(os.path.join(out_dir, "stage4_state.pt")), strict=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # still tied
    assert torch.equal(generate_tokens(model, processor), reference["stage4_tokens"])
