"""The latent refocusing loop (Sec. 3.1, Eq. 1-5): `LaReLatentRefocusMixin.latent_refocus`, run by `LaReModel`.

What each step k chose and produced is a `LatentStep` in the run's `LatentTrace`; `LatentHalting` decides which
samples stop early (Table 4) and keeps the attention mask and positions the language-model calls use.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from .cache_naming import CACHE_ARGUMENT, cache_argument, output_cache
from .latent_region import LatentLayout
from .outputs import LaReModelOutputWithPast
from .refocus import (
    SaliencyRecorder,
    check_latent_halting,
    latent_steps_converged,
    record_saliency,
    relaxed_window_features,
    select_windows,
)
from .validation import check_halting_mask


@dataclass
class LatentStep:
    """Latent step k of every sample: Z^(k) `[batch, m, D]`, the saliency over the image tokens that chose the
    window `[batch, grid*grid]`, the window's top-left patch `[batch, 2]`, V_s `[batch, window tokens, D]` and the
    Extractor's last cross-attention (or None)."""

    latents: torch.Tensor
    saliency: torch.Tensor
    window_position: torch.LongTensor
    window_features: torch.Tensor
    extractor_attention: torch.Tensor | None


@dataclass
class LatentTrace:
    """The steps of one run. `rows`: the rows that run the latent phase (None: every row); a text-only row keeps
    its own token embeddings in the latent columns, zero saliency and a window at (0, 0)."""

    rows: torch.BoolTensor | None
    steps: list[LatentStep] = field(default_factory=list)

    def history(self) -> torch.Tensor | None:
        """Z^(<k), the earlier latents `[batch, (k-1)*m, D]` (None before the first step)."""
        return torch.cat([step.latents for step in self.steps], dim=1) if self.steps else None

    @property
    def latents(self) -> torch.Tensor:
        """Z^(k) of the last recorded step."""
        return self.steps[-1].latents

    def record(self, step: LatentStep, slot_embeds: torch.Tensor) -> None:
        """Append `step` (latents cast to the sequence's dtype); text-only rows keep `slot_embeds`, their tokens in
        the step's columns."""
        step.latents = step.latents.to(slot_embeds.dtype)
        if self.rows is not None:
            step.latents = torch.where(self.rows[:, None, None], step.latents, slot_embeds)
            step.saliency = step.saliency * self.rows[:, None]
            step.window_position = step.window_position * self.rows[:, None]
        self.steps.append(step)

    def output_fields(self, grid: int, with_extractor_attention: bool) -> dict[str, torch.Tensor | None]:
        """The per-step fields of `LaReModelOutputWithPast`, stacked over the steps."""
        batch = self.latents.shape[0]
        return {
            "latent_embeds": torch.stack([step.latents for step in self.steps], dim=1),
            "saliency_maps": torch.stack([step.saliency for step in self.steps], dim=1).view(
                batch, len(self.steps), grid, grid
            ),
            "window_positions": torch.stack([step.window_position for step in self.steps], dim=1),
            "window_features": torch.stack([step.window_features for step in self.steps], dim=1),
            "extractor_attentions": torch.stack([step.extractor_attention for step in self.steps], dim=1)
            if with_extractor_attention
            else None,
        }


