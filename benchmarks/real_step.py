"""The training step users run, timed inside `train.py` itself, beside the hand-written lower bound; writes JSON.

Each measurement is one `python train.py ...` process: the Hydra-composed GenerativeModule with its objective
(diffusion with its VLB term, score, flow), Lightning's Trainer and the latent datamodule reading a synthetic
latent cache of ImageNet's shape (JPEGs -> `python -m datamodules.latent_imagenet encode` with a tiny random
AutoencoderKL saved as data.vae_local_path). The only addition is a StepTimer callback (this file) injected with
`+callbacks.bench_step_timer`; the periodic/end-of-fit callbacks (checkpoints, sample grids, FID) are set to null
because none of them fires within the timed steps. A step is the time between two consecutive batch starts
(data, forward, loss, backward, AdamW, EMA, logging). The hand-written step (benchmarks/train_step.py) runs in
its own process with the same DiT, batch and precision; real/hand-written is Lightning's and the project's cost.

    python benchmarks/real_step.py --out results/bench_real_step.json                  # DiT-S/2, batch 4, CPU
    python benchmarks/real_step.py --model dit_b --batch-sizes 32 256 --precisions bf16-mixed --compile off on

On CPU the FLOP rate is compared with a large matmul of the same dtype measured in the same process ("matmul
fraction", not MFU); on GPU with the exact device's dense datasheet peak (MFU), or reported unknown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks.common import REPO_ROOT, command_line, datasheet_peak, machine_info, write_json  # noqa: E402
from benchmarks.train_step import dit_forward_flops, matmul_flops_per_s  # noqa: E402

OBJECTIVES = ("diffusion", "score", "flow")
# trainer.precision values this benchmark passes to train.py; "config" leaves the trainer config's own
PRECISIONS = ("auto", "32-true", "bf16-mixed", "config")
HAND_WRITTEN = {"32-true": "fp32", "bf16-mixed": "bf16-mixed"}  # -> train_step.py --precision
TIMER_KEY = "bench_step_timer"


# ---- inside train.py: the timing callback ----------------------------------------------------------------
class StepTimer(L.Callback):
    """Times optimizer steps warmup..warmup+steps-1 of train.py's own fit loop and writes what it saw as JSON."""

    def __init__(self, out: str, warmup: int = 3, steps: int = 10, matmul_size: int = 2048,
                 matmul_repeats: int = 3, profile_sdpa: bool = True):
        self.out, self.warmup, self.steps = Path(out), int(warmup), int(steps)
        self.matmul_size, self.matmul_repeats, self.profile_sdpa = int(matmul_size), int(matmul_repeats), profile_sdpa
        self.wall: list[float] = []  # perf_counter at each batch start in the window (steps + 1 stamps)
        self.cpu: list[float] = []  # process_time likewise (all threads of this process)
        self.matmul: list[float] = []
        self.matmul_cpu: list[float] = []
        self.host_syncs: int | None = None
        self.sdpa_ops: list[str] | None = None
        self._caught = self._catcher = self._profiler = None

    def _matmul(self, pl_module) -> None:
        """Same-run matmul reference on CPU, in the dtype the step's matmuls run in."""
        if pl_module.device.type != "cpu" or not self.matmul_repeats:
            return
        dtype = torch.bfloat16 if "bf16" in str(pl_module.trainer.precision) else torch.float32
        rates, cpu_rates = matmul_flops_per_s(dtype, pl_module.device, self.matmul_size, self.matmul_repeats)
        self.matmul += rates
        self.matmul_cpu += cpu_rates

    def on_train_start(self, trainer, pl_module) -> None:
        self._matmul(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step, cuda = trainer.global_step, pl_module.device.type == "cuda"
        if not self.warmup <= step <= self.warmup + self.steps:
            return
        if cuda and step == self.warmup + self.steps:  # end of window: stop counting syncs, then wait once
            torch.cuda.set_sync_debug_mode("default")
            self.host_syncs = sum("synchroniz" in str(w.message) for w in self._caught)
            self._catcher.__exit__(None, None, None)
        if cuda and step in (self.warmup, self.warmup + self.steps):
            torch.cuda.synchronize(pl_module.device)  # only at the window's two ends
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        if cuda and step == self.warmup:  # every sync inside the window is counted (torch warns on each)
            self._catcher = warnings.catch_warnings(record=True)
            self._caught = self._catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        if step == self.warmup + self.steps and self.profile_sdpa:  # one more step, untimed, under the profiler
            activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._profiler is not None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self._profiler.__exit__(None, None, None)
            names = {e.name for e in self._profiler.events()}
            self.sdpa_ops = sorted(n for n in names if "scaled_dot_product" in n or "flash_attention" in n)
            self._profiler = None

    def on_train_end(self, trainer, pl_module) -> None:
        self._matmul(pl_module)
        device = pl_module.device
        net = pl_module.net
        opt = trainer.optimizers[0] if trainer.optimizers else None
        loader = trainer.train_dataloader
        record = {
            "pid": os.getpid(),
            "device": str(device),
            "trainer_precision": str(trainer.precision),
            "trainer_strategy": type(trainer.strategy).__name__,
            "objective": type(pl_module.objective).__name__,
            "net": type(net).__name__,
            "compiled": bool(getattr(pl_module.hparams, "compile", False)),
            "params": sum(p.numel() for p in net.parameters()),
            "batch_size": int(loader.batch_size) if loader is not None and loader.batch_size else None,
            "num_workers": loader.num_workers if loader is not None else None,
            "optimizer": type(opt).__name__ if opt is not None else None,
            "optimizer_fused": opt.defaults.get("fused") if opt is not None else None,
            "warmup_steps": self.warmup,
            "global_step_end": trainer.global_step,
            "step_wall_s": [b - a for a, b in zip(self.wall, self.wall[1:])],
            "step_cpu_s": [b - a for a, b in zip(self.cpu, self.cpu[1:])],
            "window_wall_s": self.wall[-1] - self.wall[0] if len(self.wall) > 1 else None,
            "host_syncs_in_window": self.host_syncs,
            "sdpa_ops": self.sdpa_ops,
            "matmul_flops_per_s_samples": self.matmul or None,
            "matmul_flops_per_cpu_s_samples": self.matmul_cpu or None,
            "threads": torch.get_num_threads(),
            "load_avg_1min_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        if hasattr(net, "blocks") and hasattr(net, "hidden_size"):  # a DiT: FLOPs from its architecture
            record["forward_flops_per_image"] = dit_forward_flops(net, 1)
        if device.type == "cuda":
            record.update(peak_memory_bytes=torch.cuda.max_memory_allocated(device),
                          peak_memory_reserved_bytes=torch.cuda.max_memory_reserved(device),
                          peak_memory_kind="cuda_max_memory_allocated", gpu_name=torch.cuda.get_device_name(device))
        else:
            record.update(peak_memory_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          peak_memory_kind="process_peak_rss")
        if trainer.is_global_zero:
            write_json(self.out, record)


# ---- the synthetic latent cache --------------------------------------------------------------------------
def write_jpegs(folder: Path, count: int, resolution: int, classes: int = 8) -> None:
    """Smooth random square JPEGs in an ImageFolder layout (train/<wnid>/*.JPEG), `classes` wnids."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    for i in range(count):
        wnid = folder / f"n{i % classes:08d}"
        wnid.mkdir(parents=True, exist_ok=True)
        a, b = rng.uniform(0.5, 3.0, 2)
        base = np.stack([np.sin(xx / (9 * a)), np.cos(yy / (11 * b)), np.sin((xx - yy) / (13 * a * b))], -1)
        arr = (base * 90 + 128 + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(wnid / f"img_{i:06d}.JPEG", quality=90)


def synthetic_cache(workdir: Path, images: int, resolution: int) -> dict:
    """A complete latent cache written by the project's encoder (`make latents`' code) with a tiny random VAE.

    Returns the data.* overrides that point train.py at it. Reused when it is already complete.
    """
    from datamodules.latent_cache import is_complete
    from datamodules.latent_imagenet import main as encode_main
    from datamodules.vae import build_tiny_autoencoder

    root, cache, vae_dir = workdir / "imagenet", workdir / f"latents_{images}x{resolution}", workdir / "tiny_vae"
    overrides = {"data.cache_dir": str(cache), "data.vae_local_path": str(vae_dir),
                 "data.resolution": resolution, "data.image_size": resolution // 8}
    if is_complete(cache) and (vae_dir / "config.json").is_file():
        return overrides
    if not (vae_dir / "config.json").is_file():
        build_tiny_autoencoder(levels=4).save_pretrained(vae_dir)  # 4 levels: downsampling 8, as the SD VAE
    if not (root / "train").is_dir() or sum(1 for _ in (root / "train").rglob("*.JPEG")) != images:
        write_jpegs(root / "train", images, resolution)
    args = ["encode", f"data.root={root}", "data.encode_num_workers=0", "data.encode_batch_size=16",
            f"data.shard_size={max(images // 2, 1)}", "data.progress=false",
            *(f"{k}={v}" for k, v in overrides.items())]
    if encode_main(args) != 0:
        raise RuntimeError(f"latent cache encode failed: python -m datamodules.latent_imagenet {shlex.join(args)}")
    return overrides


# ---- the driver ------------------------------------------------------------------------------------------
def compose_train_config(overrides: list[str]):
    """conf/train.yaml with `overrides`, as train.py would compose it (without running anything)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def child_env(threads: int | None) -> dict[str, str]:
    """Offline, no W&B, the same OpenMP wait policy as train_step.py (passive: fair on shared cores)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(REPO_ROOT))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    """Run a child from the repo root, output to `log`; fail with its tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise RuntimeError(f"exit {rc}: {shlex.join(cmd)}\n--- {log} ---\n{tail}")


def chosen(precision: str) -> str:
    """Lightning's name for a precision ('32' is '32-true')."""
    return {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed"}.get(str(precision), str(precision))


def plan_precisions(requested: list[str], device: str) -> tuple[list[str], str | None]:
    """The precisions to run and what `auto` resolves to here (workflow.hardware, as train.py resolves it).

    An explicit precision equal to auto's choice is dropped: the auto run measures it, recording the choice.
    """
    try:
        from workflow.hardware import resolve_precision
    except ImportError:  # a checkout without precision=auto
        return [p for p in requested if p != "auto"], None
    auto = resolve_precision("auto", on_gpu=device == "cuda").value if "auto" in requested else None
    return [p for p in requested if p == "auto" or chosen(p) != auto], auto


def train_overrides(args, objective: str, precision: str, batch: int, compile_: bool, data: dict,
                    run_dir: Path, timer_out: Path) -> list[str]:
    """The train.py command line of one measurement (callbacks other than the timer set to null)."""
    base = ["data=latent_imagenet", f"model={args.model}", f"objective={objective}",
            f"trainer={'cpu' if args.device == 'cpu' else 'default'}", "logger=csv",
            *(f"{k}={v}" for k, v in data.items()), f"data.batch_size={batch}", "global_batch_size=null",
            "data.val_size=0", f"data.num_workers={args.num_workers}", "data.progress=false",
            f"compile={str(compile_).lower()}", f"seed={args.seed}",
            f"trainer.max_steps={args.warmup + args.steps + 1}", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"hydra.run.dir={run_dir}",
            *([f"threads={args.threads}"] if args.threads else []), *args.override]
    if precision != "config":
        base.append(f"trainer.precision={precision}")
    callbacks = compose_train_config([o for o in base if not o.startswith("hydra.")]).get("callbacks") or {}
    base += [f"callbacks.{name}=null" for name, cb in callbacks.items() if cb is not None]
    timer = {"_target_": f"benchmarks.real_step.{StepTimer.__name__}", "out": timer_out, "warmup": args.warmup,
             "steps": args.steps, "matmul_size": args.matmul_size, "matmul_repeats": args.matmul_repeats,
             "profile_sdpa": str(args.profile_sdpa).lower()}
    return base + [f"+callbacks.{TIMER_KEY}.{k}={v}" for k, v in timer.items()]


def hand_written_argv(args, net_cfg, precision: str, batch: int, compile_: bool, out: Path) -> list[str]:
    """benchmarks/train_step.py with the same DiT (shape, heads, depth, patch), batch and (resolved) precision."""
    hand = HAND_WRITTEN[precision]
    if args.device == "cuda" and hand == "fp32":
        hand = "tf32"  # train.py turns TF32 on for fp32 on CUDA
    return [sys.executable, "benchmarks/train_step.py", "--model", f"S/{net_cfg.patch_size}",
            "--depth", str(net_cfg.depth), "--hidden-size", str(net_cfg.hidden_size),
            "--num-heads", str(net_cfg.num_heads), "--input-size", str(net_cfg.input_size),
            "--in-channels", str(net_cfg.in_channels), "--num-classes", str(net_cfg.num_classes),
            "--batch-size", str(batch), "--precision", hand, "--device", args.device,
            f"--{'' if compile_ else 'no-'}compile", "--warmup", str(args.warmup), "--steps", str(args.steps),
            "--windows", "1", "--matmul-size", str(args.matmul_size), "--matmul-repeats", str(args.matmul_repeats),
            "--seed", str(args.seed), "--out", str(out), *(["--threads", str(args.threads)] if args.threads else [])]


def summarize_real(rec: dict, batch: int) -> dict:
    """Step time, images/s, CPU-s/step, FLOP rate and its ratio to the same-run matmul (CPU) or datasheet (GPU)."""
    walls, cpus = rec["step_wall_s"], rec["step_cpu_s"]
    cuda = rec["device"].startswith("cuda")
    # on CUDA the host does not wait per step: only the window's mean is a time; on CPU each step is
    step_s = rec["window_wall_s"] / len(walls) if cuda else statistics.median(walls)
    out = {"step_time_s": step_s, "images_per_s": batch / step_s,
           "step_cpu_s": None if cuda else statistics.median(cpus)}
    flops_img = rec.get("forward_flops_per_image")
    if not flops_img:
        return out
    flops_step = 3 * flops_img * batch  # training = forward + 2x forward for the backward
    out.update(train_flops_per_step=flops_step, achieved_flops_per_s=flops_step / step_s)
    if cuda:
        math_mode = "bf16" if "bf16" in rec["trainer_precision"] or "16" in rec["trainer_precision"] else "tf32"
        peak, source = datasheet_peak(rec["gpu_name"], math_mode)
        out.update(peak_flops_per_s=peak, peak_source=source, mfu=flops_step / step_s / peak if peak else None)
    elif rec.get("matmul_flops_per_s_samples"):
        mm, mm_cpu = statistics.median(rec["matmul_flops_per_s_samples"]), \
            statistics.median(rec["matmul_flops_per_cpu_s_samples"])
        out.update(matmul_flops_per_s=mm, matmul_fraction=flops_step / step_s / mm,
                   matmul_fraction_cpu_time=flops_step / out["step_cpu_s"] / mm_cpu)
    return out


def summarize_hand(run: dict, batch: int) -> dict:
    """The same fields from a train_step.py run record."""
    out = {"step_time_s": run["step_time_s_median"], "images_per_s": batch / run["step_time_s_median"],
           "step_cpu_s": run.get("step_cpu_time_s_median"), "train_flops_per_step": run["train_flops_per_step"],
           "achieved_flops_per_s": run["achieved_flops_per_s"]}
    if run.get("matmul_flops_per_s_samples"):
        out.update(matmul_flops_per_s=run["peak_flops_per_s"], matmul_fraction=run["mfu"],
                   matmul_fraction_cpu_time=run["mfu_cpu_time"])
    else:
        out.update(peak_flops_per_s=run["peak_flops_per_s"], peak_source=run["peak_source"], mfu=run["mfu"])
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="dit_s", help="conf/model option (dit_s = DiT-S/2)")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--precisions", nargs="+", default=["auto", "32-true", "bf16-mixed"], choices=PRECISIONS,
                   help="trainer.precision of the runs; auto is resolved by train.py (an explicit duplicate of "
                        "its choice is skipped)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[4], help="per-process batch sizes")
    p.add_argument("--compile", nargs="+", default=["off"], choices=("off", "on"), help="compile=false / true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--warmup", type=int, default=3, help="untimed optimizer steps first")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--rounds", type=int, default=1, help="repeat the whole sequence (drift on shared machines)")
    p.add_argument("--num-workers", type=int, default=None, help="data.num_workers (default: 0 on CPU, 8 on GPU)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every child (default: torch's)")
    p.add_argument("--images", type=int, default=None, help="images in the synthetic cache (default 8x batch)")
    p.add_argument("--resolution", type=int, default=256, help="synthetic image size (latents resolution/8)")
    p.add_argument("--hand-written", action=argparse.BooleanOptionalAction, default=True,
                   help="also time benchmarks/train_step.py (the lower bound) for every configuration")
    p.add_argument("--hand-written-compiled", action=argparse.BooleanOptionalAction, default=True,
                   help="the hand-written step also for compile=on (each is one more compile)")
    p.add_argument("--profile-sdpa", action=argparse.BooleanOptionalAction, default=True,
                   help="profile one extra step to record the attention (SDPA) kernels used")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--override", action="append", default=[], help="extra train.py override (repeatable)")
    p.add_argument("--workdir", type=Path, default=None, help="cache, runs and logs (default: a temp folder)")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "bench_real_step.json")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device here")
    if a.num_workers is None:
        a.num_workers = 0 if a.device == "cpu" else 8
    return a


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.command = command_line(__file__, argv)
    with tempfile.TemporaryDirectory(prefix="real_step_") as tmp:
        work = Path(args.workdir or tmp).resolve()
        return run(args, work)


