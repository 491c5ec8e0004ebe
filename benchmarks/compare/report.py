"""Shared report pieces: grouping records by objective and seed, number formats, provenance lines, sample grids,
and the Table 1 / ablation sections of docs/RESULTS.md (benchmarks/run_all.py calls results_sections)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT

# (record key, label, lower is better, display scale, digits)
IMAGE_METRICS = (("fid", "digits-FID", True, 1.0, 2), ("kid", "digits-KID ×10³", True, 1e3, 2),
                 ("class_accuracy", "class accuracy", False, 1.0, 3))


def model_line(cfg) -> str:
    m = cfg.model
    return (f"DiT hidden {m.get('hidden_size')}, depth {m.get('depth')}, heads {m.get('num_heads')}, "
            f"patch {m.get('patch_size')}")


def group_by_objective(records: list[dict], runs: list[dict], metric: str, by_budget: bool = False) -> dict:
    """{name: {seed: value}} (or {name: {budget: {seed: value}}}) of a metric over evaluation records."""
    run_of = {r["run_id"]: r for r in runs}
    out: dict = {}
    for rec in records:
        run = run_of[rec["run_id"]]
        slot = out.setdefault(run["name"], {})
        if by_budget:
            slot = slot.setdefault(rec["budget"], {})
        slot[run["seed"]] = rec[metric]
    return out


def mean_sd(values) -> tuple[float, float]:
    v = [float(x) for x in values]
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def fmt_mean_sd(values, scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "–"
    m, sd = mean_sd([scale * v for v in values])
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def fmt_interval(iv: dict, scale: float = 1.0, digits: int = 2) -> str:
    if iv["df"] < 1:
        return f"{scale * iv['estimate']:+.{digits}f} (one seed: no interval)"
    if iv["se"] == 0.0:
        return f"{scale * iv['estimate']:+.{digits}f} (identical over seeds: no interval)"
    return f"{scale * iv['estimate']:+.{digits}f} [{scale * iv['lo']:+.{digits}f}, {scale * iv['hi']:+.{digits}f}]"


def provenance(payload: dict) -> list[str]:
    """Command, commit, machine and time: where every number of a report came from."""
    m = payload["machine"]
    load = m.get("load_avg_1min")
    return [f"Command: `{payload['command']}`  ",
            f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']}, commit {m['git_commit'][:10]}"
            f"{' (dirty tree)' if m.get('git_dirty') else ''}, {m['date_utc']}"
            + (f"; 1-min load average {load:.1f} at the end (a shared machine inflates wall times)" if load else "")
            + "  ",
            f"Wall time: {payload['total_seconds'] / 60:.1f} min."]


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10, num_classes: int = 10,
              scale: int = 4) -> Path:
    """Rows = classes, columns = the first samples conditioned on that class (grey where there are too few)."""
    from PIL import Image

    _, H, W = images.shape[1:]
    canvas = torch.full((num_classes * (H + 1), per_class * (W + 1)), 96, dtype=torch.uint8)
    for c in range(num_classes):
        for j, i in enumerate((labels == c).nonzero().flatten()[:per_class].tolist()):
            canvas[c * (H + 1):c * (H + 1) + H, j * (W + 1):j * (W + 1) + W] = images[i].float().mean(0).to(torch.uint8)
    img = Image.fromarray(canvas.numpy(), mode="L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                                           Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def shown(path) -> str:
    """A path as reports store it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def write_text(path: Path, text: str) -> Path:
    """Atomic text write (tmp + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# ---- docs/RESULTS.md ---------------------------------------------------------------------------------------
def _report_body(results_dir: Path, stem: str, title: str, make: str) -> list[str]:
    """The section(s) of one report: the full run's when it exists, else every smaller variant's, labelled."""
    full = results_dir / f"{stem}.json"
    paths = [full] if full.is_file() else sorted(results_dir.glob(f"{stem}_*.json"))
    lines = []
    for js in paths:
        md = js.with_suffix(".md")
        if not md.is_file():
            continue
        variant = json.loads(js.read_text())["variant"]  # a report without readable data behind it is not shown
        label = "" if variant == "full" else f" — {variant.upper()} variant (fewer seeds, steps or samples)"
        body = ["#" + ln if ln.startswith("## ") else ln  # the report's sections nest under this one
                for ln in md.read_text().splitlines() if not ln.startswith("# ")]
        lines += [f"## {title} (`{make}`){label}", "", f"From `results/{md.name}` (data: `results/{js.name}`).",
                  *body, ""]
    return lines


def results_sections(results_dir: Path) -> list[str]:
    """The Table 1 and ablation sections of docs/RESULTS.md (empty where no report exists)."""
    return (_report_body(results_dir, "table1", "Table 1 on digits", "make table1")
            + _report_body(results_dir, "ablation", "What separates the objectives: the factorial ablation",
                           "make ablation"))
