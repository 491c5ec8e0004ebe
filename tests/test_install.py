"""The top-level packages (pyproject's packages.find) import from the installed project, not only from the repo root."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["gen_objectives", "backbones", "datamodules", "callbacks", "evaluation", "workflow"]


def test_the_list_is_pyprojects():
    """PACKAGES is [tool.setuptools.packages.find]'s include list (read without tomllib: Python 3.10 has none)."""
    section = (REPO / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]", 1)[1]
    include = ast.literal_eval(re.search(r"^include\s*=\s*(\[.*?\])", section, re.M | re.S).group(1))
    assert sorted(name.rstrip("*") for name in include) == sorted(PACKAGES)


def test_packages_import_outside_repo(tmp_path):
    # every module of every package, so one that needs the repo root as cwd (conf/, benchmarks/, train.py) fails here
    code = (
        "import importlib, pkgutil, sys\n"
        f"for name in {PACKAGES!r}:\n"
        "    m = importlib.import_module(name)\n"
        "    for info in pkgutil.walk_packages(m.__path__, name + '.'):\n"
        "        importlib.import_module(info.name)\n"
        "    print(name, m.__file__)\n"
        "print('cwd-in-path', '' in sys.path or '.' in sys.path)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    # every package resolves into this checkout (editable install), found through site-packages
    for name in PACKAGES:
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert str(REPO / name) in line, line
    assert not (tmp_path / "gen_objectives").exists()
