"""Dataset: the JSON schema (`schema`), the raw-folder builder (`builder`), the validator (`validate`) and synthetic
sample data (`synthetic`); image decoding and the mask rule are the shared `diffsynth_edit.image_io`. See
docs/dataset.md."""
from .schema import (DEFAULT_PROMPT_TEMPLATE, DatasetEntry, DatasetFormatError, load_dataset, load_dataset_json,
                     read_records, save_dataset_json)

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "DatasetEntry", "DatasetFormatError", "load_dataset", "load_dataset_json",
           "read_records", "save_dataset_json"]