class LatentHalting:
    """Adaptive halting (Table 4; `criterion` = "cosine" | "l1" | "l2" with `threshold`, or None: every sample
    runs all K steps) and the number of steps each sample used (0 for a text-only row).

    After each step k >= 2 a running sample whose Z^(k) has converged to Z^(k-1) (`latent_steps_converged`) stops;
    Z^(k) is its last step. Its later slots are masked out of `attention_mask` and the positions after them shift
    down by their number, so the sample continues exactly as a run with K = k slots would. The caller's tensors are
    copied before the first change."""

    def __init__(
        self,
        criterion: str | None,
        threshold: float | None,
        rows: torch.BoolTensor | None,
        num_steps: int,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        slots: tuple[int, int, int],
        batch: int,
        device: torch.device,
    ):
        self.criterion, self.threshold = criterion, threshold
        self.attention_mask, self.position_ids = attention_mask, position_ids
        self.slots_start, self.slots_end, self.tokens_per_step = slots
        # text-only rows neither halt (their columns hold prompt tokens) nor count latent steps
        self.running = torch.ones(batch, dtype=torch.bool, device=device) if rows is None else rows.clone()
        self.steps_used = torch.full((batch,), num_steps, dtype=torch.long, device=device)
        self.steps_used[~self.running] = 0
        self.halted_any = False

    def update(self, step: int, trace: LatentTrace) -> bool:
        """After step `step` (0-based) of `trace`: halt the samples that converged; True when none runs on."""
        if self.criterion is None or step < 1:
            return False
        current, previous = trace.steps[-1].latents, trace.steps[-2].latents
        halts = self.running & latent_steps_converged(current, previous, self.criterion, self.threshold)
        if halts.any():
            if not self.halted_any:  # the caller's tensors are left as they were
                batch, length = self.attention_mask.shape
                self.position_ids = self.position_ids.expand(*self.position_ids.shape[:-2], batch, length).clone()
                self.attention_mask, self.halted_any = self.attention_mask.clone(), True
            self.steps_used[halts] = step + 1
            self.running &= ~halts
            unused_start = self.slots_start + (step + 1) * self.tokens_per_step
            mask_unused_slots(self.attention_mask, self.position_ids, halts, unused_start, self.slots_end)
        return not self.running.any()

    def output_fields(self) -> dict[str, torch.Tensor]:
        """`latent_steps`, and with halting the mask and positions the sequence ran with (decoding continues with
        them)."""
        fields = {"latent_steps": self.steps_used}
        if self.criterion is not None:
            fields.update(halted_attention_mask=self.attention_mask, halted_position_ids=self.position_ids)
        return fields


