"""Whether a LaRe model's KL-16 image tokenizer is pretrained, and the warning when L_img (Eq. 7) would train against
a randomly initialised one.

The reconstruction loss L_img denoises the image tokenizer's latents of the window crop (Eq. 7). With a random
autoencoder those latents are the output of a random network: the target is meaningless, and so is what the latent
tokens learn from it. Every model preset ships with `image_tokenizer: null` (no pretrained KL-16 in diffusers format
is published), so this is the default state of a built checkpoint unless `--image-tokenizer DIR` was given.

How the model knows: `LaReForConditionalGeneration.from_components(image_tokenizer=...)` (what `lare build
--image-tokenizer DIR` calls) records the tokenizer's source in `config.components["image_tokenizer"]`. The config is
saved in config.json and carried by every training stage, so the record travels with the checkpoint; the state-dict
keys do not change. A checkpoint without that record has the random KL-16 it was built with.
"""

from __future__ import annotations

import logging

from .configuration_lare import LaReConfig

logger = logging.getLogger(__name__)


def image_tokenizer_is_pretrained(config: LaReConfig) -> bool:
    """True when the model was assembled with a pretrained image tokenizer (`config.components["image_tokenizer"]`)."""
    return "image_tokenizer" in (getattr(config, "components", None) or {})


def image_loss_is_on(config: LaReConfig) -> bool:
    """True when training takes L_img (Eq. 7): the reconstructor exists and lambda_img > 0."""
    return bool(config.use_reconstructor) and float(config.image_loss_weight) > 0


def random_image_tokenizer_message(config: LaReConfig, where: str) -> str:
    """The warning's text: what is wrong, why it matters, how to fix it, and when it does not matter."""
    return (
        f"{where}: L_img (Eq. 7, image_loss_weight={config.image_loss_weight}) is on, but this model's KL-16 image "
        "tokenizer is RANDOMLY INITIALISED (no pretrained one was given at build time). The reconstruction target "
        "is the latent of a random autoencoder, so L_img is meaningless and the latent tokens learn nothing useful "
        "from it. This is fine for smoke tests and the tiny preset. For real training, build the checkpoint with a "
        "pretrained KL-16 autoencoder in diffusers format: `lare build ... --image-tokenizer DIR` (docs/"
        "image_tokenizer.md converts the latent-diffusion release), or turn L_img off (`lare build --set "
        "image_loss_weight=0`, or the training argument --model_overrides '{\"image_loss_weight\": 0}')."
    )


def warn_if_random_image_tokenizer(config: LaReConfig, where: str) -> bool:
    """Log a warning when L_img is on with a randomly initialised image tokenizer; returns whether it warned."""
    if not image_loss_is_on(config) or image_tokenizer_is_pretrained(config):
        return False
    logger.warning(random_image_tokenizer_message(config, where))
    return True


__all__ = [
    "image_loss_is_on",
    "image_tokenizer_is_pretrained",
    "random_image_tokenizer_message",
    "warn_if_random_image_tokenizer",
]
