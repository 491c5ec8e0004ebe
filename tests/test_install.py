"""The top-level packages import from the installed project, not only from the repo root."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_packages_import_outside_repo(tmp_path):
    code = (
        "import importlib, sys\n"
        "for name in ['gen_objectives', 'backbones', 'datamodules', 'callbacks']:\n"
        "    m = importlib.import_module(name)\n"
        "    print(name, m.__file__)\n"
        "print('cwd-in-path', '' in sys.path or '.' in sys.path)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    # every package resolves into this checkout (editable install), found through site-packages
    for name in ["gen_objectives", "backbones", "datamodules", "callbacks"]:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert str(REPO / name) in line, line
    assert not (tmp_path / "gen_objectives").exists()