def mask_unused_slots(
    attention_mask: torch.Tensor,
    position_ids: torch.LongTensor,
    halts: torch.BoolTensor,
    unused_start: int,
    slots_end: int,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """Adaptive halting, in place: mask the slots [unused_start, slots_end) of the halted rows out of attention and
    shift the positions after them down by the number of slots that were still attended, so the rest of the
    sequence sits where a run with fewer slots puts it (a slot already masked, e.g. when the caller passes back this
    mask, shifts nothing twice)."""
    removed = attention_mask[:, unused_start:slots_end].long().sum(-1) * halts.long()
    attention_mask[halts, unused_start:slots_end] = 0
    position_ids[..., slots_end:] -= removed.view(*([1] * (position_ids.dim() - 2)), -1, 1).to(position_ids.dtype)
    return attention_mask, position_ids


class LaReLatentRefocusMixin:
    """The latent refocusing loop of `LaReModel` (which holds `language_model`, `extractor` and `config`)."""

    @torch.no_grad()
    def embedding_scale(self) -> torch.Tensor:
        """RMS of the LM's token embeddings, the scale latents are normalised to. A statistic over the whole
        vocabulary, so it is recomputed only when the embedding weight changed (an optimizer step, a resize, a move)
        rather than on every forward / generate call.

        Under FSDP2 the weight is a sharded DTensor outside the forward of its unit (gathered with `full_tensor`, so
        the value is the single-process one); under DeepSpeed ZeRO-3 it is gathered with `GatheredParameters`. While
        a process group runs, the scale is not cached: those engines refill the gathered weight in place without
        bumping its version counter."""
        weight = self.get_input_embeddings().weight
        if isinstance(weight, DTensor):
            return weight.full_tensor().float().pow(2).mean().sqrt()
        if hasattr(weight, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([weight]):
                return weight.float().pow(2).mean().sqrt()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return weight.float().pow(2).mean().sqrt()
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
        cached = getattr(self, "_embedding_scale_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, weight.float().pow(2).mean().sqrt())
            self._embedding_scale_cache = cached
        return cached[1]

    # tau of the relaxed window selection while a schedule runs (`WindowTemperatureCallback`); None: the config's
    window_temperature_now: float | None = None

    def _relaxes_window(self) -> bool:
        """Whether this forward chooses windows with a relaxed, differentiable selection (not in the paper): training
        with autograd on, `window_selection` other than "argmax" and the sliding window on."""
        config = self.config
        return (
            config.window_selection != "argmax"
            and config.use_sliding_window
            and self.training
            and torch.is_grad_enabled()
        )

    def _select_window(
        self, saliency: torch.Tensor, image_features: torch.Tensor, step: int = 0
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """The sliding window (Sec. 3.1): each sample's window position and V_s, the visual tokens of V_T under its
        most salient window; the whole grid when the window is ablated. In training with a `window_selection` other
        than "argmax" (not in the paper), V_s carries the gradient of a relaxed choice (`relaxed_window_features`),
        and step `step`'s diagnostics are kept (`_record_window_diagnostic`)."""
        batch = image_features.shape[0]
        if not self.config.use_sliding_window:
            return torch.zeros(batch, 2, dtype=torch.long, device=image_features.device), image_features
        config = self.config
        if self._relaxes_window():
            if self.is_activation_checkpointing:
                raise ValueError(
                    f"window_selection={config.window_selection!r} records the saliency inside autograd, which "
                    "gradient checkpointing would recompute without it (its replay does not record the saliency); "
                    "disable gradient checkpointing, or train with window_selection='argmax'."
                )
            temperature = self.window_temperature_now or config.window_temperature
            positions, window_features, weights = relaxed_window_features(
                saliency, image_features, config.patch_grid_size, config.window_size, config.window_stride,
                config.window_selection, temperature,
            )  # fmt: skip
            self._record_window_diagnostic("window_weight_peak", step, weights.detach().max(-1).values.mean())
            if saliency.requires_grad:
                saliency.register_hook(
                    lambda gradient: self._record_window_diagnostic("saliency_gradient_norm", step, gradient.norm())
                )
            return positions, window_features
        positions, token_indices = select_windows(
            saliency, config.patch_grid_size, config.window_size, config.window_stride
        )
        index = token_indices.unsqueeze(-1).expand(-1, -1, image_features.shape[-1])
        return positions, image_features.gather(1, index)

    def _record_window_diagnostic(self, name: str, step: int, value: torch.Tensor) -> None:
        """Append `value` to `window_selection_diagnostics[name][step]`: per latent step, the mean largest weight of
        the relaxed selection ("window_weight_peak", at forward) and the norm of the gradient that reached the
        saliency ("saliency_gradient_norm", by a backward hook). `WindowTemperatureCallback` reads and clears them."""
        diagnostics = getattr(self, "window_selection_diagnostics", None)
        if diagnostics is None:
            diagnostics = self.window_selection_diagnostics = {}
        diagnostics.setdefault(name, {}).setdefault(step, []).append(float(value.detach().float()))

    def _extract_latents(
        self,
        last_hidden: torch.Tensor,
        window_features: torch.Tensor,
        history: torch.Tensor | None,
        embedding_scale: torch.Tensor,
        return_attention: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Z^(k) from the Extractor (Eq. 3-5) given H^(k), V_s and Z^(<k), or the pooled window when the Extractor
        is ablated."""
        if self.extractor is not None:
            return self.extractor(last_hidden, window_features, history, embedding_scale, return_attention)
        m = self.config.latent_tokens_per_step
        pooled = F.adaptive_avg_pool1d(window_features.transpose(1, 2), m).transpose(1, 2)
        pooled = pooled * torch.rsqrt(pooled.pow(2).mean(-1, keepdim=True) + 1e-6) * embedding_scale
        return pooled, None

    def latent_refocus(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        layout: LatentLayout,
        image_features: torch.Tensor | None,
        image_positions: torch.LongTensor | None,
        cache: Cache | None = None,
        position_ids: torch.LongTensor | None = None,
        use_cache: bool = True,
        return_extractor_attention: bool = False,
        latent_halting: str | None = None,
        latent_halting_threshold: float | None = None,
        **kwargs,
    ) -> LaReModelOutputWithPast:
        """The latent refocusing loop (Eq. 1-5), run by `forward()` for a fresh sequence (also the prefill step of
        `generate()`), in K+1 language-model calls on one KV cache:

        1. Feed the prompt through `<|latent_start|>`: H^(1) and the saliency of its last position over V_T.
        2. For k = 1..K: select the window V_s of V_T with the largest saliency (Eq. 1-2); the Extractor turns
           (H^(k), V_s, Z^(<k)) into Z^(k) (Eq. 3-5); record the step; stop the samples that halt; for k < K feed
           Z^(k) into its m slots, which gives H^(k+1) and the next saliency.
        3. Feed the rest (Z^(K), `<|latent_end|>`, a teacher-forced answer) in one call.

        Rows without an image (`layout.rows` False) have no latent region: their tokens in the region's columns are
        fed as they are (in the same chunks, on the same cache, which gives what one pass gives), so they continue
        exactly as the prompt alone with K=0; the windows and latents the loop computes for them are discarded.
        Adaptive halting (Table 4; `latent_halting` = "cosine" | "l1" | "l2" with `latent_halting_threshold`): see
        `LatentHalting`; once every sample has halted the remaining steps are not computed.

        `kwargs` (`output_attentions`, `output_hidden_states`, ...) go to every language-model call; the returned
        `hidden_states` / `attentions` cover every position, one entry per layer, as a single pass would.
        """
        check_latent_halting(latent_halting, latent_halting_threshold)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if layout.num_steps == 0:
            # one pass of the language model alone (packed sequences included: no mask, no cache)
            lm_output = self._single_pass(inputs_embeds, attention_mask, position_ids, cache, use_cache, **kwargs)
            return self._merge_lm_calls({"image_hidden_states": image_features}, [lm_output], output_cache(lm_output))
        check_halting_mask(latent_halting, attention_mask)  # only a latent region has slots to mask
        if image_features is None:
            raise ValueError(
                "Latent refocusing needs one image per prompt with a latent region (its <|image|> tokens and "
                "pixel_values); use num_latent_steps=0 for multi-image prompts."
            )
        own_cache = cache is None
        cache = DynamicCache(config=self.config.text_config) if own_cache else cache
        m, slots_start = self.config.latent_tokens_per_step, layout.start + 1
        rows = layout.rows.to(inputs_embeds.device) if layout.rows is not None else None
        trace = LatentTrace(rows=None if rows is None or bool(rows.all()) else rows)
        halting = LatentHalting(
            latent_halting, latent_halting_threshold, trace.rows, layout.num_steps, attention_mask, position_ids,
            (slots_start, slots_start + layout.num_steps * m, m), inputs_embeds.shape[0], inputs_embeds.device,
        )  # fmt: skip
        embedding_scale = self.embedding_scale().to(inputs_embeds.dtype)
        feed = functools.partial(self._feed, halting=halting, cache=cache, image_positions=image_positions, **kwargs)
        lm_output, saliency = feed(inputs_embeds[:, :slots_start], 0)  # H^(1) and its saliency
        lm_calls = [lm_output]
        for step in range(layout.num_steps):
            window_position, window_features = self._select_window(saliency, image_features, step)  # Eq. 1-2: V_s
            latents, extractor_attention = self._extract_latents(  # Eq. 3-5: Z^(k)
                lm_output.last_hidden_state[:, -1], window_features, trace.history(), embedding_scale,
                return_extractor_attention,
            )  # fmt: skip
            slot_embeds = inputs_embeds[:, slots_start + step * m : slots_start + (step + 1) * m]
            trace.record(
                LatentStep(latents, saliency, window_position, window_features, extractor_attention), slot_embeds
            )
            if halting.update(step, trace) or step == layout.num_steps - 1:
                break
            lm_output, saliency = feed(trace.latents, slots_start + step * m)  # H^(k+1)
            lm_calls.append(lm_output)
        # the last computed step's latents, then (after an early stop: masked, unused slots) <|latent_end|> and the rest
        tail_start = slots_start + (len(trace.steps) - 1) * m
        tail_embeds = torch.cat([trace.latents, inputs_embeds[:, tail_start + m :]], dim=1)
        lm_calls.append(feed(tail_embeds, tail_start, with_saliency=False)[0])
        fields = {
            "image_hidden_states": image_features,
            **trace.output_fields(self.config.patch_grid_size, return_extractor_attention),
            "latent_rows": rows.long() if rows is not None else torch.ones_like(halting.steps_used),
            **halting.output_fields(),
        }
        if (
            own_cache
            and torch.is_grad_enabled()
            and (kwargs.get("output_hidden_states") or kwargs.get("output_attentions"))
        ):
            replay = self._replay(inputs_embeds, trace, slots_start, halting, use_cache, **kwargs)
            return self._merge_lm_calls(fields, [replay], output_cache(replay))
        return self._merge_lm_calls(fields, lm_calls, cache if use_cache else None)

    def _feed(
        self,
        inputs_embeds: torch.Tensor,
        start: int,
        halting: LatentHalting,
        cache: Cache,
        image_positions: torch.LongTensor,
        with_saliency: bool = True,
        **kwargs,
    ) -> tuple[BaseModelOutputWithPast, torch.Tensor | None]:
        """Feed the positions [start, start + length) on top of the cache, with the mask and positions of
        `halting`; `kwargs` (output_attentions, ...) go to the language model. Returns its output and (with
        `with_saliency`) the saliency of its last position over the image tokens, recorded on the language model's
        own attention backend."""
        end = start + inputs_embeds.shape[1]
        recorder = None
        if with_saliency:
            # inside autograd for the window-grounding loss and for a relaxed window selection (not in the paper)
            track_saliency = (self.config.window_loss_weight > 0 and self.training) or self._relaxes_window()
            num_layers = self.config.text_config.num_hidden_layers
            recorder = SaliencyRecorder(image_positions, self.config.saliency_layers, num_layers, track_saliency)
            kwargs["saliency_recorder"] = recorder
        with record_saliency(self.language_model, recorder):
            lm_output = self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=halting.attention_mask[:, :end],
                position_ids=halting.position_ids[..., start:end],
                use_cache=True,
                **cache_argument(cache),
                **kwargs,
            )
        return lm_output, recorder.saliency() if recorder is not None else None

    def _replay(
        self,
        inputs_embeds: torch.Tensor,
        trace: LatentTrace,
        slots_start: int,
        halting: LatentHalting,
        use_cache: bool,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The finished sequence (prompt, latents, tail) in one pass. The per-layer outputs of the loop's calls are
        joined after the fact, so no later computation reads the joined tensors and `retain_grad()` on them would
        see no gradient; with autograd on and per-layer outputs asked for, this pass gives the same values (causal
        attention over the same embeddings) and the same gradients, through tensors the outputs depend on."""
        m = self.config.latent_tokens_per_step
        final_embeds = torch.cat(
            [
                inputs_embeds[:, :slots_start],
                *(step.latents for step in trace.steps),
                inputs_embeds[:, slots_start + len(trace.steps) * m :],
            ],
            dim=1,
        )
        return self._single_pass(final_embeds, halting.attention_mask, halting.position_ids, None, use_cache, **kwargs)

    def _single_pass(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor | None,
        cache: Cache | None,
        use_cache: bool,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """The language model over a whole sequence at once (its own cache when `cache` is None and `use_cache`);
        the cache of the result is None without `use_cache`."""
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            **cache_argument(cache),
            **kwargs,
        )
        if not use_cache:
            setattr(outputs, CACHE_ARGUMENT, None)
        return outputs

    @staticmethod
    def _merge_lm_calls(
        fields: dict[str, torch.Tensor | None], lm_calls: list[BaseModelOutputWithPast], cache: Cache | None
    ) -> LaReModelOutputWithPast:
        """The model output of the language-model calls of a run, joined along the sequence, with the latent `fields`: last hidden state, per-layer hidden
        states, and per-layer attention maps (each call's keys padded to the longest with zeros, the weight a causal
        single pass gives to future positions)."""
        if len(lm_calls) == 1:  # one pass: its own tensors (a copy would cut them off the graph of the outputs)
            (outputs,) = lm_calls
            return LaReModelOutputWithPast(
                last_hidden_state=outputs.last_hidden_state,
                **cache_argument(cache),
                hidden_states=outputs.hidden_states,
                attentions=outputs.attentions,
                **fields,
            )
        hidden_states = attentions = None
        if lm_calls[0].hidden_states is not None:
            # layers left out of `output_hidden_states=[indices]` are None in every call
            hidden_states = tuple(
                torch.cat(layer_states, dim=1) if layer_states[0] is not None else None
                for layer_states in zip(*(outputs.hidden_states for outputs in lm_calls))
            )
        if lm_calls[0].attentions:
            merged = []
            for layer_maps in zip(*(outputs.attentions for outputs in lm_calls)):
                if layer_maps[0] is None:
                    merged.append(None)
                    continue
                key_length = max(attention.shape[-1] for attention in layer_maps)
                merged.append(
                    torch.cat([F.pad(attention, (0, key_length - attention.shape[-1])) for attention in layer_maps], 2)
                )
            attentions = tuple(merged)
        return LaReModelOutputWithPast(
            last_hidden_state=torch.cat([outputs.last_hidden_state for outputs in lm_calls], dim=1),
            **cache_argument(cache),
            hidden_states=hidden_states,
            attentions=attentions,
            **fields,
        )


__all__ = ["LaReLatentRefocusMixin", "LatentHalting", "LatentStep", "LatentTrace", "mask_unused_slots"]
