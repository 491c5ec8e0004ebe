"""Sample quality against sampling cost: digits-FID (or Inception FID) vs NFE for every sampler of every objective.

NFE is counted by wrapping the network with a call counter (benchmarks.common.CountingNet, which is
evaluation.engine.CallCounter): one network call is one evaluation, however large its batch (a CFG-doubled batch
counts once). Fixed-step samplers sweep num_steps; the adaptive dopri5 sweeps its tolerance (atol = rtol) instead.

    python benchmarks/sampling.py --ckpt a.ckpt b.ckpt          # checkpoints written by train.py
    python benchmarks/sampling.py --from-table1 results/table1.json   # the seed-0 runs of make table1
    python benchmarks/sampling.py ... --inception --device cuda  # Inception FID (GPU, weights needed)

Writes JSON (records, the 5%-of-best finding, machine) and a PNG (FID vs NFE, log-x, a line per sampler).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS_DIR, CountingNet, machine_info, write_json  # noqa: E402

DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
DEFAULT_TOLS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)
ADAPTIVE_SAMPLERS = ("dopri5",)
NFE_PER_STEP = {"heun": 2}  # every other fixed-step sampler calls the network once per step
WITHIN = 0.05  # the finding: NFE needed to get within 5% of a sampler's best FID


def load_module(ckpt: str | Path, device: torch.device):
    """A trained GenerativeModule and its datamodule, both rebuilt from the checkpoint's stored config."""
    from gen_objectives.module import GenerativeModule
    from workflow.config_guard import instantiate_trusted

    module = GenerativeModule.from_checkpoint(str(ckpt), map_location="cpu").to(device).eval()
    cfg = module.hparams["cfg"]
    datamodule = instantiate_trusted(cfg["data"], f"{ckpt}: data")  # read from the file: project classes only
    return module, datamodule


def objective_name(module) -> str:
    """diffusion | score | flow, from the objective's class (DiffusionObjective -> diffusion)."""
    return type(module.objective).__name__.removesuffix("Objective").lower()


def build_metric(kind: str, datamodule, device: torch.device, ref_stats: str | None = None,
                 inception_weights: str | None = None):
    """The feature extractor and the real-data reference statistics the FIDs are measured against."""
    from evaluation.reference import get_reference

    if kind == "digits":
        from evaluation.features import DigitsFeatures

        extractor = DigitsFeatures(image_size=datamodule.image_size, val_fraction=datamodule.val_fraction,
                                   split_seed=datamodule.seed, verbose=False)
    elif kind == "inception":
        from evaluation.features import InceptionFeatures

        extractor = InceptionFeatures(weights_path=inception_weights)
    else:
        raise ValueError(f"metric={kind!r}; choose digits or inception")
    extractor = extractor.to(device).eval()
    ref = get_reference(ref_stats, extractor, datamodule, device, compute_if_missing=True, max_images=None,
                        batch_size=256)
    return extractor, ref


def sweep_settings(objective, sampler: str, steps, tols, max_nfe: int | None = None) -> list[dict]:
    """The cost settings swept for one sampler: num_steps for fixed-step ones (up to max_nfe network calls),
    tolerance for dopri5."""
    if sampler in ADAPTIVE_SAMPLERS:
        return [{"tol": float(tol)} for tol in tols]
    per_step = NFE_PER_STEP.get(sampler, 1)
    return [{"num_steps": int(n)} for n in steps if max_nfe is None or n * per_step <= max_nfe]


class _Tolerance:
    """Temporarily sets the objective's dopri5 atol/rtol (restored on exit, so nothing leaks between runs)."""

    def __init__(self, objective, tol: float | None):
        self.objective, self.tol = objective, tol

    def __enter__(self):
        if self.tol is not None:
            self.saved = (self.objective.atol, self.objective.rtol)
            self.objective.atol = self.objective.rtol = self.tol
        return self

    def __exit__(self, *exc):
        if self.tol is not None:
            self.objective.atol, self.objective.rtol = self.saved


