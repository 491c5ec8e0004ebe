"""`make bench`: run the CPU benchmarks, each as its own CLI in a subprocess, and collect their JSON.

    python benchmarks/run_all.py                      # real_step, train_step, latent_loader, sampling -> results/*.json
    python benchmarks/run_all.py --only sampling      # a subset
    python benchmarks/run_all.py --quick              # tiny sizes (smoke test of the driver)
    python benchmarks/run_all.py --report-only        # rewrite docs/RESULTS.md from results/*.json

sampling needs trained checkpoints: those of `make table1` (results/table1.json, seed 0) when they are on
disk, else one train.py multirun over the three objectives (--sampling-train-steps) under outputs/bench/.
Every run ends by regenerating docs/RESULTS.md from whatever results/*.json exist; each section names the command
and the machine recorded in its own JSON (never another file's).
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

BENCHMARKS = ("real_step", "train_step", "latent_loader", "sampling")
OUTPUTS = {"real_step": "bench_real_step.json", "train_step": "bench_train_step.json"}  # others: <name>.json
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


def real_step_cmd(out: Path, quick: bool) -> list[str]:
    """What users run (train.py per objective, fp32 and bf16-mixed) beside the hand-written step, DiT-S/2 batch 4."""
    cmd = [PY, "benchmarks/real_step.py", "--rounds", "1" if quick else "2", "--out", str(out)]
    if quick:
        cmd += ["--resolution", "64", "--warmup", "1", "--steps", "2", "--matmul-size", "256", "--matmul-repeats", "1",
                "--override", "model.depth=1", "--override", "model.hidden_size=64", "--override", "model.num_heads=2"]
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
    """The machine facts a result file recorded about itself (nothing is borrowed from another file)."""
    if not m:
        return "machine: not recorded in this result file"
    commit = (m.get("git_commit") or "unknown")[:10]
    flags = m.get("cpu_flags")
    flag_text = (", CPU flags " + " ".join(f"{k}{'+' if v else '-'}" for k, v in flags.items())) if flags else ""
    gpu = m.get("gpu")
    gpu_text = ""
    if isinstance(gpu, dict):
        gpu_text = (f", GPU {gpu.get('name')} (datasheet: {gpu.get('datasheet_device') or 'unknown'}), driver "
                    f"{gpu.get('driver')}, CUDA {gpu.get('cuda_runtime')}")
    elif gpu:
        gpu_text = f", GPU {gpu}"
    load = m.get("load_avg_1_5_15") or ([m["load_avg_1min"]] if m.get("load_avg_1min") is not None else None)
    return (f"machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores{flag_text}{gpu_text}, torch {m.get('torch')}, "
            f"commit {commit}{' (dirty tree)' if m.get('git_dirty') else ''}, {m.get('date_utc')}"
            + (f", load average {'/'.join(f'{x:.1f}' for x in load)} when written" if load else "")
            + (f"; process: `{m['command'].replace(str(REPO_ROOT) + '/', '')}`" if m.get("command") else ""))


def _ms(x: float | None) -> str:
    return "–" if x is None else f"{1e3 * x:.1f} ms"


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def _gib(x: float | None) -> str:
    return "–" if x is None else f"{x / 2**30:.2f} GiB"


def _fraction(r: dict) -> str:
    """'matmul fraction' on CPU (wall / CPU time), MFU against the datasheet on GPU, or unknown."""
    if r.get("matmul_fraction") is not None:
        cpu = r.get("matmul_fraction_cpu_time")
        return f"{100 * r['matmul_fraction']:.0f}%" + (f" / {100 * cpu:.0f}%" if cpu is not None else "")
    if r.get("mfu") is not None:
        return f"MFU {100 * r['mfu']:.1f}%"
    return "unknown" if r.get("peak_source", "").startswith("unknown") else "–"


def _own_command(d: dict, summary: dict, name: str) -> str:
    """The command recorded in the result file itself; make bench's summary only for files that lack one."""
    return ((d.get("machine") or {}).get("command") or summary.get("commands", {}).get(name)
            or f"python benchmarks/{name}.py")


