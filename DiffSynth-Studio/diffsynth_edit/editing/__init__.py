"""Editing: the editor (`editor`: prepare, sample, decode), its samplers' schedules (`sampling`), the evaluation
metrics and grid (`evaluate`) and the command line of `edit_images.py` (`cli`). See docs/editing.md."""