@torch.no_grad()
def generate_and_measure(module, datamodule, extractor, ref, *, sampler: str, num_steps: int | None = None,
                         tol: float | None = None, num_samples: int, batch_size: int, seed: int,
                         cfg_scale: float = 1.0, device: torch.device | str = "cpu",
                         keep_images: bool = False, sample_fn=None) -> dict:
    """Sample num_samples images with one sampler setting; FID, class accuracy, NFE and wall time per sample.

    Noise and labels per sample index come from callbacks.fid (the same samples evaluate.py would draw),
    so every sampler and setting starts from identical noise. `sample_fn(net, noise, y, generator)` replaces
    objective.sample for samplers the objective does not offer itself (table1's diffusion PF-ODE).
    """
    from evaluation.metrics import MetricAccumulator
    from evaluation.samples import chunk_bounds, mix_seed, noise_and_labels
    from evaluation.stats import quantize

    device = torch.device(device)
    counter = CountingNet(module.ema_net())
    shape = (datamodule.channels, datamodule.image_size, datamodule.image_size)
    acc = MetricAccumulator(extractor, num_samples, device)
    chunks = chunk_bounds(num_samples, batch_size)
    sample_seconds = 0.0
    images_kept, labels_kept = [], []
    with _Tolerance(module.objective, tol):
        for start, end in chunks:
            noise, labels = noise_and_labels(start, end, shape, datamodule.num_classes, seed)
            gen = torch.Generator(device=device).manual_seed(mix_seed(seed, start, stream=1))
            t0 = time.perf_counter()
            if sample_fn is None:
                x = module.objective.sample(counter, noise.to(device), labels.to(device), sampler=sampler,
                                            num_steps=num_steps, cfg_scale=cfg_scale, generator=gen)
            else:
                x = sample_fn(counter, noise.to(device), labels.to(device), gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            sample_seconds += time.perf_counter() - t0
            images = quantize(datamodule.decode(x)).cpu()
            acc.update(images, labels, torch.arange(start, end))
            if keep_images:
                images_kept.append(images)
                labels_kept.append(labels)
    metrics = acc.finalize(ref)
    fid_key = next(k for k in metrics if "fid_" in k)
    record = {
        "sampler": sampler,
        "num_steps": num_steps,
        "tol": tol,
        "cfg_scale": cfg_scale,
        "num_samples": num_samples,
        "nfe": counter.calls / len(chunks),  # per trajectory batch; dopri5's adaptive count is averaged
        "fid": float(metrics[fid_key]),
        "fid_key": fid_key,
        "class_accuracy": metrics.get(next((k for k in metrics if k.endswith("class_accuracy")), ""), None),
        "wall_s": sample_seconds,
        "wall_s_per_sample": sample_seconds / num_samples,
    }
    if keep_images:
        record["_images"], record["_labels"] = torch.cat(images_kept), torch.cat(labels_kept)
    return record


def sweep_module(module, datamodule, extractor, ref, *, samplers=None, steps=DEFAULT_STEPS, tols=DEFAULT_TOLS,
                 max_nfe: int | None = None, num_samples: int, batch_size: int, seed: int, cfg_scale: float = 1.0, device="cpu",
                 log=print, failures: list | None = None) -> list[dict]:
    """Every sampler of the module's objective at every cost setting -> one record per (sampler, setting).

    A setting the sampler rejects (e.g. too few steps for a respaced chain) lands in `failures` with its error.
    """
    objective = module.objective
    names = list(objective.samplers) if samplers is None else [s for s in samplers if s in objective.samplers]
    records = []
    failures = [] if failures is None else failures
    for sampler in names:
        for setting in sweep_settings(objective, sampler, steps, tols, max_nfe):
            try:
                rec = generate_and_measure(module, datamodule, extractor, ref, sampler=sampler,
                                           num_samples=num_samples, batch_size=batch_size, seed=seed,
                                           cfg_scale=cfg_scale, device=device, **setting)
            except (ValueError, IndexError, RuntimeError) as err:  # recorded, never silently dropped
                log(f"  {sampler:15s} {json.dumps(setting):22s} FAILED: {type(err).__name__}: {err}")
                failures.append({"sampler": sampler, **setting, "error": f"{type(err).__name__}: {err}"})
                continue
            log(f"  {sampler:15s} {json.dumps(setting):22s} nfe={rec['nfe']:7.1f} fid={rec['fid']:8.3f} "
                f"acc={rec['class_accuracy']:.3f} {1e3 * rec['wall_s_per_sample']:.2f} ms/sample")
            records.append(rec)
    return records


def nfe_to_reach(records: list[dict], within: float = WITHIN) -> dict:
    """Per sampler: best FID, its NFE, and the fewest NFE whose FID is within `within` of the best."""
    out = {}
    for sampler in dict.fromkeys(r["sampler"] for r in records):
        rows = sorted((r for r in records if r["sampler"] == sampler and math.isfinite(r["fid"])),
                      key=lambda r: r["nfe"])
        if not rows:
            continue
        best = min(rows, key=lambda r: r["fid"])
        target = best["fid"] * (1.0 + within)
        first = next(r for r in rows if r["fid"] <= target)
        out[sampler] = {"best_fid": best["fid"], "best_nfe": best["nfe"], "target_fid": target,
                        "nfe_within": first["nfe"], "setting_within": {"num_steps": first["num_steps"],
                                                                        "tol": first["tol"]},
                        "reached_at_largest_budget": first is rows[-1]}
    return out


def plot(results: dict, path: str | Path, metric_label: str) -> Path:
    """FID vs NFE (log-x), one panel per objective, one line per sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = results["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for sampler in dict.fromkeys(r["sampler"] for r in run["records"]):
            rows = sorted((r for r in run["records"] if r["sampler"] == sampler), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], marker="o", ms=3, label=sampler)
        ax.set_xscale("log", base=2)  # NFE grids double; plain-number ticks at powers of two
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("NFE (network evaluations per sample)")
        ax.set_ylabel(metric_label)
        ax.set_title(f"{run['objective']} ({Path(run['ckpt']).parent.parent.name if run['ckpt'] else ''})",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{metric_label} vs NFE, {results['config']['num_samples']} samples", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def checkpoints_from_table1(path: str | Path, seed: int | None = None) -> list[str]:
    """The checkpoints make table1 trained (one per objective, the first seed unless given)."""
    data = json.loads(Path(path).read_text())
    out = []
    for obj, entry in data["objectives"].items():
        runs = entry["runs"]
        run = next((r for r in runs if seed is None or r["seed"] == seed), None)
        if run is None:
            raise ValueError(f"{path} has no run of {obj} with seed {seed}")
        out.append(run["ckpt"])
    return out


def run_children(ckpts: list[str], out: str | Path, *, jobs: int, threads: int | None, args: dict, log) -> list:
    """One `sampling.py --ckpt X` child per checkpoint, `jobs` at a time; their runs, in checkpoint order."""
    import concurrent.futures as cf
    import os
    import subprocess

    out = Path(out)

    def child(i: int, ckpt: str) -> list:
        part = out.with_name(f"{out.stem}.part{i}.json")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--ckpt", str(ckpt), "--out", str(part), "--plot", "",
               "--steps", ",".join(map(str, args["steps"])), "--tols", ",".join(map(str, args["tols"])),
               "--num-samples", str(args["num_samples"]), "--batch-size", str(args["batch_size"]),
               "--seed", str(args["seed"]), "--cfg-scale", str(args["cfg_scale"]), "--device", args["device"],
               "--threads", str(threads or 1)]
        if args["max_nfe"]:
            cmd += ["--max-nfe", str(args["max_nfe"])]
        if args["samplers"]:
            cmd += ["--samplers", ",".join(args["samplers"])]
        if args["metric"] == "inception":
            cmd += ["--inception"]
        for key in ("ref_stats", "inception_weights"):
            if args[key]:
                cmd += [f"--{key.replace('_', '-')}", str(args[key])]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        log(proc.stdout.rstrip())
        if proc.returncode != 0:
            raise RuntimeError(f"sampling child for {ckpt} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        runs = json.loads(part.read_text())["runs"]
        part.unlink()
        return runs

    with cf.ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda ic: child(*ic), enumerate(ckpts)))
    return [run for runs in results for run in runs]


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def run(ckpts: list[str], *, out: str | Path, plot_path: str | Path | None, metric: str = "digits",
        samplers: list[str] | None = None, steps=DEFAULT_STEPS, tols=DEFAULT_TOLS, max_nfe: int | None = None,
        num_samples: int = 500, batch_size: int = 500, seed: int = 0, cfg_scale: float = 1.0,
        device: str = "cpu", ref_stats: str | None = None, inception_weights: str | None = None,
        threads: int | None = None, jobs: int = 1, log=print) -> dict:
    """Sweep every checkpoint (jobs > 1: one child process per checkpoint); write the JSON (and plot)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    t_start = time.time()
    runs = []
    extractor = ref = None
    if jobs > 1 and len(ckpts) > 1:
        runs = run_children(ckpts, out, jobs=jobs, threads=threads, args=dict(
            samplers=samplers, steps=steps, tols=tols, max_nfe=max_nfe, num_samples=num_samples,
            batch_size=batch_size, seed=seed, cfg_scale=cfg_scale, device=device, ref_stats=ref_stats,
            inception_weights=inception_weights, metric=metric), log=log)
        ckpts = []
    for ckpt in ckpts:
        module, datamodule = load_module(ckpt, dev)
        if extractor is None:  # one feature space and reference for all runs (same data config expected)
            extractor, ref = build_metric(metric, datamodule, dev, ref_stats, inception_weights)
        name = objective_name(module)
        log(f"[sampling] {name}: {ckpt}")
        failures = []
        records = sweep_module(module, datamodule, extractor, ref, samplers=samplers, steps=steps, tols=tols,
                               max_nfe=max_nfe, num_samples=num_samples, batch_size=batch_size, seed=seed, cfg_scale=cfg_scale,
                               device=dev, log=log, failures=failures)
        runs.append({"objective": name, "ckpt": str(ckpt), "default_sampler": module.objective.default_sampler,
                     "extractor": extractor.name, "records": records, "failures": failures,
                     "nfe_within_5pct": nfe_to_reach(records)})
    metric_label = "digits-FID" if metric == "digits" else "FID (Inception)"
    results = {
        "benchmark": "sampling",
        "metric": metric_label,
        "metric_note": ("digits-FID: features of a small digits CNN classifier, NOT Inception FID"
                        if metric == "digits" else "Inception FID (torch-fidelity inception-v3-compat)"),
        "extractor": getattr(extractor, "name", None) or next((r["extractor"] for r in runs if "extractor" in r), None),
        "config": {"num_samples": num_samples, "batch_size": batch_size, "seed": seed, "cfg_scale": cfg_scale,
                   "steps": list(steps), "tols": list(tols), "max_nfe": max_nfe, "device": device,
                   "within": WITHIN, "jobs": jobs, "threads": threads},
        "nfe_note": "NFE = network calls per sampling batch (a CFG-doubled call counts once); "
                    "dopri5 sweeps atol=rtol and its NFE is adaptive (averaged over batches)",
        "runs": runs,
        "total_seconds": time.time() - t_start,
        "machine": machine_info(),
    }
    write_json(out, results)
    if plot_path:
        results["plot"] = str(plot(results, plot_path, metric_label))
        write_json(out, results)
    return results


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", nargs="+", help="checkpoints written by train.py")
    src.add_argument("--from-table1", help="results/table1.json: use its checkpoints (one per objective)")
    p.add_argument("--table1-seed", type=int, default=None, help="which seed's checkpoints (default: first)")
    p.add_argument("--out", default=str(RESULTS_DIR / "sampling.json"))
    p.add_argument("--plot", default=str(RESULTS_DIR / "sampling_fid_vs_nfe.png"), help="PNG path ('' for none)")
    p.add_argument("--samplers", default="", help="comma list to restrict (default: all of each objective)")
    p.add_argument("--steps", default=",".join(map(str, DEFAULT_STEPS)), help="num_steps grid (fixed-step)")
    p.add_argument("--tols", default=",".join(map(str, DEFAULT_TOLS)), help="dopri5 atol=rtol grid")
    p.add_argument("--max-nfe", type=int, default=None, help="skip fixed-step settings above this NFE")
    p.add_argument("--jobs", type=int, default=1, help="checkpoints swept in parallel child processes")
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--inception", action="store_true", help="Inception FID instead of digits-FID (use on GPU)")
    p.add_argument("--ref-stats", default=None, help=".npz reference mu/sigma (computed from the data if absent)")
    p.add_argument("--inception-weights", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = p.parse_args(argv)
    ckpts = a.ckpt or checkpoints_from_table1(a.from_table1, a.table1_seed)
    results = run(ckpts, out=a.out, plot_path=a.plot or None, metric="inception" if a.inception else "digits",
                  samplers=[s for s in a.samplers.split(",") if s] or None, steps=parse_ints(a.steps),
                  tols=parse_floats(a.tols), max_nfe=a.max_nfe, jobs=a.jobs, num_samples=a.num_samples, batch_size=a.batch_size, seed=a.seed,
                  cfg_scale=a.cfg_scale, device=a.device, ref_stats=a.ref_stats,
                  inception_weights=a.inception_weights, threads=a.threads)
    for run_ in results["runs"]:
        for sampler, f in run_["nfe_within_5pct"].items():
            print(f"[sampling] {run_['objective']:9s} {sampler:15s} best {results['metric']} {f['best_fid']:.3f} "
                  f"at NFE {f['best_nfe']:.0f}; within 5% from NFE {f['nfe_within']:.0f}")
    print(f"[sampling] wrote {a.out}" + (f" and {a.plot}" if a.plot else ""))
    return results


if __name__ == "__main__":
    main()
