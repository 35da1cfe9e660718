"""Semantic augmentation losses (Eq. 6, 8) and the image reconstructor (Eq. 7) with real diffusers modules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from lare_hf.modeling.configuration_lare import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD, TABLE7_UNET_CONFIG, LaReConfig
from lare_hf.modeling.losses import (
    LaReAlignmentHead,
    info_nce,
    mean_max_pool,
    symmetric_info_nce,
    text_prefix_loss,
)
from lare_hf.modeling.reconstruction import (
    TINY_IMAGE_TOKENIZER_CONFIG,
    TINY_RECONSTRUCTOR_CONFIG,
    LaReImageReconstructor,
    count_parameters,
)

HIDDEN = 64  # the tiny LM's hidden size = condition_dim


def tiny_config(**overrides) -> LaReConfig:
    kwargs = dict(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            patch_size=8,
            image_size=64,  # 8x8 patch grid
        ),
        text_config=dict(
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
        ),
        image_seq_length=64,
        window_size=4,
        window_stride=2,
        extractor_num_heads=4,
        reconstructor_config=TINY_RECONSTRUCTOR_CONFIG,
        image_tokenizer_config=TINY_IMAGE_TOKENIZER_CONFIG,
        reconstruction_image_size=64,
    )
    kwargs.update(overrides)
    return LaReConfig(**kwargs)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """These modules are tiny: one intra-op thread is faster, and much faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def config() -> LaReConfig:
    return tiny_config()


@pytest.fixture
def reconstructor(config) -> LaReImageReconstructor:
    torch.manual_seed(0)
    return LaReImageReconstructor(config, condition_dim=HIDDEN)


# --------------------------------------------------------------------------------------------------- pooling / Eq. 6
def test_mean_max_pool_ignores_padding_and_all_pad_rows_are_finite():
    hidden = torch.tensor(
        [
            [[1.0, -2.0], [3.0, 4.0], [100.0, 100.0]],  # last position is padding
            [[-5.0, 7.0], [-1.0, -1.0], [-3.0, 2.0]],  # all real
            [[9.0, 9.0], [9.0, 9.0], [9.0, 9.0]],  # all padding
        ]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    pooled = mean_max_pool(hidden, mask)
    assert pooled.shape == (3, 4)
    torch.testing.assert_close(pooled[0], torch.tensor([2.0, 1.0, 3.0, 4.0]))
    torch.testing.assert_close(pooled[1], torch.tensor([-3.0, 8.0 / 3.0, -1.0, 7.0]))
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled[2], torch.zeros(4))
    # No mask = every position counts; a bool mask works like an integer one.
    torch.testing.assert_close(mean_max_pool(hidden[1:2]), pooled[1:2])
    torch.testing.assert_close(mean_max_pool(hidden, mask.bool()), pooled)


def test_mean_max_pool_all_negative_values_are_not_clamped_to_zero():
    hidden = -torch.rand(2, 5, 3) - 1.0
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    pooled = mean_max_pool(hidden, mask)
    torch.testing.assert_close(pooled[0, 3:], hidden[0, :3].amax(0))
    torch.testing.assert_close(pooled[1, 3:], hidden[1, 0])


def test_info_nce_matches_hand_computation():
    query = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # e1, e2
    key = torch.tensor([[1.0, 1.0], [2.0, 0.0]])  # 45 degrees, e1
    tau = 0.5
    s = 1 / math.sqrt(2)  # cosine of 45 degrees
    # cosine similarities q_i . k_j: [[s, 1], [s, 0]]; the diagonal holds the positives.
    forward0 = -math.log(math.exp(s / tau) / (math.exp(s / tau) + math.exp(1 / tau)))
    forward1 = -math.log(1.0 / (math.exp(s / tau) + 1.0))
    expected = (forward0 + forward1) / 2
    assert info_nce(query, key, tau).item() == pytest.approx(expected, rel=1e-5)
    assert info_nce(query, key, torch.tensor(tau)).item() == pytest.approx(expected, rel=1e-5)
    # The other direction uses the transposed matrix [[s, s], [1, 0]]; symmetric is the mean of both.
    reverse0 = math.log(2.0)
    reverse1 = -math.log(1.0 / (math.exp(1 / tau) + 1.0))
    reverse = (reverse0 + reverse1) / 2
    assert info_nce(key, query, tau).item() == pytest.approx(reverse, rel=1e-5)
    assert symmetric_info_nce(query, key, tau).item() == pytest.approx((expected + reverse) / 2, rel=1e-5)


def test_symmetric_info_nce_batch_of_one_is_finite():
    a = torch.randn(1, 8, requires_grad=True)
    b = torch.randn(1, 8)
    loss = symmetric_info_nce(a, b, 0.07)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(a.grad).all()


