"""LaRe (Latent Refocusing) as a native Hugging Face Transformers model.

Importing the package registers the "lare" model type with the Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling.configuration_lare import LaReConfig
from .modeling.modeling_lare import LaReForConditionalGeneration, LaReModel, LaRePreTrainedModel
from .processing.processing_lare import LaReProcessor

AutoConfig.register("lare", LaReConfig, exist_ok=True)
AutoModel.register(LaReConfig, LaReModel, exist_ok=True)
AutoModelForImageTextToText.register(LaReConfig, LaReForConditionalGeneration, exist_ok=True)
AutoProcessor.register(LaReConfig, LaReProcessor, exist_ok=True)

# Saved checkpoints carry the modeling code and an auto_map, so they load with trust_remote_code=True where
# lare_hf is not installed.
LaReConfig.register_for_auto_class()
LaReModel.register_for_auto_class("AutoModel")
LaReForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
LaReProcessor.register_for_auto_class()

__version__ = "0.1.0"

__all__ = [
    "LaReConfig",
    "LaReForConditionalGeneration",
    "LaReModel",
    "LaRePreTrainedModel",
    "LaReProcessor",
    "__version__",
]
