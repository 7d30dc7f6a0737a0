"""The one prompt rule (prompts.edit_prompt): idempotent, and what the editor encodes whatever form is typed."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from diffsynth_edit.prompts import EDIT_PREFIX, edit_prompt


@pytest.mark.parametrize("typed", ["make it red", "  make it red ", "Picture 1 is the image to modify. make it red",
                                   "picture 1 is the image to modify.make it red"])
def test_edit_prompt_prefixes_once(typed):
    assert edit_prompt(typed) == "Picture 1 is the image to modify. make it red"
    assert edit_prompt(edit_prompt(typed)) == edit_prompt(typed)


def test_edit_prompt_empty_and_prefix_only():
    assert edit_prompt("") == edit_prompt(EDIT_PREFIX) == EDIT_PREFIX


def test_editor_encodes_raw_and_prefixed_instruction_identically(editor):
    from diffsynth_edit.editing.editor import EditRequest, EditSettings

    image = Image.new("RGB", (32, 32), (10, 120, 200))
    settings = EditSettings(max_pixels=32 * 32)
    raw = editor.prepare(EditRequest(image=image, prompt="make it red"), settings)
    full = editor.prepare(EditRequest(image=image, prompt=EDIT_PREFIX + " make it red"), settings)
    other = editor.prepare(EditRequest(image=image, prompt="make it blue"), settings)
    assert torch.equal(raw.prompt_emb, full.prompt_emb) and torch.equal(raw.prompt_mask, full.prompt_mask)
    assert not torch.equal(raw.prompt_emb, other.prompt_emb)
