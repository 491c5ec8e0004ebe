"""pytest plugin for the GPU check: keep only the suite's CUDA-only tests and write their outcomes as JSON.

A test counts as CUDA-only when it carries a `cuda` or `gpu` marker, a skipif whose reason names CUDA or a
GPU and whose condition does not skip it here (so "needs CUDA" counts on a GPU machine, "checks the message on
a machine without GPUs" does not), or "cuda" in its name/id. Everything else is deselected (it already runs on CPU in CI).

    GPU_TESTS_JSON=out.json python -m pytest -q -p benchmarks.gpu_tests tests
"""

from __future__ import annotations

import json
import os
import re

CUDA_WORD = re.compile(r"cuda|\bgpus?\b", re.IGNORECASE)
_outcomes: dict[str, str] = {}


def is_cuda_only(item) -> bool:
    """Marked for CUDA, skipped without it (a CUDA/GPU skipif that does not skip here), or named after it."""
    for mark in item.iter_markers():
        if mark.name in ("cuda", "gpu"):
            return True
        if mark.name == "skipif" and CUDA_WORD.search(str(mark.kwargs.get("reason", ""))):
            condition = mark.args[0] if mark.args else mark.kwargs.get("condition", False)
            if not (isinstance(condition, bool) and condition):  # a test for machines WITHOUT a GPU skips here
                return True
    return "cuda" in item.nodeid.lower()


def pytest_collection_modifyitems(session, config, items) -> None:
    keep = [it for it in items if is_cuda_only(it)]
    drop = [it for it in items if not is_cuda_only(it)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def pytest_runtest_logreport(report) -> None:
    """The test's outcome: failed in any phase wins, then skipped, then passed (from the call phase)."""
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped and _outcomes.get(report.nodeid) != "failed":
        _outcomes[report.nodeid] = "skipped"
    elif report.when == "call" and report.passed:
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("GPU_TESTS_JSON")
    if not path:
        return
    counts = {k: sum(v == k for v in _outcomes.values()) for k in ("passed", "failed", "skipped")}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"exit_status": int(exitstatus), "counts": counts, "tests": _outcomes}, f, indent=1)
    os.replace(tmp, path)
