"""The one-command GPU check (run through benchmarks/gpu_check.sh); random weights, no network; one JSON.

Phases (each timed; a failing phase is recorded and the rest still run; the JSON is rewritten after each):
  train     (and train_compiled) DiT-B/2 bf16-mixed through train.py (benchmarks/real_step.py) at per-GPU batch 32 and 256, with
            and without compile: step time, images/s, MFU against the exact device's dense datasheet peak,
            peak memory, host syncs in the timed window, the SDPA kernels used (flash / efficient / cudnn /
            math); the hand-written step (eager) beside it for Lightning's overhead.
  sampling  DDPM-250 (diffusion) and Heun-50 (flow) images/s for DiT-B/2 with the objectives' own samplers.
  loader    latents/s into the GPU from a latent cache of ImageNet's shape: the datamodule as training uses
            it (posterior sampled in the CPU workers), and the posterior sampled on the GPU from the cache's
            mean/std arrays.
  tests     the test suite's CUDA-only tests (benchmarks/gpu_tests.py selects them).

    bash benchmarks/gpu_check.sh                        # -> results/gpu_check.json
    bash benchmarks/gpu_check.sh --quick --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from benchmarks.common import REPO_ROOT, CountingNet, machine_info, write_json  # noqa: E402

SDPA_BACKENDS = (("flash", "flash_attention"), ("efficient", "efficient_attention"), ("cudnn", "cudnn_attention"),
                 ("math", "attention_math"))
BUDGET_S = 8 * 60
PHASES = ("train", "train_compiled", "sampling", "loader", "tests")  # a failed compile keeps the eager figures


def sdpa_backend(ops: list[str] | None) -> str:
    """The SDPA kernel family from the aten op names a profiled step ran (e.g. flash, efficient)."""
    if not ops:
        return "not recorded"
    found = [name for name, key in SDPA_BACKENDS if any(key in op for op in ops)]
    return "+".join(found) if found else "unknown (" + ", ".join(ops) + ")"


def compose(overrides: list[str]):
    from benchmarks.real_step import compose_train_config

    return compose_train_config(overrides)


def time_call(fn, device: torch.device) -> float:
    """Wall seconds of fn(), the device drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def sampling_throughput(device: torch.device, model: str = "dit_b", batch: int = 128,
                        cfg_scales: tuple[float, ...] = (1.0, 1.5),
                        runs: tuple[tuple[str, str, int], ...] = (("diffusion", "ddpm", 250), ("flow", "heun", 50)),
                        overrides: tuple[str, ...] = ()) -> list[dict]:
    """Images/s of each (objective, sampler, steps) with random weights, fp32 net with TF32 as train.py sets it."""
    from hydra.utils import instantiate

    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    out = []
    for objective_name, sampler, steps in runs:
        cfg = compose([f"model={model}", "data=latent_imagenet", f"objective={objective_name}", *overrides])
        torch.manual_seed(0)
        net = CountingNet(instantiate(cfg.model)).to(device).eval()
        objective = instantiate(cfg.objective).to(device)
        shape = (batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        noise = torch.randn(shape, device=device)
        y = torch.randint(0, cfg.data.num_classes, (batch,), device=device)
        with torch.no_grad():
            objective.sample(net, noise, y, sampler=sampler, num_steps=2)  # warm-up: kernels, allocator
            for cfg_scale in cfg_scales:
                net.reset()
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                seconds = time_call(functools.partial(objective.sample, net, noise, y, sampler=sampler,
                                                      num_steps=steps, cfg_scale=cfg_scale), device)
                out.append({"objective": objective_name, "sampler": sampler, "num_steps": steps, "nfe": net.calls,
                            "cfg_scale": cfg_scale, "batch_size": batch, "seconds": seconds,
                            "images_per_s": batch / seconds, "ms_per_nfe": 1e3 * seconds / max(net.calls, 1),
                            "peak_memory_bytes": torch.cuda.max_memory_allocated(device)
                            if device.type == "cuda" else None})
                print(f"[gpu_check] sampling {objective_name} {sampler}-{steps} cfg {cfg_scale}: "
                      f"{out[-1]['images_per_s']:.1f} img/s ({net.calls} NFE)", flush=True)
    return out


def loader_throughput(device: torch.device, data: dict, batch: int, workers: int, seconds: float) -> dict:
    """Latents/s reaching `device`: the datamodule's loader (CPU posterior), then posterior sampling on device."""
    import numpy as np

    from datamodules.latent_imagenet import datamodule_from_config

    cfg = compose(["data=latent_imagenet", *(f"{k}={v}" for k, v in data.items()), f"data.batch_size={batch}",
                   f"data.num_workers={workers}", "data.val_size=0", "data.progress=false"])
    dm = datamodule_from_config(cfg.data)
    dm.setup("fit")
    result = {"batch_size": batch, "num_workers": workers, "cache_latents": len(dm.train_set),
              "seconds_per_measure": seconds}

    def drain(next_batch) -> tuple[float, int]:
        for _ in range(3):  # warm-up: workers started, page cache warm
            next_batch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            n += next_batch()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, n

    def epochs():
        while True:
            yield from dm.train_dataloader()

    it = epochs()

    def datamodule_batch() -> int:
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.shape[0]

    wall, n = drain(datamodule_batch)
    result["datamodule_cpu_posterior"] = {"latents_per_s": n / wall, "latents": n,
                                          "pin_memory": bool(dm.pin_memory and device.type == "cuda")}
    print(f"[gpu_check] loader (datamodule, CPU posterior): {n / wall:,.0f} latents/s", flush=True)

    # posterior on the device: gather fp16 mean/std rows of the cache into pinned buffers, sample there
    ds = dm.train_set
    scale, shift = float(ds.scale_factor), float(getattr(ds, "shift_factor", 0.0))  # latent = (z - shift) * scale
    cache = Path(dm.cache_dir)
    mean = np.load(cache / "mean.npy", mmap_mode="r")  # [N, 2 flips, C, h, w] float16, raw posterior mean
    std = np.load(cache / "std.npy", mmap_mode="r")
    flat_mean, flat_std = mean.reshape(-1, int(np.prod(mean.shape[2:]))), std.reshape(-1, int(np.prod(std.shape[2:])))
    rows_all = np.asarray(ds.indices) if getattr(ds, "indices", None) is not None else np.arange(mean.shape[0])
    pin = device.type == "cuda"
    host = [torch.empty(batch, flat_mean.shape[1], dtype=torch.float16, pin_memory=pin) for _ in range(2)]
    rng = np.random.default_rng(0)
    gen = torch.Generator(device=device).manual_seed(0)

    def device_posterior_batch() -> int:
        rows = rows_all[rng.integers(0, len(rows_all), batch)] * 2 + rng.integers(0, 2, batch)  # item, random flip
        np.take(flat_mean, rows, axis=0, out=host[0].numpy())
        np.take(flat_std, rows, axis=0, out=host[1].numpy())
        mu, sd = (h.to(device, non_blocking=True) for h in host)
        eps = torch.randn(mu.shape, generator=gen, device=device, dtype=torch.float32)
        x = (mu.float() + sd.float() * eps).sub_(shift).mul_(scale).view(batch, *mean.shape[2:])  # [B, C, h, w]
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # host buffers are reused next batch
        return x.shape[0]

    wall, n = drain(device_posterior_batch)
    result["device_posterior_single_process"] = {"latents_per_s": n / wall, "latents": n}
    print(f"[gpu_check] loader (posterior on {device.type}, 1 process): {n / wall:,.0f} latents/s", flush=True)
    return result


def cuda_tests(out_json: Path, timeout_s: int) -> dict:
    """The CUDA-only tests of tests/ (selected by benchmarks/gpu_tests.py), their outcomes."""
    env = {**os.environ, "GPU_TESTS_JSON": str(out_json), "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.gpu_tests", "tests"]
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[1:]), "error": f"timed out after {timeout_s}s"}
    report = json.loads(out_json.read_text()) if out_json.is_file() else {}
    return {"command": "python " + " ".join(cmd[1:]), "exit_code": proc.returncode, **report,
            "no_tests_selected": proc.returncode == 5, "output_tail": proc.stdout[-2000:]}


