"""Every command a user can type prints its help and exits 0 (a help string with a stray `%` once crashed argparse's
formatter for `train_2511.py train --help`)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

COMMANDS = [
    ("train_2511.py", ["cache"]), ("train_2511.py", ["verify"]), ("train_2511.py", ["train"]),
    ("train_2511.py", ["export"]), ("train_lbm.py", []),
    ("generate_dataset_json_mp.py", ["build"]), ("generate_dataset_json_mp.py", ["validate"]),
    ("generate_dataset_json_mp.py", ["sample-data"]),
    ("edit_images.py", ["edit"]), ("edit_images.py", ["evaluate"]), ("edit_images.py", ["tiny-model"]),
    ("app_gradio.py", []),
]


@pytest.mark.parametrize("script,command", COMMANDS, ids=[" ".join([s, *c]) for s, c in COMMANDS])
def test_help_prints_every_flag_and_exits_zero(script, command, capsys):
    entry = runpy.run_path(str(ROOT / script), run_name="entry")  # the script's own main, not the package's
    main = entry.get("main") or entry.get("main_lbm")
    with pytest.raises(SystemExit) as stop:
        main([*command, "--help"])
    assert stop.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage:"), out[:400]
    assert " --" in out  # its flags are listed
