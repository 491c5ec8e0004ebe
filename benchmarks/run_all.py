"""`make bench`: run the CPU benchmarks, each as its own CLI in a subprocess, and collect their JSON.

    python benchmarks/run_all.py                      # train_step, latent_loader, sampling -> results/*.json
    python benchmarks/run_all.py --only sampling      # a subset
    python benchmarks/run_all.py --quick              # tiny sizes (smoke test of the driver)
    python benchmarks/run_all.py --report-only        # rewrite docs/RESULTS.md from results/*.json

sampling needs trained checkpoints: those of `make table1` (results/table1.json, seed 0) when they are on
disk, else one train.py multirun over the three objectives (--sampling-train-steps) under outputs/bench/.
Every run ends by regenerating docs/RESULTS.md from whatever results/*.json exist, with command and machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, write_json  # noqa: E402

BENCHMARKS = ("train_step", "latent_loader", "sampling")
RESULTS_MD = REPO_ROOT / "docs" / "RESULTS.md"
PY = sys.executable


def train_step_cmd(out: Path, quick: bool) -> list[str]:
    """The issue's CPU target: DiT-S/2, batch 4, fp32 and bf16-mixed (tiny DiT when quick)."""
    cmd = [PY, "benchmarks/train_step.py", "--model", "S/2", "--batch-size", "4", "--precision", "fp32",
           "bf16-mixed", "--out", str(out)]
    if quick:
        cmd += ["--depth", "1", "--hidden-size", "64", "--num-heads", "2", "--input-size", "8", "--warmup", "1",
                "--steps", "2", "--windows", "1", "--matmul-size", "256", "--matmul-repeats", "2"]
    return cmd


def latent_loader_cmd(out: Path, quick: bool) -> list[str]:
    """Latents/s read from a warm cache and images/s encoded (tiny random VAE on CPU)."""
    cmd = [PY, "benchmarks/latent_loader.py", "--out", str(out)]
    if quick:
        cmd += ["--encode-images", "6", "--resolution", "64", "--encode-workers", "0", "--shard-size", "4",
                "--read-count", "300", "--batch-size", "32", "--read-seconds", "0.3"]
    return cmd


def sampling_checkpoints(args, workdir: Path, log) -> list[str]:
    """table1's seed-0 checkpoints when present, else train the three objectives once (train.py multirun)."""
    table1 = RESULTS_DIR / "table1.json"
    if table1.is_file() and not args.quick and not args.sampling_train:
        from benchmarks.sampling import checkpoints_from_table1

        ckpts = checkpoints_from_table1(table1, seed=0)
        if all(Path(c).is_file() for c in ckpts):
            log(f"[bench] sampling: the checkpoints of {table1}")
            return ckpts
    steps = 3 if args.quick else args.sampling_train_steps
    lane = workdir / "sampling_runs"
    cmd = [PY, "train.py", "-m", "experiment=digits", "objective=diffusion,score,flow", "seed=0",
           f"trainer.max_steps={steps}", f"hydra.sweep.dir={lane}",
           "hydra.sweep.subdir=${hydra:runtime.choices.objective}", "callbacks.sample_grid=null",
           "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]
    if args.quick:
        cmd += ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "data.batch_size=16",
                "trainer.num_sanity_val_steps=0", "trainer.enable_model_summary=false"]
    log(f"[bench] sampling: training checkpoints ({steps} steps): {shlex.join(cmd)}")
    run(cmd, workdir / "sampling_train.log")
    return [str(lane / o / "checkpoints" / "last.ckpt") for o in ("diffusion", "score", "flow")]


def sampling_cmd(out: Path, ckpts: list[str], args) -> list[str]:
    """FID vs NFE for every sampler of every objective (one child process per checkpoint)."""
    cmd = [PY, "benchmarks/sampling.py", "--ckpt", *ckpts, "--out", str(out),
           "--plot", str(out.with_name("sampling_fid_vs_nfe.png")), "--jobs", str(args.jobs), "--threads", "1"]
    if args.quick:
        cmd += ["--steps", "1,2", "--tols", "0.1", "--num-samples", "20", "--batch-size", "20"]
    else:
        cmd += ["--steps", args.sampling_steps, "--tols", args.sampling_tols, "--max-nfe", str(args.max_nfe),
                "--num-samples", str(args.num_samples), "--batch-size", str(args.num_samples)]
    return cmd


