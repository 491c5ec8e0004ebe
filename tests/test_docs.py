"""Every command README.md and docs/*.md show must work as written: each `python train.py ...` (every job of a
`-m` sweep), `python evaluate.py ...` and `make <target> ...` is parsed as the shell and Hydra would parse it and
its config composed (they need GPUs or data to run); modules, scripts, flags and make targets must exist.
`python train.py --help` is run. Commands with placeholders (`<...>`, `...`) are examples, not commands."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, offline_env

from workflow.config import _compose, job_overrides

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
STARTS = ("python ", "python3 ", ".venv/bin/python ", "make ", "torchrun ", "srun ")


def doc_commands(path) -> list[tuple[str, str]]:
    """(where, command) for the shell commands of a markdown file: fenced bash/sh blocks (lines joined at a
    trailing backslash) and inline code spans that start like a command."""
    text = path.read_text()
    found = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.strip())
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span.strip() for span in re.findall(r"`([^`\n]+)`", prose) if span.strip().startswith(STARTS)]
    commands = []
    for line in found:
        for part in re.split(r"\s*(?:&&|;)\s*", line):
            if part.startswith(STARTS) and not re.search(r"<[^>]*>|\.\.\.", part.split(" #")[0]):
                commands.append((f"{path.name}: {part[:90]}", part))
    return commands


COMMANDS = [c for path in DOCS for c in doc_commands(path)]


def make_recipes() -> dict[str, list[str]]:
    """target -> its recipe lines, from the Makefile (make itself is not run: its targets install)."""
    recipes, target = {}, None
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):", line)
        if match and not line.startswith("\t"):
            target = match.group(1)
            recipes[target] = []
        elif line.startswith("\t") and target:
            recipes[target].append(line.strip())
    return recipes


def check_make(argv: list[str]) -> None:
    variables = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    targets = [a for a in argv[1:] if "=" not in a]
    recipes = make_recipes()
    for target in targets:
        assert target in recipes, f"make {target}: no such target"
        for line in recipes[target]:
            if "$(PYTHON)" not in line:
                continue
            expanded = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), ""), line.replace("$(PYTHON)",
                                                                                                      "python"))
            check(shlex.split(expanded, comments=True))


def check_hydra(config_name: str, args: list[str]) -> None:
    """The overrides parse and every job's config composes, as `--cfg job` would show it."""
    from hydra._internal.utils import get_args_parser

    parsed = get_args_parser().parse_args(args)
    if parsed.help or parsed.hydra_help:
        return
    for overrides in job_overrides(parsed.overrides, parsed.multirun):
        _compose(overrides, str(ROOT / "conf"), config_name=config_name)


def check_python(argv: list[str]) -> None:
    args = argv[1:]
    if args[0] == "-m":
        module, rest = args[1], args[2:]
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        if module == "datamodules.latent_imagenet" and overrides:
            from datamodules import latent_imagenet

            compose = getattr(latent_imagenet, "compose_data_config", None)
            if compose is not None:
                compose(overrides)
        return
    script, rest = args[0], args[1:]
    assert (ROOT / script).is_file(), f"no script {script}"
    if script == "train.py":
        check_hydra("train", rest)
    elif script == "evaluate.py":
        check_hydra("eval", rest)
    elif script == "sample.py":
        check_hydra("sample", rest)
    else:
        source = (ROOT / script).read_text()
        for flag in (a.split("=", 1)[0] for a in rest if a.startswith("--")):
            assert f'"{flag}"' in source or f"'{flag}'" in source, f"{script} has no option {flag}"


def check(argv: list[str]) -> None:
    while argv and re.fullmatch(r"\w+=.*", argv[0]):  # VAR=value prefixes
        argv = argv[1:]
    if argv[0] in ("srun", "torchrun"):  # the launched command: `srun python x.py`, `torchrun ... -m mod` / `x.py`
        start = next(i for i, a in enumerate(argv) if a.endswith((".py", "python", "python3")) or a == "-m")
        argv = argv[start:] if argv[start].endswith(("python", "python3")) else ["python", *argv[start:]]
    if argv[0] == "make":
        check_make(argv)
    elif argv[0].endswith(("python", "python3")):
        check_python(argv)


def test_the_docs_show_commands():
    names = {where.split(":")[0] for where, _ in COMMANDS}
    assert {"README.md", "WORKFLOW.md"} <= names and len(COMMANDS) > 20


@pytest.mark.parametrize("command", [c for _, c in COMMANDS], ids=[w for w, _ in COMMANDS])
def test_doc_command_parses_and_composes(command):
    check(shlex.split(command, comments=True))


def test_help_runs_and_lists_every_group():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], cwd=ROOT, env=offline_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for group in ("data", "model", "objective", "trainer", "logger", "callbacks", "experiment"):
        assert f"\n{group}: " in proc.stdout
