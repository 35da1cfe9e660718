"""lmms-eval plugin entry point (group `lmms_eval.models` in pyproject.toml): maps the model name "lare" to
`lare_hf.evaluation.lmms_eval_adapter.LaReLMMS` in lmms-eval's model registry. Kept apart from the adapter so that
lmms-eval can read it while its own model registry is still being built."""

from __future__ import annotations


def lare_model_manifest():
    """The `ModelManifest` lmms-eval registers for `--model lare`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lare", simple_class_path="lare_hf.evaluation.lmms_eval_adapter.LaReLMMS")


__all__ = ["lare_model_manifest"]
