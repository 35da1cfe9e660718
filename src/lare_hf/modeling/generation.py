"""`generate()` for LaRe: GenerationMixin's, whose prefill step runs the latent loop (Eq. 1-5) on the fresh prompt.

`LaReGenerationHooksMixin` sits before `GenerationMixin` in `LaReForConditionalGeneration`'s bases: it rewrites the
prompt's latent region to the asked K, refuses the decoding modes a latent-filled cache cannot serve, and continues
decoding with the mask and positions of an adaptively halted prefill (Table 4).
"""

from __future__ import annotations

import torch
from transformers.masking_utils import create_masks_for_generate
from transformers.modeling_outputs import ModelOutput

from .cache_naming import cache_argument, given_cache
from .latent_region import halting_latent_steps
from .refocus import check_latent_halting
from .validation import check_generation_inputs


class LaReGenerationHooksMixin:
    """The generation hooks of `LaReForConditionalGeneration`; `super()` is `GenerationMixin`."""

    def create_masks_for_generate(
        self, attention_mask: torch.Tensor | None = None, is_first_iteration=False, **kwargs
    ):
        """With a static cache GenerationMixin prebuilds 4D masks; the prefill step runs the latent loop, which feeds
        the sequence in several calls and builds each call's mask from the 2D padding mask, so it keeps that."""
        if is_first_iteration:
            return attention_mask
        return create_masks_for_generate(
            attention_mask=attention_mask, is_first_iteration=is_first_iteration, **kwargs
        )

    def _update_model_kwargs_for_generation(
        self,
        outputs: ModelOutput,
        model_kwargs: dict,
        is_encoder_decoder: bool = False,
        num_new_tokens: int = 1,
    ) -> dict:
        """As GenerationMixin's; after a pass that halted samples early (adaptive halting), decoding continues with
        the mask and positions in which their unused latent slots are gone, and `generate()` reports the step
        counts."""
        if getattr(outputs, "halted_attention_mask", None) is not None:
            model_kwargs["attention_mask"] = outputs.halted_attention_mask
            if model_kwargs.get("position_ids") is not None:
                model_kwargs["position_ids"] = outputs.halted_position_ids
            self._halted_latent_steps = outputs.latent_steps
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        # LaRe's outputs carry the cache as `past_key_values`; GenerationMixin (>= 5.24) reads it as `cache`
        if outputs.past_key_values is not None:
            model_kwargs.update(cache_argument(outputs.past_key_values))
        return model_kwargs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        num_latent_steps: int | None = None,
        latent_halting: str | None = None,
        latent_halting_threshold: float | None = None,
        **kwargs,
    ):
        """`GenerationMixin.generate`, whose prefill step (`forward()` on the fresh prompt) runs the latent loop;
        decoding then continues from the latent-filled cache. Every decoding mode and output option of
        GenerationMixin applies (`return_dict_in_generate`, `output_scores`, beam search, `use_cache=False`, a static
        cache, `inputs_embeds`, ...), except assisted / prompt-lookup decoding, which is refused.

        `num_latent_steps` rewrites the latent region of the prompts with an image to K x m slots first (0 = plain
        LLaVA baseline). The latent phase refocuses on the image, so a text-only prompt runs without one whatever K
        is (a latent region it carries is removed): it is answered exactly as with K=0, alone or batched with image
        prompts. The returned sequences still start with the caller's `input_ids`, so `out[:, input_ids.shape[1]:]`
        is the answer for any K.

        `latent_halting` ("cosine" | "l1" | "l2") with `latent_halting_threshold`: adaptive halting (Table 4). Each
        sample stops its latent phase after the first step k >= 2 whose latents Z^(k) have converged to Z^(k-1)
        (cosine similarity >= threshold, or L1 / L2 distance <= threshold, see `latent_step_distance`), at the latest
        after the cap: `num_latent_steps` when given, else `config.max_latent_steps` (the region is rewritten to the
        cap's slots, so the mean step count can exceed the prompt's K, as in Table 4). Its answer is then the one
        `num_latent_steps=k` gives it. With `return_dict_in_generate=True` the output's `latent_steps` (`[batch]`)
        holds each sample's step count. (Given `inputs_embeds` instead of `input_ids`, the prompt's region is the cap.)
        """
        check_latent_halting(latent_halting, latent_halting_threshold)
        check_generation_inputs(input_ids, num_latent_steps, latent_halting, kwargs)
        if input_ids is not None and given_cache(kwargs) is None:
            num_latent_steps = halting_latent_steps(num_latent_steps, latent_halting, self.config)
        if latent_halting is not None:
            kwargs.update(latent_halting=latent_halting, latent_halting_threshold=latent_halting_threshold)
        prompt_ids = input_ids
        if input_ids is not None and input_ids.shape[1] > 0 and given_cache(kwargs) is None:
            rewritten = self.set_latent_steps(
                input_ids,
                attention_mask if attention_mask is not None else torch.ones_like(input_ids),
                num_latent_steps,
            )
            if rewritten[0] is not input_ids:
                input_ids, attention_mask = rewritten
        self._halted_latent_steps = None
        outputs = super().generate(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, **kwargs
        )
        latent_steps, self._halted_latent_steps = self._halted_latent_steps, None
        if latent_steps is not None and not isinstance(outputs, torch.Tensor):
            outputs["latent_steps"] = latent_steps
        if prompt_ids is None or input_ids is prompt_ids:
            return outputs
        # K changed the prompt's length: hand back the caller's prompt followed by the new tokens.
        sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
        repeats = sequences.shape[0] // prompt_ids.shape[0]
        sequences = torch.cat(
            [prompt_ids.repeat_interleave(repeats, dim=0), sequences[:, input_ids.shape[1] :]], dim=1
        )
        if isinstance(outputs, torch.Tensor):
            return sequences
        outputs.sequences = sequences
        return outputs


__all__ = ["LaReGenerationHooksMixin"]