def run(cmd: list[str], log_path: Path) -> float:
    """Run one benchmark CLI from the repo root, its output teed to a log; fail loudly with the tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"benchmark failed (exit {rc}): {shlex.join(cmd)}\n--- {log_path} ---\n{tail}")
    return time.time() - t0


# ---- docs/RESULTS.md --------------------------------------------------------------------------------------
def _load(name: str, results_dir: Path) -> dict | None:
    path = results_dir / name
    return json.loads(path.read_text()) if path.is_file() else None


def _machine_line(m: dict | None) -> str:
    if not m:
        return "machine: not recorded"
    commit = (m.get("git_commit") or "unknown")[:10]
    load = m.get("load_avg_1min")
    return (f"machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores, torch {m.get('torch')}, "
            f"commit {commit}{' (dirty tree)' if m.get('git_dirty') else ''}, {m.get('date_utc')}"
            + (f", 1-min load average {load:.1f} when written" if load is not None else ""))


def train_step_section(d: dict, summary: dict) -> list[str]:
    lines = ["## Training step throughput (`benchmarks/train_step.py`)", "",
             f"Command: `{summary.get('commands', {}).get('train_step', 'python benchmarks/train_step.py')}`  ",
             f"{d.get('model')}, batch {d['config'].get('batch_size')}, device {d.get('device')} "
             f"({d.get('device_name')}), {d.get('threads')} threads, torch {d.get('torch')}.", "",
             "| precision | step time (median) | images/s | achieved GFLOP/s | peak GFLOP/s (source) | MFU |",
             "|---|---|---|---|---|---|"]
    for r in d["runs"]:
        lines.append(f"| {r['precision']} | {1e3 * r['step_time_s_median']:.1f} ms | {r['images_per_s']:.2f} "
                     f"| {r['achieved_flops_per_s'] / 1e9:.1f} | {r['peak_flops_per_s'] / 1e9:.1f} "
                     f"({r.get('peak_source')}) | {100 * r['mfu']:.1f}% |")
    if d.get("bf16_speedup_vs_fp32"):
        lines.append(f"\nbf16-mixed speed-up over fp32: {d['bf16_speedup_vs_fp32']:.2f}x.")
    return lines + [""]


def latent_loader_section(d: dict, summary: dict) -> list[str]:
    """Only the headline numbers; the JSON has the rest (its fields belong to latent_loader.py)."""
    read, enc = d["read"], d["encode"]
    cmd = summary.get("commands", {}).get("latent_loader", "python benchmarks/latent_loader.py")
    return ["## Latent loader (`benchmarks/latent_loader.py`)", "", f"Command: `{cmd}`", "",
            "| quantity | value |", "|---|---|",
            f"| latents/s read per process, warm cache, {read['latent_shape']} {read['dtype_on_disk']} "
            f"(target {read['target_latents_per_s_per_process']:,}) | {read['latents_per_s_per_process']:,.0f} |",
            f"| latents/s per CPU-second | {read['latents_per_cpu_s_per_process']:,.0f} |",
            f"| images/s encoded ({enc['resolution']}px) | {enc['images_per_s']:.1f} |",
            "", f"Encoder: {enc['vae']}. 1-min load average during the read: {read.get('load_average_1min')}.", ""]


def checkpoint_steps(runs: list[dict]) -> str:
    """'flow: <path> (N steps), ...' so a reader can tell which training run the sweep measured."""
    import torch

    parts = []
    for run_ in runs:
        path = Path(run_["ckpt"])
        steps = "file no longer on disk"
        if path.is_file():
            steps = f"{torch.load(path, map_location='cpu', weights_only=True).get('global_step')} training steps"
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        parts.append(f"{run_['objective']} `{shown}` ({steps})")
    return ", ".join(parts)


def sampling_section(d: dict, summary: dict) -> list[str]:
    cfg = d["config"]
    lines = ["## Sample quality vs sampling cost (`benchmarks/sampling.py`)", "",
             f"Command: `{summary.get('commands', {}).get('sampling', 'python benchmarks/sampling.py')}`  ",
             f"{d['metric']} ({d['metric_note']}), {cfg['num_samples']} samples, seed {cfg['seed']}, "
             f"cfg scale {cfg['cfg_scale']}. Plot: `results/sampling_fid_vs_nfe.png`.", "",
             f"Checkpoints (EMA weights): {checkpoint_steps(d['runs'])}.", "",
             "NFE each sampler needs to get within 5% of its own best digits-FID:", "",
             "| objective | sampler | best digits-FID | at NFE | within 5% from NFE | ms/sample there |",
             "|---|---|---|---|---|---|"]
    for run_ in d["runs"]:
        for sampler, f in run_["nfe_within_5pct"].items():
            rec = next(r for r in run_["records"] if r["sampler"] == sampler and r["nfe"] == f["nfe_within"])
            flag = " (only at the largest budget tried)" if f["reached_at_largest_budget"] else ""
            lines.append(f"| {run_['objective']} | {sampler} | {f['best_fid']:.2f} | {f['best_nfe']:.0f} "
                         f"| {f['nfe_within']:.0f}{flag} | {1e3 * rec['wall_s_per_sample']:.2f} |")
        for fail in run_.get("failures", []):
            lines.append(f"| {run_['objective']} | {fail['sampler']} | rejected {fail.get('num_steps')} steps: "
                         f"{fail['error'][:60]} | | | |")
    return lines + [""]


def write_results_md(results_dir: Path = RESULTS_DIR, path: Path = RESULTS_MD) -> Path:
    """docs/RESULTS.md: the latest number of every benchmark, with the command and machine behind it."""
    summary = _load("bench_summary.json", results_dir) or {}
    lines = ["# Results", "",
             "Latest numbers of `make table1` and `make bench` on the machine named under each section. "
             "Regenerated from `results/*.json` by `python benchmarks/run_all.py --report-only` "
             "(and at the end of `make bench` / `make table1`). digits-FID is the Fréchet distance in the "
             "features of a small digits CNN, NOT Inception FID.", ""]
    from benchmarks.compare.report import results_sections  # Table 1 and the ablation (benchmarks/compare)

    lines += results_sections(results_dir)
    sections = (("bench_train_step.json", train_step_section), ("latent_loader.json", latent_loader_section),
                ("sampling.json", sampling_section))
    for name, render in sections:
        d = _load(name, results_dir)
        if d is None:
            continue
        try:
            lines += render(d, summary)
        except (KeyError, TypeError, StopIteration) as err:  # a format change upstream: say so, keep the rest
            lines += [f"## {name}", "", f"(could not render {name}: {type(err).__name__} {err}; see the JSON)", ""]
        lines.append(_machine_line(d.get("machine") or summary.get("machine")) + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {BENCHMARKS}")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test of the driver)")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--workdir", default=str(REPO_ROOT / "outputs" / "bench"))
    p.add_argument("--report-only", action="store_true", help="only rewrite docs/RESULTS.md")
    p.add_argument("--no-report", action="store_true", help="do not touch docs/RESULTS.md")
    p.add_argument("--jobs", type=int, default=2, help="sampling: checkpoints swept in parallel")
    p.add_argument("--num-samples", type=int, default=200, help="sampling: samples per FID")
    p.add_argument("--sampling-steps", default="1,2,4,8,16,32,64")
    p.add_argument("--sampling-tols", default="0.1,0.03,0.01,0.003")
    p.add_argument("--max-nfe", type=int, default=64, help="sampling: largest fixed-step NFE")
    p.add_argument("--sampling-train", action="store_true", help="train fresh checkpoints even if table1's exist")
    p.add_argument("--sampling-train-steps", type=int, default=1500)
    a = p.parse_args(argv)
    out_dir = Path(a.out_dir)
    if a.report_only:
        print(f"[bench] wrote {write_results_md(out_dir)}")
        return {}
    only = [b for b in a.only.split(",") if b]
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(f"--only {sorted(unknown)}: unknown; choose from {BENCHMARKS}")
    workdir = Path(a.workdir)
    summary = {"benchmark": "bench_summary", "quick": a.quick, "commands": {}, "seconds": {}, "outputs": {}}
    for name in only:
        out = out_dir / ("bench_train_step.json" if name == "train_step" else f"{name}.json")
        if name == "train_step":
            cmd = train_step_cmd(out, a.quick)
        elif name == "latent_loader":
            cmd = latent_loader_cmd(out, a.quick)
        else:
            cmd = sampling_cmd(out, sampling_checkpoints(a, workdir, print), a)
        print(f"[bench] {name}: {shlex.join(cmd)}", flush=True)
        summary["seconds"][name] = run(cmd, workdir / f"{name}.log")
        summary["commands"][name] = "python " + shlex.join(c.replace(str(REPO_ROOT) + "/", "") for c in cmd[1:])
        summary["outputs"][name] = str(out)
        print(f"[bench] {name}: done in {summary['seconds'][name]:.0f}s -> {out}", flush=True)
    summary["machine"] = machine_info()
    previous = _load("bench_summary.json", out_dir) or {}
    for key in ("commands", "seconds", "outputs"):  # keep the entries of benchmarks not rerun this time
        summary[key] = {**previous.get(key, {}), **summary[key]}
    write_json(out_dir / "bench_summary.json", summary)
    if not a.no_report:
        print(f"[bench] wrote {write_results_md(out_dir)}")
    return summary


if __name__ == "__main__":
    main()
