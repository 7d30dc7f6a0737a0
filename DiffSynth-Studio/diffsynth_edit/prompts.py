"""The one prompt rule: what an edit instruction becomes before the text encoder, in training and in inference.

    edit_prompt("make it red") == "Picture 1 is the image to modify. make it red"
    edit_prompt("Picture 1 is the image to modify. make it red") == the same (idempotent)

The dataset builder writes prompts through it, the cache encodes every dataset prompt through it (so a hand-written
JSON with or without the prefix gives the same embedding), and the editor (CLI single image and dataset, the app,
validation) encodes every instruction through it. The negative prompt is not an instruction and is left alone.
"""
from __future__ import annotations

EDIT_PREFIX = "Picture 1 is the image to modify."


def edit_prompt(instruction: str) -> str:
    """`EDIT_PREFIX + " " + instruction`, unless the instruction already starts with the prefix (any case); outer
    whitespace is dropped."""
    text = instruction.strip()
    if text[:len(EDIT_PREFIX)].lower() == EDIT_PREFIX.lower():
        text = text[len(EDIT_PREFIX):].lstrip()
    return f"{EDIT_PREFIX} {text}" if text else EDIT_PREFIX
