"""Appendix B: the Extractor is 1536 wide with 12 heads for every backbone; other LM widths are projected in and out."""

from __future__ import annotations

import pytest
import torch

from conftest import make_image
from lare_hf import LaReConfig
from lare_hf.build import build_tiny, load_preset

# Qwen2.5-0.5B / 1.5B / 7B hidden sizes (their config.json).
BACKBONE_WIDTHS = {"lare-0.5b": 896, "lare-1.5b": 1536, "lare-7b": 3584}
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which colour?"}]}]


@pytest.mark.parametrize("preset", sorted(BACKBONE_WIDTHS))
def test_paper_presets_use_the_appendix_b_extractor(preset):
    model_fields = load_preset(preset)["model"]
    assert model_fields["extractor_hidden_size"] == 1536
    assert model_fields["extractor_num_heads"] == 12
    assert model_fields["extractor_num_layers"] == 2


@pytest.mark.parametrize("preset", sorted(BACKBONE_WIDTHS))
def test_preset_extractor_validates_against_its_backbone(preset):
    """The preset's Extractor fields are accepted next to a text config of the backbone's width."""
    model_fields = load_preset(preset)["model"]
    width = BACKBONE_WIDTHS[preset]
    config = LaReConfig(
        text_config={"model_type": "qwen2", "hidden_size": width, "num_attention_heads": 2, "num_key_value_heads": 2},
        vision_config={
            "model_type": "clip_vision_model",
            "image_size": 64,
            "patch_size": 8,
            "hidden_size": 32,
            "num_attention_heads": 4,
        },
        image_seq_length=64,
        window_size=4,
        extractor_hidden_size=model_fields["extractor_hidden_size"],
        extractor_num_heads=model_fields["extractor_num_heads"],
        extractor_num_layers=model_fields["extractor_num_layers"],
    )
    assert config.extractor_hidden_size == 1536 and config.extractor_num_heads == 12


def test_extractor_width_differs_from_the_lm_width_projects_in_and_out_and_trains():
    """An Extractor wider than the LM (as 1536 vs Qwen2.5-0.5B's 896): attention runs at its own width, the
    in / out projections exist and receive gradients, and the latents come back at the LM width."""
    torch.manual_seed(0)
    model, processor = build_tiny({"extractor_hidden_size": 96, "extractor_num_heads": 12})
    extractor = model.model.extractor
    assert extractor.input_proj.weight.shape == (96, 64)
    assert extractor.output_proj.weight.shape == (64, 96)
    assert extractor.layers[0].self_attn.embed_dim == 96 and extractor.layers[0].self_attn.num_heads == 12
    batch = processor.build_training_inputs(
        prompts=[MESSAGES] * 2,
        answers=["red", "blue"],
        images=[make_image(0), make_image(1)],
        rationales=["The start cell is red.", "The start cell is blue."],
    )
    model.train()
    out = model(**batch, compute_latent_losses=True)
    assert out.latent_embeds.shape[-1] == 64
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name in ("input_proj", "output_proj", "state_proj"):
        grad = getattr(extractor, name).weight.grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_extractor_heads_must_divide_its_width():
    with pytest.raises(ValueError, match="extractor_num_heads=12"):
        build_tiny({"extractor_hidden_size": 100, "extractor_num_heads": 12})


def test_lm_width_is_the_default_extractor_width():
    model, _ = build_tiny()
    assert model.config.extractor_hidden_size is None
    assert isinstance(model.model.extractor.input_proj, torch.nn.Identity)


