#!/usr/bin/env python
"""Interactive mask editing with trained checkpoints (gradio).

    python app_gradio.py                                  # port 7999 on 127.0.0.1; models/ or the tiny demo model
    python app_gradio.py --preset configs/app.toml --model-root /data/models --checkpoint-root train
    python app_gradio.py --tiny                           # tiny random model: works out of the box

API: `gradio_client.Client("http://127.0.0.1:7999").predict(..., api_name="/edit")`; see docs/app.md.
"""
import sys

from diffsynth_edit.app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