def test_alignment_head_learnable_temperature_gets_gradient():
    head = LaReAlignmentHead(tiny_config(learnable_temperature=True, alignment_temperature=0.1))
    assert [name for name, _ in head.named_parameters()] == ["logit_scale"]
    assert head.temperature.item() == pytest.approx(0.1, rel=1e-5)
    torch.manual_seed(0)
    latents = torch.randn(3, 4, HIDDEN, requires_grad=True)
    text = torch.randn(3, 6, HIDDEN)
    text_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    visual = torch.randn(3, 16, HIDDEN)
    total, z_t, z_v = head(latents, None, text, text_mask, visual, None)
    torch.testing.assert_close(total, z_t + z_v)
    total.backward()
    assert head.logit_scale.grad is not None and head.logit_scale.grad.abs() > 0
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    # The clamp: 1/tau never exceeds 100.
    with torch.no_grad():
        head.logit_scale.fill_(10.0)
    assert head.temperature.item() == pytest.approx(0.01, rel=1e-5)
    head.reset_parameters()
    assert head.temperature.item() == pytest.approx(0.1, rel=1e-5)
    # A parameter that from_pretrained already loaded is left alone by reset_parameters (used in _init_weights).
    with torch.no_grad():
        head.logit_scale.fill_(3.0)
    head.logit_scale._is_hf_initialized = True
    head.reset_parameters()
    assert head.logit_scale.item() == 3.0


def test_alignment_head_fixed_temperature_has_no_parameters_and_text_is_optional(config):
    head = LaReAlignmentHead(config)
    assert list(head.parameters()) == [] and head.state_dict() == {}
    assert head.temperature == pytest.approx(config.alignment_temperature)
    latents, visual = torch.randn(2, 4, HIDDEN), torch.randn(2, 16, HIDDEN)
    total, z_t, z_v = head(latents, None, None, None, visual, None)
    assert z_t is None
    torch.testing.assert_close(total, z_v)
    torch.testing.assert_close(z_v, symmetric_info_nce(mean_max_pool(latents), mean_max_pool(visual), 0.07))


# ------------------------------------------------------------------------------------------------------------- Eq. 8
def test_text_prefix_loss_ignores_padding():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    loss = text_prefix_loss(logits, targets, mask)
    real = [(b, p) for b in range(2) for p in range(5) if mask[b, p]]
    manual = sum(F.cross_entropy(logits[b, p][None], targets[b, p][None]) for b, p in real) / len(real)
    torch.testing.assert_close(loss, manual)
    # Changing padded targets (even to ids out of range) changes nothing.
    padded_targets = targets.masked_fill(mask == 0, -7)
    torch.testing.assert_close(text_prefix_loss(logits, padded_targets, mask), loss)
    loss.backward()
    assert logits.grad[1, 2:].abs().sum() == 0 and logits.grad[0].abs().sum() > 0


def test_text_prefix_loss_all_padding_is_zero_with_grad_path():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    loss = text_prefix_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() == 0


# ------------------------------------------------------------------------------------------------------------- Eq. 7
def test_reconstructor_structure(reconstructor, config):
    assert reconstructor.downsample_factor == 16 and reconstructor.latent_size == 4
    assert reconstructor.unet.config.in_channels == reconstructor.unet.config.out_channels == 16
    assert reconstructor.unet.config.sample_size == 4
    assert reconstructor.condition_proj.in_features == HIDDEN
    assert reconstructor.condition_proj.out_features == TINY_RECONSTRUCTOR_CONFIG["cross_attention_dim"]
    scheduler_config = reconstructor.noise_scheduler.config
    assert scheduler_config.num_train_timesteps == config.num_diffusion_steps == 1000
    assert scheduler_config.beta_schedule == "linear" and scheduler_config.prediction_type == "epsilon"
    assert not any(p.requires_grad for p in reconstructor.image_tokenizer.parameters())
    # The frozen tokenizer stays in eval mode whatever the parent does.
    reconstructor.train()
    assert reconstructor.training and reconstructor.unet.training
    assert not reconstructor.image_tokenizer.training
    assert not any(m.training for m in reconstructor.image_tokenizer.modules())
    reconstructor.eval()
    assert not reconstructor.unet.training
    # from_pretrained recreates loaded parameters with requires_grad=True and then calls eval(): re-frozen there.
    reconstructor.requires_grad_(True)
    reconstructor.eval()
    assert not any(p.requires_grad for p in reconstructor.image_tokenizer.parameters())
    assert all(p.requires_grad for p in reconstructor.unet.parameters())
    # No buffers and no scheduler state in the state dict: only tokenizer, U-Net and projection weights.
    prefixes = {key.split(".")[0] for key in reconstructor.state_dict()}
    assert prefixes == {"image_tokenizer", "unet", "condition_proj"}
    print(
        f"tiny reconstructor: unet {count_parameters(reconstructor.unet):,} params, "
        f"tokenizer {count_parameters(reconstructor.image_tokenizer):,}"
    )