def _tiny_parts(lm_width: int, lm_heads: int):
    """A tiny CLIP vision tower and a one-layer Qwen2 LM of the given width (as Qwen2.5-0.5B / 7B: 896 / 3584)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen2Config, Qwen2ForCausalLM

    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, patch_size=8, image_size=64))  # fmt: skip
    text = Qwen2ForCausalLM(Qwen2Config(hidden_size=lm_width, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=lm_heads, num_key_value_heads=1, vocab_size=300))  # fmt: skip
    ids = {"image_token_id": 296, "latent_start_token_id": 297, "latent_token_id": 298, "latent_end_token_id": 299}
    return vision, text, ids


@pytest.mark.parametrize(("lm_width", "lm_heads"), [(896, 14), (3584, 28), (200, 2)])
def test_from_components_builds_the_paper_extractor_for_any_lm_width(lm_width, lm_heads):
    """Qwen2.5-0.5B's 896, 7B's 3584 and a width that 12 does not divide (200): `from_components` without any
    Extractor argument gives Appendix B's Extractor (1536 wide, 12 heads) projected in and out of the LM width, and
    the model runs the latent loop and generates."""
    from lare_hf import LaReForConditionalGeneration

    torch.manual_seed(0)
    vision, text, ids = _tiny_parts(lm_width, lm_heads)
    model = LaReForConditionalGeneration.from_components(
        vision, text, special_token_ids=ids, use_reconstructor=False, image_loss_weight=0.0, window_size=4,
        window_stride=2, latent_tokens_per_step=2, num_latent_steps=1,
    ).eval()  # fmt: skip
    extractor = model.model.extractor
    assert model.config.extractor_hidden_size == 1536 and model.config.extractor_num_heads == 12
    assert extractor.input_proj.weight.shape == (1536, lm_width)
    assert extractor.output_proj.weight.shape == (lm_width, 1536)
    assert extractor.layers[0].cross_attn.num_heads == 12
    prompt = torch.tensor([[5, 6] + [296] * 64 + [7, 297, 298, 298, 299]])
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = model(input_ids=prompt, pixel_values=pixel_values)
        generated = model.generate(input_ids=prompt, pixel_values=pixel_values, max_new_tokens=2, eos_token_id=None)
    assert out.latent_embeds.shape == (1, 1, 2, lm_width)
    assert torch.isfinite(out.logits).all()
    assert generated.shape == (1, prompt.shape[1] + 2)


def test_from_components_with_the_lm_width_asked_for_names_the_heads_that_do_not_divide_it():
    """`extractor_hidden_size=None` asks for an Extractor as wide as the LM: 12 heads do not divide 200."""
    from lare_hf import LaReForConditionalGeneration

    vision, text, ids = _tiny_parts(200, 2)
    with pytest.raises(ValueError, match="width 200 is not divisible by extractor_num_heads=12"):
        LaReForConditionalGeneration.from_components(
            vision, text, special_token_ids=ids, use_reconstructor=False, window_size=4, extractor_hidden_size=None
        )


def test_from_components_with_a_siglip_tower_keeps_every_patch():
    """SigLIP has no CLS token: LLaVA's "default" selection would drop a real patch, so `from_components` selects
    "full" and the 8x8 grid keeps its 64 tokens."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from lare_hf import LaReForConditionalGeneration

    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, patch_size=8, image_size=64))  # fmt: skip
    text = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=1, vocab_size=300))  # fmt: skip
    ids = {"image_token_id": 296, "latent_start_token_id": 297, "latent_token_id": 298, "latent_end_token_id": 299}
    model = LaReForConditionalGeneration.from_components(
        vision, text, special_token_ids=ids, use_reconstructor=False, image_loss_weight=0.0, window_size=4,
        extractor_hidden_size=None, extractor_num_heads=4, latent_tokens_per_step=2, num_latent_steps=1,
    ).eval()  # fmt: skip
    assert model.config.vision_feature_select_strategy == "full" and model.config.image_seq_length == 64
    prompt = torch.tensor([[5] + [296] * 64 + [7, 297, 298, 298, 299]])
    with torch.no_grad():
        out = model(input_ids=prompt, pixel_values=torch.randn(1, 3, 64, 64))
    assert out.saliency_maps.shape == (1, 1, 8, 8) and torch.isfinite(out.logits).all()
