"""The seed's Table 1 on the embedded default: diffusion vs score vs flow, same DiT, data, steps and seeds.

Each (objective, seed) is trained by the real entry point (`train.py experiment=digits objective=X seed=S
trainer.max_steps=N`, a subprocess) and then evaluated from its checkpoint (EMA weights):
  - its default sampler (digits-FID, class accuracy, NFE, wall time per sample);
  - one shared sampler at equal NFE: Heun on the probability-flow ODE for all three (for diffusion the
    PF-ODE of its eps-net on the VP path of its own discrete schedule), plus each objective's first-order
    deterministic sampler at the same NFE (DDIM for diffusion, Euler for score and flow);
  - NLL in bits/dim through the PF-ODE (the same solver, start time and images for all three), and the
    DDPM ELBO for diffusion (its objective.log_likelihood);
  - the loss at a fixed grid of unit times t on held-out images (loss vs t; independent of logging).
Results are mean +- std over seeds: results/table1.{md,json}, a sample grid and a loss-vs-t plot per objective.

    python benchmarks/table1.py            # the full run (< 30 min on 2 CPU cores)
    python benchmarks/table1.py --quick    # tiny sizes, for tests (< 60 s)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, mean_std, write_json  # noqa: E402
from benchmarks.sampling import NFE_PER_STEP, build_metric, generate_and_measure, load_module, objective_name  # noqa: E402
from gen_objectives.paths import DiscreteVPPath  # noqa: E402,F401  (moved to gen_objectives; re-exported)

OBJECTIVES = ("diffusion", "score", "flow")
# The deterministic first-order sampler each objective ships, run at the shared NFE.
FIRST_ORDER = {"diffusion": "ddim", "score": "euler", "flow": "euler"}


@dataclass
class Settings:
    """Everything that defines a table1 run; stored in the JSON so a reader can reproduce it."""

    objectives: tuple = OBJECTIVES
    seeds: tuple = (0, 1)
    max_steps: int = 1000
    train_overrides: tuple = ()      # extra Hydra overrides for train.py (same for every objective)
    num_samples: int = 400           # samples per FID
    batch_size: int = 400
    default_nfe: int | None = 100    # budget of each default sampler (Heun: half as many steps); None: its own
    ode_nfe: int = 20                # the shared NFE of the ODE comparison (Heun: ode_nfe / 2 steps)
    nll_images: int = 64             # held-out images for the NLL (the first of the val split)
    nll_solver: str = "heun"
    nll_steps: int = 16              # fixed steps of the NLL solver (Heun: 2 NFE per step)
    nll_t_start: float = 1e-3        # common start time of the likelihood ODE (= diffusion's first step, 1/T)
    nll_exact: bool = False          # exact divergence (D backward passes) or Hutchinson (one)
    elbo_steps: int | None = 32      # diffusion ELBO: stratified estimate over this many step strata (None: all T)
    loss_t_points: int = 16          # unit-time grid of the loss-vs-t curve
    loss_images: int = 64
    jobs: int = 2                    # parallel lanes (per seed; per objective and seed if jobs allow)
    inline_eval: bool = False        # evaluate in this process (quick runs) instead of a fresh one per lane
    threads: int = 1                 # torch threads per lane
    sample_seed: int = 0
    quick: bool = False


QUICK = dict(max_steps=3, num_samples=40, batch_size=40, default_nfe=4, ode_nfe=4, nll_images=8, nll_steps=2,
             elbo_steps=4, loss_t_points=4, loss_images=16,
             train_overrides=("model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.batch_size=16",
                              "trainer.log_every_n_steps=1", "module.t_bucket_every_n_steps=1",
                              "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false"),
             jobs=1, threads=2, inline_eval=True, quick=True)


# ---- training ----------------------------------------------------------------------------------------------
def train_command(objectives: tuple, seeds: tuple, s: Settings, lane_dir: Path) -> list[str]:
    """One train.py multirun over objectives x seeds: exactly what a user would type, in one process."""
    return [sys.executable, str(REPO_ROOT / "train.py"), "-m", "experiment=digits",
            f"objective={','.join(objectives)}", f"seed={','.join(map(str, seeds))}",
            f"trainer.max_steps={s.max_steps}",
            f"hydra.sweep.dir={lane_dir}", "hydra.sweep.subdir=${hydra:runtime.choices.objective}_seed${seed}",
            "name=table1", "callbacks.sample_grid=null", "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false", *s.train_overrides]


def find_checkpoint(run_dir: Path) -> Path:
    """last.ckpt of a finished run (or the newest checkpoint if the callback names it otherwise)."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    found = sorted(run_dir.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no checkpoint under {run_dir}; see the lane's seed*_train.log beside it")
    return found[-1]


