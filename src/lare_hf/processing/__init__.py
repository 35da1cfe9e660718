"""LaReProcessor and tokenizer helpers."""

from .processing_lare import LARE_CHAT_TEMPLATE, LaReProcessor, build_processor
from .tokenization import add_lare_special_tokens, build_tiny_tokenizer

__all__ = ["LARE_CHAT_TEMPLATE", "LaReProcessor", "add_lare_special_tokens", "build_processor", "build_tiny_tokenizer"]