def train_phase(args, work: Path, compile_: bool) -> dict:
    """DiT-B/2 bf16 through train.py at the two batch sizes, eager (+ the hand-written step) or compiled."""
    from benchmarks.real_step import main as real_step_main

    argv = ["--model", args.model, "--objectives", args.objective, "--precisions", "bf16-mixed",
            "--batch-sizes", *map(str, args.batch_sizes), "--compile", "on" if compile_ else "off",
            "--device", "cuda", "--warmup", str(args.warmup), "--steps", str(args.steps), "--images",
            str(args.images), "--no-hand-written-compiled", "--workdir", str(work),
            "--out", str(work / f"real_step_{'compiled' if compile_ else 'eager'}.json"),
            *sum((["--override", o] for o in args.override), [])]
    result = real_step_main(argv)
    for rec in result["records"]:
        if rec["kind"] == "real":
            rec["sdpa_backend"] = sdpa_backend(rec["raw"].get("sdpa_ops"))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "gpu_check.json")
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=PHASES)
    p.add_argument("--model", default="dit_b", help="conf/model option")
    p.add_argument("--objective", default="diffusion", help="objective of the training phase (diffusion + VLB)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 256])
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=2048, help="synthetic cache size (256px -> 4x32x32 latents)")
    p.add_argument("--sample-batch", type=int, default=128)
    p.add_argument("--loader-seconds", type=float, default=5.0)
    p.add_argument("--tests-timeout", type=int, default=240)
    p.add_argument("--override", action="append", default=[], help="extra train.py override (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of this script on a GPU")
    p.add_argument("--workdir", type=Path, default=None)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device (torch.cuda.is_available() is False); run this on an NVIDIA "
              "GPU machine", file=sys.stderr)
        return 2
    if args.quick:
        args.batch_sizes, args.warmup, args.steps, args.images = [8, 16], 3, 5, 128
        args.sample_batch, args.loader_seconds = 8, 1.0
    t0 = time.time()
    device = torch.device("cuda")
    result = {"benchmark": "gpu_check", "quick": args.quick, "config": {k: str(v) if isinstance(v, Path) else v
                                                                        for k, v in vars(args).items()},
              "budget_s": BUDGET_S, "phases": {}, "errors": {}, "seconds": {},
              "machine": machine_info("bash " + shlex.join(["benchmarks/gpu_check.sh", *argv]))}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.workdir or tmp).resolve()
        for phase in args.phases:
            start = time.time()
            print(f"[gpu_check] phase {phase} (at {start - t0:.0f}s)", flush=True)
            try:
                if phase in ("train", "train_compiled"):
                    result["phases"][phase] = train_phase(args, work, compile_=phase == "train_compiled")
                elif phase == "sampling":
                    steps = ((("diffusion", "ddpm", 10), ("flow", "heun", 5)) if args.quick
                             else (("diffusion", "ddpm", 250), ("flow", "heun", 50)))
                    result["phases"]["sampling"] = sampling_throughput(device, args.model, args.sample_batch,
                                                                       runs=steps)
                elif phase == "loader":
                    from benchmarks.real_step import synthetic_cache

                    data = synthetic_cache(work, args.images, 256)
                    result["phases"]["loader"] = loader_throughput(device, data, max(args.batch_sizes), 8,
                                                                   args.loader_seconds)
                else:
                    result["phases"]["tests"] = cuda_tests(work / "cuda_tests.json", args.tests_timeout)
            except Exception as err:  # record and go on: the other phases are still worth having
                result["errors"][phase] = f"{type(err).__name__}: {err}"[-3000:]
                print(f"[gpu_check] phase {phase} FAILED: {result['errors'][phase][:500]}", flush=True)
            result["seconds"][phase] = time.time() - start
            result["seconds"]["total"] = time.time() - t0
            write_json(args.out, result)
    total = result["seconds"]["total"]
    tests = result["phases"].get("tests", {})
    failed = bool(result["errors"]) or tests.get("counts", {}).get("failed", 0) > 0
    print(f"[gpu_check] wrote {args.out} in {total:.0f}s (budget {BUDGET_S}s)"
          + (f"; FAILED phases: {sorted(result['errors'])}" if result["errors"] else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