def train_seconds(run_dir: Path, ckpt: Path) -> float:
    """Wall time of one job of a multirun: from its config dump (job start) to its last checkpoint."""
    return ckpt.stat().st_mtime - (run_dir / ".hydra" / "config.yaml").stat().st_mtime


def run_logged(cmd: list[str], log_path: Path, threads: int) -> float:
    """Run a subprocess with its output in log_path and `threads` CPU threads; seconds taken."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"command failed (exit {rc}): {' '.join(cmd)}\n--- {log_path} (tail) ---\n{tail}")
    return time.time() - t0


# ---- the diffusion PF-ODE ------------------------------------------------------------------------------
def diffusion_schedule(objective):
    """The full (unrespaced) discrete schedule of a diffusion objective."""
    for attr in ("schedule", "base_schedule", "diffusion_schedule"):
        sched = getattr(objective, attr, None)
        if sched is not None and hasattr(sched, "alphas_cumprod"):
            return sched
    raise AttributeError(f"{type(objective).__name__} exposes no DiscreteSchedule (looked for .schedule)")


def diffusion_pf_ode_drift(net, y: torch.Tensor, path: DiscreteVPPath):
    """dx/dt = d_alpha x0_hat + d_sigma eps_hat, eps_hat = the net's first C channels at t_net = T t - 1."""
    from gen_objectives.conversions import velocity_from_eps

    def f(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        t_b = t.to(x.dtype).expand(x.shape[0])
        eps = net(x, path.t_net(t_b), y)[:, : x.shape[1]]
        return velocity_from_eps(x, eps, path.coefs(t_b, x.ndim))

    return f


def pf_ode_drift(objective, net, y: torch.Tensor):
    """The probability-flow ODE drift f(t, x) of any of the three objectives (t = 0 data, t = 1 noise)."""
    if hasattr(objective, "ode_drift"):
        return objective.ode_drift(net, y)
    return diffusion_pf_ode_drift(net, y, DiscreteVPPath(diffusion_schedule(objective).alphas_cumprod))


def pf_ode_t_end(objective) -> float:
    """Where PF-ODE sampling stops: the objective's own t_end, or the first discrete step 1/T for diffusion."""
    if hasattr(objective, "ode_drift"):
        return float(objective.t_end)
    return 1.0 / diffusion_schedule(objective).num_timesteps


def heun_sample_fn(objective, num_steps: int):
    """Shared sampler: Heun (gen_objectives.solvers) on each objective's PF-ODE from t = 1 to its t_end."""
    from gen_objectives.solvers import HeunSolver

    def sample(net, noise, y, generator):
        return HeunSolver().integrate(pf_ode_drift(objective, net, y), noise, 1.0, pf_ode_t_end(objective), num_steps)

    return sample


def pf_ode_bits_per_dim(objective, net, x0: torch.Tensor, y: torch.Tensor, s: Settings, seed: int) -> torch.Tensor:
    """NLL [B] in bits/dim through the PF-ODE, identical solver and start time for all three objectives."""
    from gen_objectives.likelihood import ode_log_likelihood
    from gen_objectives.solvers import make_ode_solver

    gen = torch.Generator().manual_seed(seed)
    nats = ode_log_likelihood(pf_ode_drift(objective, net, y), x0, make_ode_solver(s.nll_solver),
                              t_start=s.nll_t_start, t_end=1.0, num_steps=s.nll_steps, exact=s.nll_exact,
                              generator=gen)
    return objective.bits_per_dim(nats, x0)


# ---- loss vs t -----------------------------------------------------------------------------------------
def native_time(objective, u: float, batch: int, device) -> torch.Tensor:
    """A unit time u in [0, 1] as the objective's native time (diffusion: the nearest step index)."""
    if hasattr(objective, "t_min"):
        return torch.full((batch,), min(max(u, objective.t_min), objective.t_max), device=device)
    T = diffusion_schedule(objective).num_timesteps
    return torch.full((batch,), round(u * (T - 1)), device=device, dtype=torch.long)


@torch.no_grad()
def loss_vs_t(objective, net, x0: torch.Tensor, y: torch.Tensor, points: int, seed: int) -> dict:
    """Mean per-sample loss on fixed images and noise at `points` unit times spread over [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    grid = [(k + 0.5) / points for k in range(points)]
    losses = []
    for u in grid:
        t = native_time(objective, u, x0.shape[0], x0.device)
        losses.append(float(objective.loss(net, x0, y, t=t, noise=noise).mean()))
    return {"unit_t": grid, "loss": losses}


# ---- one run's evaluation ------------------------------------------------------------------------------
def steps_for_nfe(sampler: str, nfe: int | None) -> int | None:
    """num_steps that spend `nfe` network calls with this sampler (None keeps the objective's default)."""
    if nfe is None:
        return None
    return max(1, nfe // NFE_PER_STEP.get(sampler, 1))


def heldout(datamodule, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n images of the validation split (all with n=None; the same for every run)."""
    datamodule.setup("fit")
    x, y = datamodule.val_set.tensors
    return x[:n].clone(), y[:n].clone()


def evaluate_run(ckpt: str | Path, s: Settings, ref_stats: str | None) -> dict:
    """Every table1 metric of one checkpoint (EMA weights), as a flat dict plus the loss-vs-t curve."""
    torch.set_num_threads(max(1, s.threads))
    dev = torch.device("cpu")
    module, dm = load_module(ckpt, dev)
    obj, net, name = module.objective, module.ema_net(), objective_name(module)
    extractor, ref = build_metric("digits", dm, dev, ref_stats)
    common = dict(num_samples=s.num_samples, batch_size=s.batch_size, seed=s.sample_seed, device=dev)
    out = {"objective": name, "ckpt": str(ckpt), "seed": int(module.hparams.get("seed", -1)),
           "params": sum(p.numel() for p in net.parameters())}

    default = generate_and_measure(module, dm, extractor, ref, sampler=obj.default_sampler,
                                   num_steps=steps_for_nfe(obj.default_sampler, s.default_nfe), keep_images=True,
                                   **common)
    out["default"] = {k: v for k, v in default.items() if not k.startswith("_")}
    out["_grid"] = (default["_images"], default["_labels"])

    heun = generate_and_measure(module, dm, extractor, ref, sampler="pf_ode_heun",
                                num_steps=max(1, s.ode_nfe // 2),
                                sample_fn=heun_sample_fn(obj, max(1, s.ode_nfe // 2)), **common)
    out["ode_heun"] = heun
    first = generate_and_measure(module, dm, extractor, ref, sampler=FIRST_ORDER[name], num_steps=s.ode_nfe,
                                 **common)
    out["ode_first_order"] = first

    x0, y = heldout(dm, s.nll_images)
    t0 = time.perf_counter()
    bpd = pf_ode_bits_per_dim(obj, net, x0, y, s, seed=s.sample_seed)
    out["nll_bpd"] = float(bpd.mean())
    out["nll_bpd_sem"] = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else 0.0
    out["nll_seconds"] = time.perf_counter() - t0
    if name == "diffusion":
        gen = torch.Generator().manual_seed(s.sample_seed)
        elbo = obj.bits_per_dim(obj.log_likelihood(net, x0, y, num_steps=s.elbo_steps, generator=gen), x0)
        out["elbo_bpd"] = float(elbo.mean())

    xl, yl = heldout(dm, s.loss_images)
    out["loss_vs_t"] = loss_vs_t(obj, net, xl, yl, s.loss_t_points, seed=s.sample_seed)
    return out


# ---- aggregation and reports ----------------------------------------------------------------------------
METRICS = [  # (key in the run dict, label)
    ("default.fid", "default sampler: digits-FID"),
    ("default.class_accuracy", "default sampler: class accuracy"),
    ("default.nfe", "default sampler: NFE"),
    ("default.wall_s_per_sample", "default sampler: s/sample"),
    ("ode_heun.fid", "PF-ODE Heun: digits-FID"),
    ("ode_heun.class_accuracy", "PF-ODE Heun: class accuracy"),
    ("ode_heun.nfe", "PF-ODE Heun: NFE"),
    ("ode_first_order.fid", "first-order ODE: digits-FID"),
    ("ode_first_order.class_accuracy", "first-order ODE: class accuracy"),
    ("ode_first_order.nfe", "first-order ODE: NFE"),
    ("nll_bpd", "NLL (PF-ODE), bits/dim"),
    ("elbo_bpd", "ELBO bound, bits/dim"),
    ("train_seconds", "train seconds"),
]


def dig(d: dict, key: str):
    for part in key.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def aggregate(runs: list[dict], order=OBJECTIVES) -> dict:
    """Per objective (in `order`): mean, std and per-seed values of every metric."""
    out = {}
    present = {r["objective"] for r in runs}
    for name in [o for o in order if o in present] + sorted(present - set(order)):
        rs = sorted((r for r in runs if r["objective"] == name), key=lambda r: r["seed"])
        summary = {}
        for key, _ in METRICS:
            vals = [dig(r, key) for r in rs]
            if all(v is None for v in vals):
                continue
            m, sd = mean_std(vals)
            summary[key] = {"mean": m, "std": sd, "values": vals}
        out[name] = {"summary": summary, "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rs],
                     "default_sampler": rs[0]["default"]["sampler"],
                     "first_order_sampler": rs[0]["ode_first_order"]["sampler"]}
    return out


def ranking_line(agg: dict, key: str, label: str, lower_is_better: bool = True, digits: int = 2) -> str | None:
    """Objectives ordered by a metric, and whether each neighbour gap exceeds twice the seeds' spread."""
    rows = [(name, e["summary"][key]) for name, e in agg.items() if key in e["summary"]
            and e["summary"][key]["mean"] is not None and math.isfinite(e["summary"][key]["mean"])]
    if len(rows) < 2:
        return None
    rows.sort(key=lambda r: r[1]["mean"], reverse=not lower_is_better)
    order = (" < " if lower_is_better else " > ").join(f"{n} {st['mean']:.{digits}f}" for n, st in rows)
    gaps = []
    for (a, sa), (b, sb) in zip(rows, rows[1:]):
        gap, spread = abs(sb["mean"] - sa["mean"]), math.hypot(sa["std"], sb["std"])
        verdict = "beyond 2x the seed spread" if gap > 2 * spread else "within 2x the seed spread (not resolved)"
        gaps.append(f"{a}→{b}: gap {gap:.{digits}f}, spread {spread:.{digits}f}, {verdict}")
    return f"- {label}: {order} ({'; '.join(gaps)})"


def fmt(stat: dict | None, digits: int = 2) -> str:
    if not stat or stat["mean"] is None or not math.isfinite(stat["mean"]):
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def write_markdown(path: Path, results: dict) -> Path:
    """results/table1.md: the table, how it was made, and per-seed values."""
    s, agg, m = results["settings"], results["objectives"], results["machine"]
    nfe = s["ode_nfe"]
    lines = [
        "# Table 1 on the embedded default (digits)",
        "",
        f"Diffusion vs score vs flow with the same DiT ({results['model']}), data ({results['data']}), "
        f"{s['max_steps']} training steps and seeds {list(s['seeds'])}; mean ± std over seeds. "
        f"digits-FID = Fréchet distance in the features of a small digits CNN classifier (NOT Inception FID), "
        f"{s['num_samples']} samples vs the train split; class accuracy = the classifier agrees with the "
        "conditioning label. EMA weights, cfg scale 1.",
        "",
        f"| objective | default sampler (NFE) | digits-FID ↓ | class acc ↑ | PF-ODE Heun @ {nfe} NFE: digits-FID ↓ "
        f"| acc ↑ | first-order ODE @ {nfe} NFE: digits-FID ↓ | acc ↑ | NLL bits/dim (PF-ODE) ↓ | ELBO bits/dim ↓ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in agg.items():
        su = entry["summary"]
        nfe_default = su.get("default.nfe", {}).get("mean", float("nan"))
        lines.append(
            f"| {name} | {entry['default_sampler']} ({nfe_default:.0f}) | {fmt(su.get('default.fid'))} "
            f"| {fmt(su.get('default.class_accuracy'), 3)} | {fmt(su.get('ode_heun.fid'))} "
            f"| {fmt(su.get('ode_heun.class_accuracy'), 3)} | {entry['first_order_sampler']}: "
            f"{fmt(su.get('ode_first_order.fid'))} | {fmt(su.get('ode_first_order.class_accuracy'), 3)} "
            f"| {fmt(su.get('nll_bpd'), 3)} | {fmt(su.get('elbo_bpd'), 3)} |")
    floor = results.get("data_floor")
    lines += ["", f"Ranking (mean over {len(s['seeds'])} seeds; spread = √(std₁² + std₂²) of the two neighbours; every "
              "run samples from the same noise, so the spread is the training-seed variation — a rough estimate "
              "from so few seeds):"]
    for key, label, lower, d in (("default.fid", "digits-FID, default samplers", True, 2),
                                 ("ode_heun.fid", f"digits-FID, PF-ODE Heun @ {nfe} NFE", True, 2),
                                 ("ode_first_order.fid", f"digits-FID, first-order ODE @ {nfe} NFE", True, 2),
                                 ("default.class_accuracy", "class accuracy, default samplers", False, 3),
                                 ("nll_bpd", "NLL bits/dim (PF-ODE)", True, 3)):
        line = ranking_line(agg, key, label, lower, d)
        if line:
            lines.append(line)
    lines += [""]
    if floor:
        lines.append(f"Reference: the {floor['num_images']} held-out real images score digits-FID "
                     f"{floor['fid']:.2f} and class accuracy {floor['class_accuracy']:.3f} against the same "
                     "train-split statistics (a floor; FID is biased upwards at small sample counts).")
        lines.append("")
    lines += [
        "How each column is measured:",
        f"- default sampler: each objective's configured default sampler at a budget of "
        f"{s['default_nfe'] or 'its default'} NFE (DDPM ancestral and Euler-Maruyama: 1 NFE per step, Heun 2; "
        "NFE counted by wrapping the network with a call counter).",
        f"- PF-ODE Heun: the same Heun solver (gen_objectives.solvers) on each objective's probability-flow ODE, "
        f"{max(1, nfe // 2)} steps = {nfe} NFE; for diffusion the PF-ODE of its eps-net on the VP path of its "
        "discrete schedule (log ᾱ a cubic spline in t through ᾱ_i at t = (i+1)/T, t_net = T·t − 1).",
        "- first-order ODE: the objective's own deterministic first-order sampler at the same NFE "
        "(DDIM for diffusion, Euler for score and flow).",
        f"- NLL: −log p(x) through the PF-ODE ({s['nll_solver']}, {s['nll_steps']} steps, "
        f"{'exact divergence' if s['nll_exact'] else 'Hutchinson divergence'}) from t = {s['nll_t_start']:g} "
        f"(the same for all three) on {s['nll_images']} held-out images, in bits per dimension of the model "
        "space [−1, 1] (continuous density, no dequantisation: comparable across objectives, not with "
        "published discrete bits/dim). ELBO: diffusion's variational bound (objective.log_likelihood, "
        f"Gaussian decoder, {s['elbo_steps'] or 'all'} stratified step terms), an upper bound on its NLL.",
        f"- loss vs t: the trained nets' own loss at {s['loss_t_points']} fixed unit times on "
        f"{s['loss_images']} held-out images (EMA weights, solid), and the training log's per-t-bucket loss "
        "(last logged values, dashed) in `table1_loss_vs_t_<objective>.png`.",
        "",
        "Per seed:",
        "",
        "| objective | seed | default FID | acc | Heun FID | first-order FID | NLL bpd | ELBO bpd | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, entry in agg.items():
        for r in entry["runs"]:
            def g(key, d=2, r=r):
                v = dig(r, key)
                return "–" if v is None else f"{v:.{d}f}"
            lines.append(f"| {name} | {r['seed']} | {g('default.fid')} | {g('default.class_accuracy', 3)} "
                         f"| {g('ode_heun.fid')} | {g('ode_first_order.fid')} | {g('nll_bpd', 3)} "
                         f"| {g('elbo_bpd', 3)} | {g('train_seconds', 0)} |")
    lines += ["", "Figures: " + ", ".join(f"`{Path(p).name}`" for p in results.get("figures", [])), ""]
    lines += [
        f"Command: `{results['command']}`  ",
        f"Machine: {m['cpu_model']}, {m['cpu_count']} cores, torch {m['torch']}, commit {m['git_commit'][:10]}"
        f"{' (dirty tree)' if m.get('git_dirty') else ''}, {m['date_utc']}"
        + (f"; 1-min load average {m['load_avg_1min']:.1f} at the end" if m.get("load_avg_1min") else "")
        + "; the machine is shared with other jobs  ",
        f"Wall time: {results['total_seconds'] / 60:.1f} min.",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def save_grid(images: torch.Tensor, labels: torch.Tensor, path: Path, per_class: int = 10,
              num_classes: int = 10, scale: int = 4) -> Path:
    """Rows = classes, columns = the first samples conditioned on that class (blank if too few)."""
    from PIL import Image

    C, H, W = images.shape[1:]
    canvas = torch.full((num_classes * (H + 1), per_class * (W + 1)), 96, dtype=torch.uint8)  # grey gutters
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()[:per_class]
        for j, i in enumerate(idx.tolist()):
            canvas[c * (H + 1):c * (H + 1) + H, j * (W + 1):j * (W + 1) + W] = images[i].float().mean(0).to(torch.uint8)
    img = Image.fromarray(canvas.numpy(), mode="L").resize((canvas.shape[1] * scale, canvas.shape[0] * scale),
                                                           Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def logged_loss_buckets(run_dir: Path, last: int = 5) -> dict | None:
    """The training log's loss per t-bucket (loss_t/a-b columns of csv/metrics.csv), mean of the last rows."""
    import csv

    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.is_file():
        return None
    with open(path) as f:
        rows = [r for r in csv.DictReader(f) if any(k.startswith("loss_t/") and r[k] for k in r)]
    if not rows:
        return None
    cols = sorted((k for k in rows[0] if k.startswith("loss_t/")), key=lambda k: float(k[7:].split("-")[0]))
    centers, means = [], []
    for col in cols:
        vals = [float(r[col]) for r in rows[-last:] if r[col] and math.isfinite(float(r[col]))]
        if vals:
            lo, hi = (float(v) for v in col[7:].split("-"))
            centers.append(0.5 * (lo + hi))
            means.append(sum(vals) / len(vals))
    return {"unit_t": centers, "loss": means, "rows_averaged": min(last, len(rows))}


def plot_loss_vs_t(name: str, runs: list[dict], path: Path) -> Path:
    """The trained nets' loss at fixed unit times (solid), and the training log's t-buckets (dashed), per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for r in runs:
        curve = r["loss_vs_t"]
        line, = ax.plot(curve["unit_t"], curve["loss"], marker="o", ms=3, label=f"seed {r['seed']}: eval, fixed t")
        logged = r.get("logged_loss_buckets")
        if logged and logged["loss"]:
            ax.plot(logged["unit_t"], logged["loss"], ls="--", color=line.get_color(), alpha=0.7,
                    label=f"seed {r['seed']}: training log buckets")
    ax.set_yscale("log")
    ax.set_xlabel("unit time t (0 = data, 1 = noise)")
    ax.set_ylabel("per-sample loss (objective's own weighting)")
    ax.set_title(f"{name}: loss vs t (held-out digits)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def data_floor(datamodule, ref_stats: str, n: int) -> dict:
    """digits-FID and accuracy of real held-out images against the reference (what 'perfect' scores)."""
    from evaluation.metrics import MetricAccumulator
    from evaluation.stats import quantize

    extractor, ref = build_metric("digits", datamodule, torch.device("cpu"), ref_stats)
    x, y = heldout(datamodule, n)
    acc = MetricAccumulator(extractor, len(x))
    acc.update(quantize(datamodule.decode(x)), y, torch.arange(len(x)))
    metrics = acc.finalize(ref)
    fid_key = next(k for k in metrics if "fid_" in k)
    return {"num_images": len(x), "fid": metrics[fid_key],
            "class_accuracy": metrics[next(k for k in metrics if k.endswith("class_accuracy"))]}


def compose_train_config(s: Settings):
    """The config train.py will compose for these overrides (objective aside), to build the same data split."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base=None):
        return compose("train", overrides=["experiment=digits", *s.train_overrides])


# ---- main -----------------------------------------------------------------------------------------------
def lane(objectives: tuple, seeds: tuple, s: Settings, workdir: Path, settings_file: Path,
         ref_stats: Path) -> list[dict]:
    """Train these objectives x seeds (one train.py multirun), then evaluate them (one fresh process, or this
    one with s.inline_eval, which saves a process start-up in quick runs)."""
    name = "_".join(objectives) + "_seed" + "_".join(map(str, seeds))
    lane_dir = workdir / name
    if lane_dir.exists():
        shutil.rmtree(lane_dir)  # never evaluate a stale checkpoint of an earlier run
    train_total = run_logged(train_command(objectives, seeds, s, lane_dir), workdir / f"{name}_train.log",
                             s.threads)
    ckpts = [find_checkpoint(lane_dir / f"{o}_seed{seed}") for seed in seeds for o in objectives]
    t0 = time.time()
    if s.inline_eval:
        evaluate_checkpoints(ckpts, s, str(ref_stats))
    else:
        eval_cmd = [sys.executable, str(Path(__file__).resolve()), "--eval-ckpts", *map(str, ckpts),
                    "--settings-json", str(settings_file), "--ref-stats", str(ref_stats)]
        run_logged(eval_cmd, workdir / f"{name}_eval.log", s.threads)
    eval_total = time.time() - t0
    results = []
    for ckpt in ckpts:
        run_dir = ckpt.parent.parent
        r = json.loads((run_dir / "eval.json").read_text())
        r.update(train_seconds=train_seconds(run_dir, ckpt), run_dir=str(run_dir),
                 lane_train_seconds=train_total, lane_eval_seconds=eval_total,
                 logged_loss_buckets=logged_loss_buckets(run_dir))
        results.append(r)
    return results


def evaluate_checkpoints(ckpts, s: Settings, ref_stats: str) -> None:
    """Evaluate checkpoints one after another; eval.json (+ the grid images) beside each run."""
    for ckpt in ckpts:
        run_dir = Path(ckpt).parent.parent
        t0 = time.time()
        result = evaluate_run(ckpt, s, ref_stats)
        result["eval_seconds"] = time.time() - t0
        images, labels = result.pop("_grid")
        torch.save({"images": images, "labels": labels}, run_dir / "eval_grid.pt")
        write_json(run_dir / "eval.json", result)
        print(f"[table1] evaluated {ckpt} in {result['eval_seconds']:.0f}s", flush=True)


def main_eval(args) -> None:
    """Child process: evaluate the given checkpoints with the run's settings."""
    raw = json.loads(Path(args.settings_json).read_text())
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    evaluate_checkpoints(args.eval_ckpts, s, args.ref_stats)


def run_table1(s: Settings, workdir: Path, out_dir: Path, command: str, log=print) -> dict:
    """Train and evaluate every (objective, seed), then write table1.{json,md} and the figures."""
    t_start = time.time()
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    from hydra.utils import instantiate

    cfg = compose_train_config(s)
    dm = instantiate(cfg.data)
    settings_file = workdir / "settings.json"
    write_json(settings_file, asdict(s))

    # The digits classifier and the reference statistics, built once before the parallel pipelines.
    ref_path = workdir / "ref_digits.npz"
    if ref_path.exists():
        ref_path.unlink()  # the reference follows the data config of this run
    build_metric("digits", dm, torch.device("cpu"), str(ref_path))
    floor = data_floor(dm, str(ref_path), None)  # the whole validation split

    runs = []
    if s.jobs >= len(s.objectives) * len(s.seeds):  # a lane per (objective, seed)
        lanes = [((o,), (seed,)) for seed in s.seeds for o in s.objectives]
    else:  # the seeds dealt to at most `jobs` lanes, each training every objective
        n = max(1, min(s.jobs, len(s.seeds)))
        lanes = [(tuple(s.objectives), tuple(s.seeds[i::n])) for i in range(n)]
    with cf.ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        futures = {pool.submit(lane, objs, seeds, s, workdir, settings_file, ref_path): seeds
                   for objs, seeds in lanes}
        for fut in cf.as_completed(futures):
            for r in fut.result():
                log(f"[table1] {r['objective']} seed {r['seed']}: default digits-FID {r['default']['fid']:.2f}, "
                    f"Heun {r['ode_heun']['fid']:.2f}, NLL {r['nll_bpd']:.3f} bpd "
                    f"(train {r['train_seconds']:.0f}s, eval {r['eval_seconds']:.0f}s)")
                runs.append(r)

    return write_reports(s, runs, cfg, dm, floor, out_dir, command, time.time() - t_start)


def write_reports(s: Settings, runs: list[dict], cfg, dm, floor: dict, out_dir: Path, command: str,
                  total_seconds: float, machine: dict | None = None) -> dict:
    """table1.{json,md}, a sample grid and a loss-vs-t plot per objective, from the evaluated runs."""
    agg = aggregate(runs, order=s.objectives)
    figures = []
    for name, entry in agg.items():
        first = min(entry["runs"], key=lambda r: r["seed"])
        grid = torch.load(Path(first["run_dir"]) / "eval_grid.pt", weights_only=True)
        figures.append(save_grid(grid["images"], grid["labels"], out_dir / f"table1_samples_{name}.png"))
        figures.append(plot_loss_vs_t(name, entry["runs"], out_dir / f"table1_loss_vs_t_{name}.png"))
    model = cfg.model
    results = {
        "benchmark": "table1",
        "settings": asdict(s),
        "model": f"DiT hidden {model.get('hidden_size')}, depth {model.get('depth')}, heads {model.get('num_heads')}, "
                 f"patch {model.get('patch_size')}, {runs[0]['params']:,} parameters",
        "data": f"digits {dm.image_size}x{dm.image_size}",
        "metric_note": "digits-FID: features of a small digits CNN classifier, NOT Inception FID",
        "data_floor": floor,
        "objectives": agg,
        "figures": [str(p) for p in figures],
        "command": command,
        "total_seconds": total_seconds,
        "machine": machine or machine_info(),
    }
    write_json(out_dir / "table1.json", results)
    write_markdown(out_dir / "table1.md", results)
    return results


def report_only(workdir: Path, out_dir: Path) -> dict:
    """Rewrite table1.{json,md} and figures from a finished run's eval.json files (no training, no sampling);
    the command and wall time stay those of the run that produced them."""
    from workflow.config_guard import instantiate_trusted

    raw = json.loads((workdir / "settings.json").read_text())
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    previous = json.loads((out_dir / "table1.json").read_text())
    cfg = compose_train_config(s)
    dm = instantiate_trusted(cfg.data, f"{workdir / 'settings.json'}: data")  # overrides read from a file
    runs = []
    for path in sorted(workdir.glob("*/*/eval.json")):
        run_dir = path.parent
        r = json.loads(path.read_text())
        r.update(train_seconds=train_seconds(run_dir, find_checkpoint(run_dir)), run_dir=str(run_dir),
                 logged_loss_buckets=logged_loss_buckets(run_dir))
        runs.append(r)
    return write_reports(s, runs, cfg, dm, previous["data_floor"], out_dir, previous["command"],
                         previous["total_seconds"], machine=previous["machine"])


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes for tests (< 60 s)")
    p.add_argument("--seeds", default=None, help="comma list (default 0,1)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--objectives", default=None, help="comma list (default diffusion,score,flow)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--jobs", type=int, default=None, help="parallel (objective, seed) pipelines")
    p.add_argument("--threads", type=int, default=None, help="torch threads per pipeline")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--workdir", default=str(REPO_ROOT / "outputs" / "table1"))
    p.add_argument("--train-override", action="append", default=[], help="extra train.py override (repeatable)")
    p.add_argument("--set", action="append", default=[], help="any Settings field, e.g. --set ode_nfe=10")
    p.add_argument("--report-only", action="store_true", help="rewrite the reports from --workdir's eval.json files")
    # child-process mode
    p.add_argument("--eval-ckpts", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--settings-json", help=argparse.SUPPRESS)
    p.add_argument("--ref-stats", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.eval_ckpts:
        main_eval(a)
        return None
    if a.report_only:
        results = report_only(Path(a.workdir), Path(a.out_dir))
        print(f"[table1] rewrote {a.out_dir}/table1.md from {a.workdir}")
        return results

    s = Settings()
    if a.quick:
        s = replace(s, **QUICK)
    for item in a.set:  # values are JSON (numbers, true/false, null, lists), else plain strings
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__:
            raise SystemExit(f"--set {key}: unknown; valid: {sorted(Settings.__dataclass_fields__)}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        s = replace(s, **{key: tuple(parsed) if isinstance(parsed, list) else parsed})
    if a.seeds:
        s = replace(s, seeds=tuple(int(v) for v in a.seeds.split(",")))
    if a.objectives:
        s = replace(s, objectives=tuple(a.objectives.split(",")))
    for key in ("max_steps", "num_samples", "jobs", "threads"):
        if getattr(a, key) is not None:
            s = replace(s, **{key: getattr(a, key)})
    if a.num_samples is not None:
        s = replace(s, batch_size=min(s.batch_size, a.num_samples))
    if a.train_override:
        s = replace(s, train_overrides=(*s.train_overrides, *a.train_override))
    command = "python benchmarks/table1.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results = run_table1(s, Path(a.workdir), Path(a.out_dir), command.strip())
    if Path(a.out_dir).resolve() == RESULTS_DIR.resolve():  # the project's results: refresh docs/RESULTS.md
        from benchmarks.run_all import write_results_md

        print(f"[table1] wrote {write_results_md()}")
    print(Path(a.out_dir, "table1.md").read_text())
    print(f"[table1] done in {results['total_seconds'] / 60:.1f} min -> {a.out_dir}/table1.md")
    return results


if __name__ == "__main__":
    main()