def real_step_section(d: dict, summary: dict) -> list[str]:
    """The real (train.py) step per objective and precision beside the hand-written lower bound."""
    net, cfg, cache = d["net"], d["config"], d["cache"]
    cmd = _own_command(d, summary, "real_step")
    on_cpu = cfg.get("device") == "cpu"
    lines = ["## Training step as users run it (`benchmarks/real_step.py`)", "",
             f"Command: `{cmd}`  ",
             f"`model={d['model']}` (patch {net['patch_size']}, hidden {net['hidden_size']}, depth {net['depth']}, "
             f"{net['num_heads']} heads), latents {cache['latent_shape']} from a synthetic cache of {cache['images']} "
             f"images written by the project's encoder (tiny random VAE: only the shape matters), device "
             f"{cfg.get('device')}, data.num_workers {cfg.get('num_workers')}; {cfg.get('warmup')} untimed then "
             f"{cfg.get('steps')} timed steps, one `train.py` process per row (the hand-written step: "
             "`benchmarks/train_step.py`, its own process). A step is the time between two batch starts inside "
             "Lightning's loop (data, forward, loss, backward, AdamW, EMA, logging). "
             + ("Fraction = FLOP rate / a 2048³ matmul of the same dtype measured in the same process (wall / "
                "CPU time; CPU time is immune to other jobs on the cores), not MFU." if on_cpu else
                "MFU = FLOP rate / the exact device's dense datasheet peak."), "",
             "| round | step | precision → chosen | batch | compile | step time | images/s | CPU-s/step | GFLOP/s "
             "| fraction | peak memory |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in d["records"]:
        chosen = r["raw"].get("trainer_precision", r["raw"].get("precision", r["precision"]))
        name = f"{r['objective']} (train.py)" if r["kind"] == "real" else "hand-written"
        lines.append(f"| {r.get('round', 0)} | {name} | {r['precision']} → {chosen} | {r['batch_size']} "
                     f"| {'on' if r['compile'] else 'off'} "
                     f"| {_ms(r['step_time_s'])} | {_num(r['images_per_s'], '.2f')} | {_num(r.get('step_cpu_s'), '.2f')} "
                     f"| {_num((r.get('achieved_flops_per_s') or 0) / 1e9 or None, '.1f')} | {_fraction(r)} "
                     f"| {_gib(r['raw'].get('peak_memory_bytes'))} |")
    comps = d.get("comparisons") or []
    if comps:
        lines += ["", "Lightning's and the project's cost over the hand-written step (real / hand-written step time, "
                  "medians over rounds; target ≤ 1.10 on CPU, ≤ 1.03 on GPU), and bf16-mixed over fp32 (target ≥ 1.5x "
                  "on a CPU with AVX-512 BF16):", "",
                  "| objective | precision | batch | compile | real / hand-written (wall) | (CPU time) "
                  "| bf16 speed-up (wall) | (CPU time) |", "|---|---|---|---|---|---|---|---|"]
        for c in comps:
            asked = c["precision"] if c["precision"] == c["trainer_precision"] else \
                f"{c['precision']} → {c['trainer_precision']}"
            lines.append(f"| {c['objective']} | {asked} | {c['batch_size']} "
                         f"| {'on' if c['compile'] else 'off'} | {_num(c.get('ratio_wall'), '.3f')} "
                         f"| {_num(c.get('ratio_cpu_time'), '.3f')} | {_num(c.get('bf16_speedup_vs_fp32'), '.2f')} "
                         f"| {_num(c.get('bf16_speedup_vs_fp32_cpu_time'), '.2f')} |")
    sdpa = sorted({op for r in d["records"] for op in (r["raw"].get("sdpa_ops") or []) if "backward" not in op})
    if sdpa:
        lines += ["", f"Attention kernels seen in a profiled step: {', '.join(f'`{o}`' for o in sdpa)}."]
    return lines + [""]


def train_step_section(d: dict, summary: dict) -> list[str]:
    cmd = _own_command(d, summary, "train_step")
    lines = ["## Training step throughput, hand-written (`benchmarks/train_step.py`)", "",
             f"Command: `{cmd}`  ",
             f"{d.get('model')}, batch {d['config'].get('batch_size')}, device {d.get('device')} "
             f"({d.get('device_name')}), {d.get('threads')} threads, torch {d.get('torch')}; "
             + ("each precision in its own process (its own peak memory). " if d.get("separate_processes") else "")
             + "Fraction = FLOP rate / same-dtype matmul measured in the same process on CPU (not MFU); "
             "MFU against the datasheet on a known GPU.", "",
             "| precision | step time (median) | images/s | CPU-s/step | achieved GFLOP/s | reference GFLOP/s (source) "
             "| fraction (wall / CPU time) | peak memory |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["runs"]:
        frac = (f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "unknown") + (
            f" / {100 * r['mfu_cpu_time']:.1f}%" if r.get("mfu_cpu_time") else "")
        ref = f"{r['peak_flops_per_s'] / 1e9:.1f}" if r.get("peak_flops_per_s") else "–"
        lines.append(f"| {r['precision']} | {1e3 * r['step_time_s_median']:.1f} ms | {r['images_per_s']:.2f} "
                     f"| {_num(r.get('step_cpu_time_s_median'), '.2f')} | {r['achieved_flops_per_s'] / 1e9:.1f} "
                     f"| {ref} ({r.get('peak_source')}) | {frac} | {_gib(r.get('peak_memory_bytes'))} |")
    if d.get("bf16_speedup_vs_fp32"):
        cpu = d.get("bf16_speedup_vs_fp32_cpu_time")
        lines.append(f"\nbf16-mixed speed-up over fp32: {d['bf16_speedup_vs_fp32']:.2f}x"
                     + (f" ({cpu:.2f}x in CPU time)" if cpu else "") + ".")
    return lines + [""]


def gpu_check_section(d: dict | None, summary: dict) -> list[str]:
    """benchmarks/gpu_check.sh's JSON: training MFU, SDPA kernel, sampling and loader throughput, CUDA tests."""
    head = ["## GPU check (`bash benchmarks/gpu_check.sh`)", ""]
    if d is None:
        return head + ["Not run yet: `results/gpu_check.json` is written by `bash benchmarks/gpu_check.sh` on a "
                       "CUDA machine (it exits with one line and code 2 elsewhere).", ""]
    lines = head + [f"Total {d['seconds'].get('total', 0):.0f} s (budget {d.get('budget_s')} s)"
                    + (" — quick sizes" if d.get("quick") else "") + "."]
    for phase, err in (d.get("errors") or {}).items():
        lines.append(f"\nPhase {phase} FAILED: `{err[:300]}`")
    trains = [d["phases"][k] for k in ("train", "train_compiled") if d["phases"].get(k)]
    if trains:
        lines += ["", "| step | batch | compile | step time | images/s | MFU (datasheet) | SDPA | host syncs/window "
                  "| peak memory |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for t in trains for r in t["records"]):
            name = f"{r['objective']} (train.py)" if r["kind"] == "real" else "hand-written"
            syncs = r["raw"].get("host_syncs_in_window", r["raw"].get("host_syncs_in_timed_loop"))
            lines.append(f"| {name} | {r['batch_size']} | {'on' if r['compile'] else 'off'} | {_ms(r['step_time_s'])} "
                         f"| {r['images_per_s']:.0f} | {_fraction(r)} | {r.get('sdpa_backend', '–')} "
                         f"| {_num(syncs, 'd')} | {_gib(r['raw'].get('peak_memory_bytes'))} |")
        for c in (c for t in trains for c in t.get("comparisons") or []):
            if c.get("ratio_wall"):
                lines.append(f"\nreal / hand-written, {c['objective']} batch {c['batch_size']} compile "
                             f"{'on' if c['compile'] else 'off'}: {c['ratio_wall']:.3f}")
    sampling = d["phases"].get("sampling")
    if sampling:
        lines += ["", "| sampler | NFE | cfg scale | batch | images/s |", "|---|---|---|---|---|"]
        for s in sampling:
            lines.append(f"| {s['objective']} {s['sampler']}-{s['num_steps']} | {s['nfe']} | {s['cfg_scale']} "
                         f"| {s['batch_size']} | {s['images_per_s']:.1f} |")
    loader = d["phases"].get("loader")
    if loader:
        lines.append(f"\nLatent loader into the GPU, batch {loader['batch_size']}: datamodule ({loader['num_workers']} "
                     f"workers, posterior on CPU) {loader['datamodule_cpu_posterior']['latents_per_s']:,.0f} latents/s; "
                     f"posterior on the GPU (1 process) "
                     f"{loader['device_posterior_single_process']['latents_per_s']:,.0f} latents/s.")
    tests = d["phases"].get("tests")
    if tests:
        lines.append(f"\nCUDA-only tests: {tests.get('counts')} (`{tests.get('command')}`).")
    return lines + [""]


def latent_loader_section(d: dict, summary: dict) -> list[str]:
    """Only the headline numbers; the JSON has the rest (its fields belong to latent_loader.py)."""
    read, enc = d["read"], d["encode"]
    cmd = _own_command(d, summary, "latent_loader")
    return ["## Latent loader (`benchmarks/latent_loader.py`)", "", f"Command: `{cmd}`", "",
            "| quantity | value |", "|---|---|",
            f"| latents/s read per process, warm cache, {read['latent_shape']} {read['dtype_on_disk']} "
            f"(target {read['target_latents_per_s_per_process']:,}) | {read['latents_per_s_per_process']:,.0f} |",
            f"| latents/s per CPU-second | {read['latents_per_cpu_s_per_process']:,.0f} |",
            f"| images/s encoded ({enc['resolution']}px) | {enc['images_per_s']:.1f} |",
            "", f"Encoder: {enc['vae']}. 1-min load average during the read: {read.get('load_average_1min')}.", ""]


def oracle_table_section(d: dict, summary: dict) -> list[str]:
    """Every sampler fed the exact optimum of a Gaussian problem: what remains is the solver's own error."""
    m, p = d.get("machine") or {}, d["problem"]
    cmd = m.get("command") or "python benchmarks/oracle_table.py"
    lines = ["## Samplers on an analytic oracle (`benchmarks/oracle_table.py`)", "",
             f"Command: `{cmd}`  ",
             f"x0 | y ~ N(m_y, {p['s']}² I) with {p['classes']} classes, data shape {p['dims']}; each objective's "
             f"network is replaced by its exact optimum (tests/oracles.py), float64, {p['n']:,} samples per run, "
             f"{p['n_ll']} points for the likelihood. mean/std err: max over classes and dims of |sample mean − m_y| "
             "and |sample std − s| (stochastic samplers: Monte Carlo noise ≈ 0.005 included); map err: max |x − the "
             "exact PF-ODE map of the same noise|; LL err: mean |log p − log N| per dim (nats; the ELBO row: its "
             f"signed gap). Machine: {m.get('cpu_model', '?')}, commit {str(m.get('git_commit', '?'))[:10]}"
             f"{' (dirty)' if m.get('git_dirty') else ''}, {m.get('date_utc', '?')}.", "",
             "| objective | sampler | steps | NFE | mean err | std err | map err | LL err (nats/dim) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['objective']} | {r['sampler']} | {r['steps'] or 'adaptive'} | {r['nfe']} "
                     f"| {_num(r['mean_err'], '.4f')} | {_num(r['std_err'], '.4f')} | {_num(r.get('map_err'), '.2e')} "
                     f"| {_num(r['ll_err_nats_per_dim'], '.2e')} |")
    return lines + [""]


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
             f"Command: `{_own_command(d, summary, 'sampling')}`  ",
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
    sections = (("bench_real_step.json", real_step_section), ("bench_train_step.json", train_step_section),
                ("latent_loader.json", latent_loader_section), ("sampling.json", sampling_section),
                ("gpu_check.json", gpu_check_section),
                ("oracle_table.json", oracle_table_section))
    for name, render in sections:
        d = _load(name, results_dir)
        if d is None and render is not gpu_check_section:
            continue
        try:
            lines += render(d, summary)
        except (KeyError, TypeError, StopIteration) as err:  # a format change upstream: say so, keep the rest
            lines += [f"## {name}", "", f"(could not render {name}: {type(err).__name__} {err}; see the JSON)", ""]
        if d is not None:
            lines.append(_machine_line(d.get("machine")) + "\n")
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
        out = out_dir / OUTPUTS.get(name, f"{name}.json")
        if name == "real_step":
            cmd = real_step_cmd(out, a.quick)
        elif name == "train_step":
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
