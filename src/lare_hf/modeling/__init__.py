"""The LaRe model code. This folder is what a Hub checkpoint carries as custom code."""

from .configuration_lare import LaReConfig
from .modeling_lare import LaReForConditionalGeneration, LaReModel, LaRePreTrainedModel

__all__ = ["LaReConfig", "LaReForConditionalGeneration", "LaReModel", "LaRePreTrainedModel"]
