"""Semantic augmentation on the tiny preset (Sec. 3.2, Eq. 6-10): every term, their sum, gradients, round trip."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from transformers import AutoModelForImageTextToText

from conftest import make_image
from lare_hf import LaReConfig, LaReForConditionalGeneration
from lare_hf.build import build_tiny, save_checkpoint
from lare_hf.modeling.reconstruction import TINY_IMAGE_TOKENIZER_CONFIG

TERMS = ("alignment_loss", "image_reconstruction_loss", "text_reconstruction_loss")
MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is in the red box?"}]}
]


def training_batch(processor, size: int = 3, seed: int = 0):
    return processor.build_training_inputs(
        prompts=[MESSAGES] * size,
        answers=[str(index) for index in range(size)],
        images=[make_image(seed + index) for index in range(size)],
        rationales=[f"The red box is at the top left. It holds the digit {index}." for index in range(size)],
    )


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return build_tiny()


def test_every_term_finite_positive_and_weighted_sum(tiny):
    model, processor = tiny
    model.train()
    out = model(**training_batch(processor), compute_latent_losses=True)
    for name in ("lm_loss", *TERMS, "alignment_text_loss", "alignment_visual_loss"):
        value = getattr(out, name)
        assert value is not None and torch.isfinite(value) and value.item() > 0, name
    torch.testing.assert_close(out.alignment_loss, out.alignment_text_loss + out.alignment_visual_loss)
    config = model.config
    expected = (
        out.lm_loss
        + config.sym_loss_weight * out.alignment_loss
        + config.image_loss_weight * out.image_reconstruction_loss
        + config.text_loss_weight * out.text_reconstruction_loss
    )
    torch.testing.assert_close(out.loss, expected)
    assert (config.sym_loss_weight, config.image_loss_weight, config.text_loss_weight) == (1.0, 0.9, 0.9)


def test_gradients_reach_latent_modules_not_the_image_tokenizer(tiny):
    model, processor = tiny
    model.train()
    model.requires_grad_(True)
    model.reconstructor.image_tokenizer.requires_grad_(False)
    out = model(**training_batch(processor), compute_latent_losses=True)
    (out.alignment_loss + out.image_reconstruction_loss + out.text_reconstruction_loss).backward()
    for module in (model.model.extractor, model.reconstructor.unet, model.reconstructor.condition_proj):
        grads = [p.grad for p in module.parameters()]
        assert grads and all(g is not None for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.reconstructor.image_tokenizer.parameters())
    assert not model.reconstructor.image_tokenizer.training  # frozen tokenizer stays in eval mode


def test_zero_weight_terms_are_not_computed_and_missing_inputs_raise(tiny):
    model, processor = tiny
    batch = training_batch(processor)
    model.config.image_loss_weight = 0.0
    calls = []
    hook = model.reconstructor.register_forward_hook(lambda *args: calls.append(1))
    out = model(**batch, compute_latent_losses=True)
    hook.remove()
    assert out.image_reconstruction_loss is None and not calls
    assert out.alignment_loss is not None
    model.config.image_loss_weight = 0.9
    no_rationale = {k: v for k, v in batch.items() if not k.startswith("rationale")}
    with pytest.raises(ValueError, match="need the explicit rationale"):
        model(**no_rationale, compute_latent_losses=True)
    was_training = model.training
    plain = model.eval()(**no_rationale)  # plain evaluation on labels: latent losses skipped, next-token loss only
    assert plain.alignment_loss is None and torch.allclose(plain.loss, plain.lm_loss)
    # plain training on labels: the terms that need no rationale (L_img, L_sym's visual part); the text ones are 0
    trained = model.train()(**no_rationale)
    model.train(was_training)
    assert trained.image_reconstruction_loss > 0 and trained.alignment_visual_loss > 0
    assert trained.alignment_text_loss == 0 and trained.text_reconstruction_loss == 0
    config = model.config
    expected = (
        trained.lm_loss
        + config.sym_loss_weight * trained.alignment_loss
        + config.image_loss_weight * trained.image_reconstruction_loss
    )
    torch.testing.assert_close(trained.loss, expected)
    no_latents = processor.build_training_inputs([MESSAGES], ["1"], [make_image(0)], ["r"], num_latent_steps=0)
    with pytest.raises(ValueError, match="no latent steps"):
        model(**no_latents, compute_latent_losses=True)


def test_batch_of_one_alignment_is_defined(tiny):
    model, processor = tiny
    out = model(**training_batch(processor, size=1), compute_latent_losses=True)
    assert torch.isfinite(out.alignment_loss) and torch.isfinite(out.loss)


def test_unet_loss_drops_when_training_the_same_batch(tiny):
    model, processor = tiny
    model.train()
    batch = training_batch(processor, size=2)
    params = list(model.reconstructor.unet.parameters()) + list(model.reconstructor.condition_proj.parameters())
    optimizer = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for step in range(40):
        model.image_loss_draws = step % 4  # the same four (t, noise) draws in turn (`noise_seeds`)
        out = model(**batch, compute_latent_losses=True)
        optimizer.zero_grad()
        out.image_reconstruction_loss.backward()
        optimizer.step()
        losses.append(out.image_reconstruction_loss.item())
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses


def test_save_load_keeps_the_reconstructor_and_inference_only_checkpoints_drop_it(tiny, tmp_path):
    model, processor = tiny
    save_checkpoint(model, processor, str(tmp_path / "full"))
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "full")
    for name, tensor in model.reconstructor.state_dict().items():
        torch.testing.assert_close(reloaded.reconstructor.state_dict()[name], tensor)
    light, _ = build_tiny(overrides={"use_reconstructor": False})
    assert light.reconstructor is None
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in model.parameters())
    light.save_pretrained(tmp_path / "light")
    assert AutoModelForImageTextToText.from_pretrained(tmp_path / "light").reconstructor is None


def test_reconstruct_images_from_latents(tiny):
    model, processor = tiny
    out = model(**training_batch(processor, size=2))
    images = model.reconstruct_images(
        out.latent_embeds, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    size = model.config.reconstruction_image_size
    assert images.shape == (2, model.config.num_latent_steps, 3, size, size)
    assert images.min() >= 0 and images.max() <= 1


def test_from_components_takes_a_pretrained_image_tokenizer(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    vae = AutoencoderKL(**TINY_IMAGE_TOKENIZER_CONFIG)
    vae.save_pretrained(tmp_path / "kl16")
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=8, image_size=64))  # fmt: skip
    text = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=300))  # fmt: skip
    ids = {"image_token_id": 296, "latent_start_token_id": 297, "latent_token_id": 298, "latent_end_token_id": 299}
    from lare_hf.modeling.reconstruction import TINY_RECONSTRUCTOR_CONFIG

    model = LaReForConditionalGeneration.from_components(
        vision, text, special_token_ids=ids, image_tokenizer=str(tmp_path / "kl16"), extractor_hidden_size=None,
        extractor_num_heads=4,
        window_size=4, window_stride=2, reconstructor_config=TINY_RECONSTRUCTOR_CONFIG, reconstruction_image_size=64,
    )  # fmt: skip
    for name, tensor in vae.state_dict().items():
        torch.testing.assert_close(model.reconstructor.image_tokenizer.state_dict()[name], tensor)
    assert model.config.image_tokenizer_config["latent_channels"] == 16


def test_table7_unet_builds():
    from diffusers import UNet2DConditionModel

    config = LaReConfig()
    unet = UNet2DConditionModel(sample_size=config.reconstruction_image_size // 16, in_channels=16, out_channels=16,
                                **config.reconstructor_config)  # fmt: skip
    num_params = sum(p.numel() for p in unet.parameters())
    assert unet.config.cross_attention_dim == 768 and unet.config.layers_per_block == 3
    assert 50e6 < num_params < 200e6, num_params


def test_alignment_loss_is_eq6_on_the_forward_outputs(tiny):
    """L_sym of a forward is the alignment head's Eq. 6 on the forward's own latents, windows and rationale states:
    pooled latents of the rows with an image against their pooled window features (L_Z<->V) and, for the rows with
    a rationale, against the LM's pooled hidden states of it (L_Z<->T)."""
    from lare_hf.modeling.losses import mean_max_pool, symmetric_info_nce

    model, processor = tiny
    model.train()
    batch = training_batch(processor, size=4)
    batch["rationale_attention_mask"][1] = 0  # a sample without a rationale: only its visual part counts
    out = model(**batch, compute_latent_losses=True)
    tau = model.alignment_head.temperature
    pooled = mean_max_pool(out.latent_embeds.flatten(1, 2))
    visual = symmetric_info_nce(pooled, mean_max_pool(out.window_features.flatten(1, 2)), tau)
    text_rows = batch["rationale_attention_mask"].bool().any(dim=1)
    mask = batch["rationale_attention_mask"][text_rows]
    hidden = model.model.language_model(
        input_ids=batch["rationale_input_ids"][text_rows], attention_mask=mask, use_cache=False
    ).last_hidden_state
    text = symmetric_info_nce(pooled[text_rows], mean_max_pool(hidden, mask), tau)
    torch.testing.assert_close(out.alignment_visual_loss, visual)
    torch.testing.assert_close(out.alignment_text_loss, text)
    torch.testing.assert_close(out.alignment_loss, visual + text)


