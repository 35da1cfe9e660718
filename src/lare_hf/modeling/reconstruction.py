"""Image reconstruction from latent tokens (Eq. 7, Appendix B "Settings of Image Reconstruction", Table 7).

The crop of the image under step k's window is encoded by a frozen KL-16 image tokenizer (diffusers `AutoencoderKL`,
16 latent channels at 1/16 resolution); DDPM noise with a linear beta schedule over `num_diffusion_steps` (1000)
steps is added; a `UNet2DConditionModel` (Table 7) conditioned on the latent tokens Z^(k), projected to its
cross-attention width by a linear projection head, predicts the noise; the loss is the MSE to the true noise
(denoising score matching, epsilon prediction). `sample()` runs the reverse process from latent tokens back to
pixels (the paper's Figure 4).

Decisions of ours (the paper leaves them open):
- the tokenizer latents are `latent_dist.mode()` (deterministic), then `(x - shift_factor) * scaling_factor` as
  diffusers pipelines do (`shift_factor` is None for KL-16 -> no shift); set `scaling_factor` in
  `image_tokenizer_config` to match the pretrained KL-16 you load (diffusers' default is SD's 0.18215);
- the training scheduler has `clip_sample=False` (KL latents are not confined to [-1, 1]); it only matters for
  sampling, never for `add_noise`;
- image mean/std, patch size, window size and image size are plain Python attributes, not buffers: nothing of them
  goes to the state dict and nothing needs re-initialising after a meta-device load.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

try:  # diffusers is needed only with the reconstructor: inference checkpoints built without it load without diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as error:  # pragma: no cover - exercised in a subprocess that hides diffusers
    _DIFFUSERS_IMPORT_ERROR: ImportError | None = error
else:
    _DIFFUSERS_IMPORT_ERROR = None

# Scaled-down U-Net for tests and the tiny preset (reconstruction_image_size 64 -> 4x4 tokenizer latents).
TINY_RECONSTRUCTOR_CONFIG: dict[str, Any] = {
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}

# A tiny KL-16: still 16 latent channels at 1/16 resolution (five levels, four 2x downsamplings), very narrow.
TINY_IMAGE_TOKENIZER_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "down_block_types": ["DownEncoderBlock2D"] * 5,
    "up_block_types": ["UpDecoderBlock2D"] * 5,
    "block_out_channels": [8, 8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}


def require_diffusers(what: str) -> None:
    """Raise a clear ImportError when diffusers, needed for `what`, is not installed."""
    if _DIFFUSERS_IMPORT_ERROR is not None:
        raise ImportError(
            f"{what} needs diffusers ({_DIFFUSERS_IMPORT_ERROR}). Install it (pip install diffusers), or use a "
            "checkpoint without the image reconstructor (use_reconstructor=False, `lare build --no-reconstructor`)."
        )


def load_image_tokenizer(path: str) -> nn.Module:
    """A pretrained KL-16 image tokenizer (`diffusers.AutoencoderKL`) from a folder or Hub id."""
    require_diffusers(f"Loading the image tokenizer {path!r}")
    return AutoencoderKL.from_pretrained(path)


def noise_seeds(
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor,
    num_steps: int,
    draw: int,
) -> torch.LongTensor:
    """One seed per (image row, latent step) for the noise and timestep of Eq. 7, `[images * num_steps]` in the
    order of `pixel_values.repeat_interleave(num_steps)` (not in the paper).

    A seed hashes what identifies the sample (its attended tokens in `input_ids`, where given, and its pixels
    rounded to 1/255), the latent step and `draw`, the number of L_img draws the model has made in training. So a
    sample draws the same noise in one process with the whole batch as on the rank that holds it under DDP / FSDP /
    ZeRO-3 (each rank draws the same number of times), and new noise on every training step. `input_ids` rows are
    those of the images (a text-only row left out)."""
    pixel_keys = (pixel_values.detach().float().flatten(1) * 255).round().long()
    weights = torch.arange(1, pixel_keys.shape[1] + 1, device=pixel_keys.device) % 65521
    pixel_sums = (pixel_keys * weights).sum(1).tolist()
    if input_ids is not None:  # one device-to-host copy for the batch, not one per row
        input_ids = input_ids.detach().cpu().to(torch.int64)
        attention_mask = attention_mask.detach().cpu().bool() if attention_mask is not None else None
    seeds = []
    for row, pixel_sum in enumerate(pixel_sums):
        digest = hashlib.blake2b(f"{draw}:{pixel_sum}".encode(), digest_size=8)
        if input_ids is not None:
            tokens = input_ids[row] if attention_mask is None else input_ids[row][attention_mask[row]]
            digest.update(tokens.numpy().tobytes())
        for step in range(num_steps):
            step_digest = digest.copy()
            step_digest.update(step.to_bytes(4, "little"))
            seeds.append(int.from_bytes(step_digest.digest(), "little") >> 1)  # a non-negative int64
    return torch.tensor(seeds, dtype=torch.long)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of `module` (only those with `requires_grad` when `trainable_only`)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class LaReImageReconstructor(nn.Module):
    """Frozen image tokenizer + latent-conditioned denoising U-Net (Eq. 7).

    Args:
        config: a `LaReConfig` (reads `image_tokenizer_config`, `reconstructor_config`, `reconstruction_image_size`,
            `num_diffusion_steps`, `diffusion_beta_start/end`, `image_mean/std`, `window_size`,
            `vision_config.patch_size`).
        condition_dim: width of the latent tokens Z^(k) (the LM hidden size).

    Submodules: `image_tokenizer` (AutoencoderKL, frozen, always in eval mode), `unet` (UNet2DConditionModel),
    `condition_proj` (Linear condition_dim -> cross_attention_dim). `noise_scheduler` is a plain DDPMScheduler
    attribute (not a module, no state).
    """

    def __init__(self, config, condition_dim: int):
        super().__init__()
        require_diffusers("The image reconstructor (use_reconstructor=True)")
        self.image_tokenizer = AutoencoderKL(**config.image_tokenizer_config)
        self.image_tokenizer.requires_grad_(False)
        self.image_tokenizer.eval()
        tokenizer_config = self.image_tokenizer.config
        self.downsample_factor = 2 ** (len(tokenizer_config.block_out_channels) - 1)
        self.latent_channels = tokenizer_config.latent_channels
        self.image_size = int(config.reconstruction_image_size)
        if self.image_size % self.downsample_factor != 0:
            raise ValueError(
                f"reconstruction_image_size={self.image_size} must be a multiple of the image tokenizer's "
                f"downsampling factor {self.downsample_factor}."
            )
        self.latent_size = self.image_size // self.downsample_factor

        unet_kwargs = dict(config.reconstructor_config)
        for key in ("sample_size", "in_channels", "out_channels"):
            unet_kwargs.pop(key, None)  # always derived from the tokenizer and the image size
        self.unet = UNet2DConditionModel(
            sample_size=self.latent_size,
            in_channels=self.latent_channels,
            out_channels=self.latent_channels,
            **unet_kwargs,
        )
        # Projection head: latent tokens Z^(k) -> the U-Net's cross-attention width (768 for Table 7).
        self.condition_proj = nn.Linear(condition_dim, self.unet.config.cross_attention_dim)
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=config.num_diffusion_steps,
            beta_schedule="linear",
            beta_start=config.diffusion_beta_start,
            beta_end=config.diffusion_beta_end,
            prediction_type="epsilon",
            clip_sample=False,
        )
        self.window_size = int(config.window_size)
        self.patch_size = int(config.vision_config.patch_size)
        self.image_mean = [float(x) for x in config.image_mean]
        self.image_std = [float(x) for x in config.image_std]

    def train(self, mode: bool = True) -> LaReImageReconstructor:
        """Switch the U-Net and the projection to `mode`; the frozen image tokenizer stays in eval mode and is
        re-frozen (transformers' `from_pretrained` recreates every loaded parameter with `requires_grad=True`, then
        calls `.eval()`, which lands here)."""
        super().train(mode)
        self.image_tokenizer.eval()
        self.image_tokenizer.requires_grad_(False)
        return self

    # ----------------------------------------------------------------------------------------------------------
    def crop_windows(
        self,
        pixel_values: torch.Tensor,
        window_positions: torch.LongTensor,
        window_size: int | None = None,
    ) -> torch.Tensor:
        """The pixels under each window, as `[B, 3, S, S]` images in [-1, 1] for the image tokenizer.

        Args:
            pixel_values: CLIP-normalised images `[B, 3, H, W]` at the vision tower's resolution (as the processor
                gives them); they are un-normalised with `config.image_mean/std`.
            window_positions: `[B, 2]` (row, column) of each window's top-left cell in the vision tower's patch grid.
            window_size: window side in patches (default `config.window_size`; pass the grid side when the
                sliding window is off).

        The crop is pixels `[row*p : (row+w)*p, col*p : (col+w)*p]` (p = `vision_config.patch_size`), clamped to
        [0, 1] after un-normalising, mapped to [-1, 1] and resized (bilinear, antialiased) to
        `reconstruction_image_size`. Vectorised (no host sync); a window reaching past the image border is shifted
        back inside it.
        """
        if pixel_values.dim() != 4 or window_positions.shape != (pixel_values.shape[0], 2):
            raise ValueError(
                f"crop_windows expects pixel_values [B, 3, H, W] and window_positions [B, 2], got "
                f"{tuple(pixel_values.shape)} and {tuple(window_positions.shape)}."
            )
        window_size = self.window_size if window_size is None else int(window_size)
        side = window_size * self.patch_size
        batch, _, height, width = pixel_values.shape
        if side > height or side > width:
            raise ValueError(f"A {side}px window does not fit in {height}x{width} pixel_values.")
        device = pixel_values.device
        positions = window_positions.to(device=device, dtype=torch.long) * self.patch_size
        top = positions[:, 0].clamp(0, height - side)
        left = positions[:, 1].clamp(0, width - side)
        offsets = torch.arange(side, device=device)
        rows = (top[:, None] + offsets)[:, :, None]  # [B, side, 1]
        cols = (left[:, None] + offsets)[:, None, :]  # [B, 1, side]
        batch_index = torch.arange(batch, device=device)[:, None, None]
        crops = pixel_values.permute(0, 2, 3, 1)[batch_index, rows, cols].permute(0, 3, 1, 2).float()
        mean = torch.tensor(self.image_mean, device=device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=device).view(1, -1, 1, 1)
        crops = (crops * std + mean).clamp(0, 1) * 2 - 1
        if side != self.image_size:
            crops = F.interpolate(
                crops, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
        return crops.clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Tokenizer latents `[B, C, S/f, S/f]` of `[-1, 1]` images: `(mode - shift_factor) * scaling_factor`."""
        config = self.image_tokenizer.config
        latents = self.image_tokenizer.encode(images.to(self.image_tokenizer.dtype)).latent_dist.mode()
        if getattr(config, "shift_factor", None) is not None:
            latents = latents - config.shift_factor
        return latents * config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `encode_images` followed by the decoder: `[B, 3, S, S]` images in [0, 1]."""
        config = self.image_tokenizer.config
        latents = latents / config.scaling_factor
        if getattr(config, "shift_factor", None) is not None:
            latents = latents + config.shift_factor
        decoded = self.image_tokenizer.decode(latents.to(self.image_tokenizer.dtype)).sample
        return ((decoded.float() + 1) / 2).clamp(0, 1)

    def condition(self, latent_tokens: torch.Tensor) -> torch.Tensor:
        """Cross-attention states for the U-Net: `condition_proj(Z)` `[B, m, cross_attention_dim]`."""
        return self.condition_proj(latent_tokens.to(self.condition_proj.weight.dtype)).to(self.unet.dtype)

    def forward(
        self,
        latent_tokens: torch.Tensor,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        seeds: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Eq. 7: `E_{t, eps} || eps - U(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, Z) ||^2` (one t and eps per sample).

        Args:
            latent_tokens: Z^(k) `[B, m, condition_dim]` (one row per (sample, step) pair).
            images: the window crops `[B, 3, S, S]` in [-1, 1] (`crop_windows`).
            generator: optional, for reproducible t and eps (may live on CPU while the model is elsewhere).
            seeds: optional `[B]`, one seed per row: row i's t and eps are drawn from a CPU generator seeded with
                `seeds[i]`, so a row draws the same noise whatever batch (or rank) it is in (`noise_seeds`; not in
                the paper). Overrides `generator`.

        Returns:
            The float32 MSE between the predicted and the injected noise. Gradients reach `condition_proj`, `unet`
            and `latent_tokens`; the image tokenizer runs under no_grad.
        """
        if latent_tokens.shape[0] != images.shape[0]:
            raise ValueError(f"{latent_tokens.shape[0]} latent rows for {images.shape[0]} images.")
        clean = self.encode_images(images).float()
        device = clean.device
        num_timesteps = self.noise_scheduler.config.num_train_timesteps
        if seeds is not None:
            if seeds.shape != (clean.shape[0],):
                raise ValueError(f"seeds must have one entry per row ({clean.shape[0]}), got {tuple(seeds.shape)}.")
            generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]
            timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=gen) for gen in generators])
            noise = torch.stack([torch.randn(clean.shape[1:], generator=gen) for gen in generators])
            timesteps, noise = timesteps.to(device), noise.to(device=device, dtype=clean.dtype)
        else:
            sample_device = generator.device if generator is not None else device
            timesteps = torch.randint(
                0, num_timesteps, (clean.shape[0],), generator=generator, device=sample_device
            ).to(device)
            noise = randn_tensor(clean.shape, generator=generator, device=device, dtype=clean.dtype)
        noisy = self.noise_scheduler.add_noise(clean, noise, timesteps)
        prediction = self.unet(
            noisy.to(self.unet.dtype), timesteps, encoder_hidden_states=self.condition(latent_tokens)
        ).sample
        return F.mse_loss(prediction.float(), noise)

    @torch.no_grad()
    def sample(
        self,
        latent_tokens: torch.Tensor,
        num_inference_steps: int = 50,
        generator: torch.Generator | None = None,
        scheduler: str = "ddim",
    ) -> torch.Tensor:
        """From latent tokens back to images (the paper's Figure 4).

        Reverse diffusion conditioned on `latent_tokens` `[B, m, condition_dim]` with a scheduler built from the
        training schedule (`"ddim"`, the default, deterministic and good with few steps; `"ddpm"`, the ancestral
        sampler of Appendix B, meant for `num_inference_steps = num_diffusion_steps`), then the tokenizer's decoder.
        Returns `[B, 3, S, S]` float32 images in [0, 1] (S = `reconstruction_image_size`).
        """
        schedulers = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
        if scheduler not in schedulers:
            raise ValueError(f"scheduler must be one of {sorted(schedulers)}, got {scheduler!r}.")
        sampler = schedulers[scheduler].from_config(self.noise_scheduler.config)
        device = latent_tokens.device
        sampler.set_timesteps(num_inference_steps, device=device)
        shape = (latent_tokens.shape[0], self.latent_channels, self.latent_size, self.latent_size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * sampler.init_noise_sigma
        condition = self.condition(latent_tokens)
        for timestep in sampler.timesteps:
            model_input = sampler.scale_model_input(latents, timestep)
            noise = self.unet(model_input.to(self.unet.dtype), timestep, encoder_hidden_states=condition).sample
            latents = sampler.step(noise.float(), timestep, latents, generator=generator).prev_sample
        return self.decode_latents(latents)


__all__ = [
    "LaReImageReconstructor",
    "TINY_IMAGE_TOKENIZER_CONFIG",
    "TINY_RECONSTRUCTOR_CONFIG",
    "count_parameters",
    "load_image_tokenizer",
    "noise_seeds",
    "require_diffusers",
]
