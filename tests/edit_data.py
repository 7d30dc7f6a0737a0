"""A small synthetic edit dataset for training tests: a square on a coloured background is recoloured."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = [(220, 40, 40), (40, 200, 60), (40, 80, 230), (230, 200, 40), (200, 60, 200), (40, 210, 210)]


def make_edit_dataset(root: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Writes images and `dataset.json` (paths relative to it); returns the JSON path."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        bg = np.array(COLOURS[i % len(COLOURS)]) * 0.4 + 60
        src = np.tile(bg, (size, size, 1)) + rng.normal(0, 6, (size, size, 3))
        y, x = (int(v) for v in rng.integers(4, size // 2 - 4, 2))
        side = size // 2
        old, new = COLOURS[(i + 1) % len(COLOURS)], COLOURS[(i + 3) % len(COLOURS)]
        tgt = src.copy()
        src[y:y + side, x:x + side] = old
        tgt[y:y + side, x:x + side] = new
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + side, x:x + side] = 255
        names = {k: f"{k}_{i}.png" for k in ("source", "target", "mask")}
        Image.fromarray(src.clip(0, 255).astype(np.uint8)).save(root / names["source"])
        Image.fromarray(tgt.clip(0, 255).astype(np.uint8)).save(root / names["target"])
        Image.fromarray(mask, "L").save(root / names["mask"])
        entries.append({"prompt": f"Picture 1 is the image to modify. Make the square colour {i % 3}.",
                        "image": names["target"], "edit_image": [names["source"]], "back_mask": names["mask"],
                        "id": f"s{i}"})
    path = root / "dataset.json"
    path.write_text(json.dumps(entries, indent=1))
    return path