def run(args, work: Path) -> dict:
    t0 = time.time()
    images = args.images or max(8 * max(args.batch_sizes), 32)
    print(f"[real_step] synthetic latent cache: {images} images at {args.resolution}px under {work}", flush=True)
    data = synthetic_cache(work, images, args.resolution)
    net_cfg = compose_train_config([f"model={args.model}", "data=latent_imagenet", *(f"{k}={v}" for k, v in
                                    data.items()), *[o for o in args.override if o.startswith("model.")]]).model
    env = child_env(args.threads)
    precisions, auto = plan_precisions(args.precisions, args.device)
    if auto:
        print(f"[real_step] trainer.precision=auto resolves to {auto} here", flush=True)
    records = []
    for rnd in range(args.rounds):
        for batch in args.batch_sizes:
            for compile_ in (c == "on" for c in args.compile):
                for precision in precisions:
                    tag = f"b{batch}_{'compiled' if compile_ else 'eager'}_{precision}_r{rnd}"
                    resolved = auto if precision == "auto" else chosen(precision)
                    if args.hand_written and resolved in HAND_WRITTEN and (args.hand_written_compiled
                                                                           or not compile_):
                        out = work / f"hand_{tag}.json"
                        cmd = hand_written_argv(args, net_cfg, resolved, batch, compile_, out)
                        print(f"[real_step] hand-written {tag}", flush=True)
                        run_logged(cmd, work / "logs" / f"hand_{tag}.log", env)
                        hand = json.loads(out.read_text())
                        records.append({"kind": "hand_written", "objective": None, "precision": resolved,
                                        "batch_size": batch, "compile": compile_, "round": rnd,
                                        "command": "python " + shlex.join(cmd[1:]),
                                        **summarize_hand(hand["runs"][0], batch), "raw": hand["runs"][0]})
                    for objective in args.objectives:
                        out = work / f"real_{objective}_{tag}.json"
                        ov = train_overrides(args, objective, precision, batch, compile_, data,
                                             work / "runs" / f"{objective}_{tag}", out)
                        cmd = [sys.executable, "train.py", *ov]
                        print(f"[real_step] train.py {objective} {tag}", flush=True)
                        run_logged(cmd, work / "logs" / f"real_{objective}_{tag}.log", env)
                        rec = json.loads(out.read_text())
                        records.append({"kind": "real", "objective": objective, "precision": precision,
                                        "batch_size": batch, "compile": compile_, "round": rnd,
                                        "command": "python " + shlex.join(cmd[1:]),
                                        **summarize_real(rec, batch), "raw": rec})
                        r = records[-1]
                        print(f"[real_step]   {r['step_time_s'] * 1e3:.1f} ms/step, {r['images_per_s']:.2f} img/s"
                              + (f", {r['step_cpu_s']:.2f} CPU-s/step" if r.get("step_cpu_s") else "")
                              + f", precision chosen: {rec['trainer_precision']}", flush=True)
    result = {
        "benchmark": "real_step",
        "model": args.model,
        "auto_precision": auto,
        "net": {k: net_cfg[k] for k in ("patch_size", "hidden_size", "depth", "num_heads", "input_size",
                                        "in_channels", "num_classes")},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "command"},
        "cache": {"images": images, "resolution": args.resolution,
                  "latent_shape": [4, args.resolution // 8, args.resolution // 8],
                  "vae": "tiny random AutoencoderKL (4 levels) as data.vae_local_path, NOT the SD VAE: only "
                         "the cache's shape matters to the training step"},
        "callbacks_note": "every configured callback set to null (none fires within the timed steps); "
                          f"callbacks.{TIMER_KEY} added",
        "records": records,
        "comparisons": compare(records),
        "seconds": time.time() - t0,
        "machine": machine_info(args.command),
    }
    write_json(args.out, result)
    print(f"[real_step] wrote {args.out}", flush=True)
    for c in (c for c in result["comparisons"] if c.get("ratio_wall")):
        print(f"[real_step] {c['objective']} {c['precision']} b={c['batch_size']} compile={c['compile']}: "
              f"real/hand-written {c['ratio_wall']:.3f} (wall)"
              + (f", {c['ratio_cpu_time']:.3f} (CPU time)" if c.get("ratio_cpu_time") else ""), flush=True)
    return result


