"""FSDP2 (`torch.distributed.fsdp.fully_shard`) wrap policy for LaRe (not in the paper: the paper trains on 8 A100s
without saying how the model is sharded).

`fsdp_units(model)` names the modules that get their own FSDP unit, `apply_fsdp2(model, mesh)` shards them and then
the root. What each unit holds and why is in docs/training.md ("Sharded training"). Every rank must make the same
module calls on every step (a unit's call all-gathers its parameters collectively); `LaReForConditionalGeneration`
does so in training (see `semantic_augmentation_losses`).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from transformers.modeling_layers import GradientCheckpointingLayer


def fsdp_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules of a `LaReForConditionalGeneration` that get their own FSDP unit, inner ones first:

    - each decoder layer of the language model and each encoder layer of the vision tower (transformers'
      `GradientCheckpointingLayer`s: the unit of work that is gathered, run and freed; the latent loop calls each
      decoder layer K+1 times and L_Z<->T / L_text once more each, so only one layer is whole in memory at a time);
    - the Extractor (called K times per forward) and the reconstructor (U-Net, its condition projection and the
      frozen image tokenizer: used only by L_img, so they are gathered only for it).

    Everything else (token embeddings tied to the LM head, the projector, the final norms, the alignment head) stays
    in the root unit: the tied embedding and LM head must share one unit, and the rest is small.
    """
    if not hasattr(model, "model") or not hasattr(model.model, "language_model"):
        raise ValueError(
            f"apply_fsdp2 expects a LaReForConditionalGeneration, got {type(model).__name__}; wrap the model before "
            "PEFT or other wrappers."
        )
    units: list[tuple[str, nn.Module]] = []
    for prefix, tower in (
        ("model.vision_tower", model.model.vision_tower),
        ("model.language_model", model.model.language_model),
    ):
        for name, module in tower.named_modules():
            if isinstance(module, GradientCheckpointingLayer):
                units.append((f"{prefix}.{name}", module))
    if model.model.extractor is not None:
        units.append(("model.extractor", model.model.extractor))
    if getattr(model, "reconstructor", None) is not None:
        units.append(("reconstructor", model.reconstructor))
    return units


def fsdp_layer_class_names(model_or_checkpoint: nn.Module | str) -> list[str]:
    """The class names of `fsdp_units` (e.g. `["CLIPEncoderLayer", "LaReExtractor", "LaReImageReconstructor",
    "Qwen2DecoderLayer"]`): the `transformer_layer_cls_to_wrap` that gives Trainer's / accelerate's FSDP2 the wrap
    policy of `apply_fsdp2`. A checkpoint path is read from its config alone (the model is built on the meta
    device, no weights are loaded)."""
    if isinstance(model_or_checkpoint, nn.Module):
        model = model_or_checkpoint
    else:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(model_or_checkpoint)
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    return sorted({type(module).__name__ for _, module in fsdp_units(model)})


def apply_fsdp2(
    model: nn.Module,
    mesh: DeviceMesh,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> FSDPModule:
    """Shard `model` in place with `fully_shard` over `mesh`: each of `fsdp_units(model)`, then the root (which
    holds the tied embeddings). `mp_policy`: FSDP2's mixed precision (e.g. bf16 parameters, fp32 reduction).
    Returns the model (now also an `FSDPModule`)."""
    if isinstance(model, FSDPModule):
        raise ValueError("apply_fsdp2: the model is already sharded (fully_shard was applied to its root).")
    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    for _, module in fsdp_units(model):
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


__all__ = ["apply_fsdp2", "fsdp_layer_class_names", "fsdp_units"]
