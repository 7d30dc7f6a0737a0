#!/usr/bin/env python
"""Raw image folders -> dataset JSON (in parallel), plus validation and synthetic sample data.

    python generate_dataset_json_mp.py build --source-dir RAW/src --target-dir RAW/tgt --out data/mydataset.json
    python generate_dataset_json_mp.py validate data/mydataset.json
    python generate_dataset_json_mp.py sample-data --out data/raw_sample

Everything is documented in docs/dataset.md; the work is done by diffsynth_edit.dataset.
"""
import sys

from diffsynth_edit.dataset.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