def _pooled(records: list[dict], key: str) -> float | None:
    """Median over rounds (one value per round)."""
    vals = [r[key] for r in records if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def compare(records: list[dict]) -> list[dict]:
    """Per objective, requested precision, batch and compile: real/hand-written at the precision train.py chose
    (wall and CPU time), and the bf16-mixed speed-up over the same objective's fp32 run."""
    out = []
    real = [r for r in records if r["kind"] == "real"]
    hand = [r for r in records if r["kind"] == "hand_written"]
    groups = dict.fromkeys((r["objective"], r["precision"], r["batch_size"], r["compile"]) for r in real)
    for objective, precision, batch, compile_ in groups:
        mine = [r for r in real if (r["objective"], r["precision"], r["batch_size"], r["compile"])
                == (objective, precision, batch, compile_)]
        picked = chosen(mine[0]["raw"]["trainer_precision"])
        row = {"objective": objective, "precision": precision, "batch_size": batch, "compile": compile_,
               "trainer_precision": picked, "real_step_time_s": _pooled(mine, "step_time_s"),
               "real_step_cpu_s": _pooled(mine, "step_cpu_s")}
        lower = [r for r in hand if (r["precision"], r["batch_size"], r["compile"]) == (picked, batch, compile_)]
        if lower:
            row.update(hand_step_time_s=_pooled(lower, "step_time_s"), hand_step_cpu_s=_pooled(lower, "step_cpu_s"))
            row["ratio_wall"] = row["real_step_time_s"] / row["hand_step_time_s"]
            if row["real_step_cpu_s"] and row["hand_step_cpu_s"]:
                row["ratio_cpu_time"] = row["real_step_cpu_s"] / row["hand_step_cpu_s"]
        fp32 = [r for r in real if r["objective"] == objective and r["batch_size"] == batch
                and r["compile"] == compile_ and chosen(r["raw"]["trainer_precision"]) == "32-true"]
        if picked == "bf16-mixed" and fp32:
            row["bf16_speedup_vs_fp32"] = _pooled(fp32, "step_time_s") / row["real_step_time_s"]
            if row["real_step_cpu_s"]:
                row["bf16_speedup_vs_fp32_cpu_time"] = _pooled(fp32, "step_cpu_s") / row["real_step_cpu_s"]
        out.append(row)
    return out


if __name__ == "__main__":
    main()
