"""Dataset: the JSON schema (`schema`), robust image I/O (`image_io`), the raw-folder builder (`builder`), the
validator (`validate`) and synthetic sample data (`synthetic`). See docs/dataset.md."""
from .schema import (DEFAULT_PROMPT_TEMPLATE, DatasetEntry, DatasetFormatError, load_dataset, load_dataset_json,
                     read_records, save_dataset_json)

__all__ = ["DEFAULT_PROMPT_TEMPLATE", "DatasetEntry", "DatasetFormatError", "load_dataset", "load_dataset_json",
           "read_records", "save_dataset_json"]