def test_loss_terms_table_names_the_output_fields_the_weights_and_the_logged_terms(tiny):
    from dataclasses import fields

    from lare_hf.modeling.latent_losses import LOSS_TERMS
    from lare_hf.modeling.modeling_lare import LaReCausalLMOutputWithPast
    from lare_hf.training.trainer import LOSS_COMPONENTS

    names = [term.name for term in LOSS_TERMS]
    output_fields = [field.name for field in fields(LaReCausalLMOutputWithPast)]
    assert output_fields[0] == "loss" and output_fields[1 : 1 + len(names)] == names
    assert list(LOSS_COMPONENTS) == names
    config = LaReConfig()
    assert all(term.weight in (None, "1") or isinstance(getattr(config, term.weight), float) for term in LOSS_TERMS)
    # the weighted sum reads its weights from the table: changing a weight in the config changes the sum
    model, processor = tiny
    model.train()
    model.config.window_loss_weight = 0.0
    out = model(**training_batch(processor), compute_latent_losses=True)
    losses = {name: getattr(out, name) for name in names[1:] if getattr(out, name) is not None}
    model.config.text_loss_weight = 0.25
    expected = out.lm_loss + sum(
        getattr(model.config, term.weight) * losses[term.name]
        for term in LOSS_TERMS
        if term.weight not in (None, "1") and term.name in losses
    )
    torch.testing.assert_close(model.weighted_loss(out.lm_loss, losses), expected)
    model.config.text_loss_weight = 0.9
