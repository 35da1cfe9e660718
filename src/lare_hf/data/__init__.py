"""Training data: record loaders (LLaVA conversations, reasoning records), the collator, RefocusShapes."""

from .collator import LaReDataCollator
from .formats import LaReRecords, MalformedLineError, MalformedRecordError, load_records, records_from_dataset
from .refocus_shapes import generate_refocus_shapes, write_refocus_shapes

__all__ = [
    "LaReDataCollator",
    "LaReRecords",
    "MalformedLineError",
    "MalformedRecordError",
    "generate_refocus_shapes",
    "load_records",
    "records_from_dataset",
    "write_refocus_shapes",
]