def test_reconstruction_loss_gradients(reconstructor):
    reconstructor.train()
    latent_tokens = torch.randn(3, 2, HIDDEN, requires_grad=True)
    images = torch.rand(3, 3, 64, 64) * 2 - 1
    loss = reconstructor(latent_tokens, images, generator=torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert latent_tokens.grad is not None and latent_tokens.grad.abs().sum() > 0
    assert reconstructor.condition_proj.weight.grad is not None
    assert reconstructor.condition_proj.weight.grad.abs().sum() > 0
    unet_grads = [p.grad for p in reconstructor.unet.parameters()]
    assert all(g is not None for g in unet_grads)
    assert sum(g.abs().sum() for g in unet_grads) > 0
    assert all(p.grad is None for p in reconstructor.image_tokenizer.parameters())
    # Same generator seed -> same t and eps -> same loss.
    with torch.no_grad():
        again = reconstructor(latent_tokens, images, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again, loss.detach())


def test_reconstruction_loss_drops_when_fitting_one_batch(reconstructor):
    torch.manual_seed(0)
    reconstructor.train()
    latent_tokens = torch.randn(2, 2, HIDDEN)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    params = [p for p in reconstructor.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-3)
    losses = []
    for _ in range(40):
        loss = reconstructor(latent_tokens, images, generator=torch.Generator().manual_seed(1234))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"reconstruction loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    assert losses[-1] < 0.5 * losses[0]


def test_crop_windows_picks_the_window_pixels(reconstructor):
    # 64x64 images, patch 8 -> 8x8 grid; window 4 patches = 32 px, resized to 64.
    colours = torch.tensor([[0.9, 0.2, 0.5], [0.1, 0.8, 0.3]])
    positions = torch.tensor([[2, 4], [4, 0]])
    images = torch.zeros(2, 3, 64, 64)
    for b in range(2):
        row, col = positions[b].tolist()
        images[b, :, row * 8 : (row + 4) * 8, col * 8 : (col + 4) * 8] = colours[b].view(3, 1, 1)
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1)
    pixel_values = (images - mean) / std
    crops = reconstructor.crop_windows(pixel_values, positions)
    assert crops.shape == (2, 3, 64, 64)
    for b in range(2):
        expected = (colours[b] * 2 - 1).view(3, 1, 1).expand(3, 64, 64)
        torch.testing.assert_close(crops[b], expected, atol=1e-5, rtol=0)
    # A window one cell off contains background (black -> -1) too.
    shifted = reconstructor.crop_windows(pixel_values, positions - torch.tensor([[1, 1], [1, 0]]))
    assert (shifted[0] < -0.99).any() and (shifted[1] < -0.99).any()


def test_crop_windows_full_grid_is_the_whole_image_without_resize(reconstructor):
    images = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(CLIP_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STD).view(1, 3, 1, 1)
    crops = reconstructor.crop_windows((images - mean) / std, torch.zeros(2, 2, dtype=torch.long), window_size=8)
    torch.testing.assert_close(crops, images * 2 - 1, atol=1e-5, rtol=0)


def test_sample_returns_images_in_unit_range(reconstructor):
    latent_tokens = torch.randn(2, 2, HIDDEN)
    generator = torch.Generator().manual_seed(0)
    images = reconstructor.sample(latent_tokens, num_inference_steps=2, generator=generator)
    assert images.shape == (2, 3, 64, 64)
    assert images.min() >= 0 and images.max() <= 1 and torch.isfinite(images).all()
    ddpm = reconstructor.sample(latent_tokens, num_inference_steps=2, scheduler="ddpm")
    assert ddpm.shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="scheduler"):
        reconstructor.sample(latent_tokens, num_inference_steps=2, scheduler="euler")


def test_encode_images_is_16_channel_at_1_16(reconstructor):
    latents = reconstructor.encode_images(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert latents.shape == (2, 16, 4, 4) and not latents.requires_grad


def test_table7_unet_instantiates():
    unet = UNet2DConditionModel(sample_size=16, in_channels=16, out_channels=16, **TABLE7_UNET_CONFIG)
    num_parameters = count_parameters(unet)
    print(f"Table 7 U-Net: {num_parameters:,} parameters")
    assert 100_000_000 < num_parameters < 170_000_000
    assert unet.config.cross_attention_dim == 768
