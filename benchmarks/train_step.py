"""The hand-written training step of a DiT preset (the lower bound of the real one): throughput, FLOP rate; JSON.

One step = forward + eps-MSE loss on noised random latents + backward + AdamW + EMA update (fp32 shadow):
no LightningModule, no data loader, no VLB term (benchmarks/real_step.py times what train.py runs).
FLOPs per step = architecture FLOPs (2 per multiply-add, training = 3x forward). On a GPU whose datasheet is
known (benchmarks/common.py) MFU = FLOP rate / dense datasheet peak; on an unknown GPU it is not computed; on
CPU the reference is a large matmul of the same dtype measured in the same process ("matmul fraction", not MFU).
Each precision runs in its own process, so each peak memory is its own. The timed loop never waits on the
host: no .item(); on CUDA the steps are timed with events and the host syncs once per window (a sync counter
from torch.cuda.set_sync_debug_mode proves it).

    python benchmarks/train_step.py --model S/2 --batch-size 4 --precision fp32 bf16-mixed --out bench.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting lose badly when other processes share the cores (2.4x slower steps
# measured on a shared 2-core VM); passive waiting costs little on an idle machine. Must precede torch's import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from backbones.dit import DiT, dit_preset  # noqa: E402
from benchmarks.common import command_line, datasheet_peak, machine_info, write_json  # noqa: E402
from workflow.hardware import relevant_cpu_flags  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16-mixed")
MATH_MODE = {"fp32": "fp32", "tf32": "tf32", "bf16-mixed": "bf16"}  # precision -> datasheet column


class _LocalEMA:
    """Fallback fp32 EMA (same update rule as gen_objectives.ema.EMA) for checkouts without that module."""

    def __init__(self, net: torch.nn.Module, decay: float = 0.9999):
        self.decay = decay
        self.src = [p for p in net.parameters()]
        self.dst = [p.detach().float().clone() for p in self.src]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        torch._foreach_lerp_(self.dst, [p.float() for p in self.src], 1.0 - self.decay)


def make_ema(net: torch.nn.Module):
    """The project's EMA when it is there, otherwise the local one (both: torch._foreach_lerp_ on fp32)."""
    try:
        from gen_objectives.ema import EMA
    except ImportError:
        return _LocalEMA(net), "benchmarks.train_step._LocalEMA"
    return EMA(net, decay=0.9999), "gen_objectives.ema.EMA"


def dit_forward_flops(model: DiT, batch_size: int) -> int:
    """Forward FLOPs (2 per multiply-add) of the matmuls/convs: patch embed, t-MLP, adaLN, qkv, attention,
    proj, MLP, final layer. Elementwise work (norms, softmax, GELU, modulation) is not counted."""
    D, N = model.hidden_size, model.grid_size**2
    p, c_in, c_out = model.patch_size, model.in_channels, model.out_channels
    freq = model.t_embedder.frequency_embedding_size
    hidden_mlp = model.blocks[0].mlp.fc1.out_features if len(model.blocks) else 0
    per_image = N * (c_in * p * p) * D  # patch embedding conv
    per_image += freq * D + D * D  # timestep MLP
    per_block = (
        D * 6 * D  # adaLN modulation (once per image)
        + N * D * 3 * D  # qkv
        + 2 * N * N * D  # q @ k^T and attn @ v over all heads
        + N * D * D  # output projection
        + 2 * N * D * hidden_mlp  # fc1 and fc2
    )
    per_image += len(model.blocks) * per_block
    per_image += D * 2 * D + N * D * (p * p * c_out)  # final adaLN and linear
    return 2 * per_image * batch_size


def matmul_flops_per_s(dtype: torch.dtype, device: torch.device, size: int,
                       repeats: int) -> tuple[list[float], list[float]]:
    """FLOP/s of size^3 matmuls in `dtype` (one sample per repeat), the CPU's practical peak; also FLOP per
    process CPU-second, which other processes on the same cores do not dilute.

    Laid out as nn.Linear computes (x @ W^T): without native bf16, CPU bf16 GEMMs are 6x faster in this
    layout than with a row-major right operand, and this is the path the model's layers take.
    """
    a = torch.randn(size, size, device=device).to(dtype)
    w = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, w.t(), out=out)  # warm-up
    rates, cpu_rates = [], []
    for _ in range(repeats):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        torch.mm(a, w.t(), out=out)
        _sync(device)
        rates.append(2 * size**3 / (time.perf_counter() - start))
        cpu_rates.append(2 * size**3 / max(time.process_time() - cpu_start, 1e-9))
    return rates, cpu_rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """CUDA max_memory_allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"


def cpu_bf16_native() -> bool | None:
    """Whether oneDNN has native bf16 kernels here (AVX-512 BF16 / AMX); without them bf16 GEMMs crawl."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def run_one(args, precision: str, device: torch.device) -> dict:
    """Build, warm up and time one configuration; return its JSON record."""
    if precision == "tf32" and device.type != "cuda":
        raise ValueError("precision=tf32 is a CUDA mode; use fp32 or bf16-mixed on CPU")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.manual_seed(args.seed)
    kwargs = dit_preset(args.model, input_size=args.input_size, in_channels=args.in_channels,
                        num_classes=args.num_classes, learn_sigma=True)
    for key in ("depth", "hidden_size", "num_heads"):  # shrink a preset for smoke tests
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    model = DiT(**kwargs).to(device).train()
    ema, ema_impl = make_ema(model)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW: one pass over params/grads/moments instead of a dozen foreach passes (CPU and CUDA)
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **{args.adamw: True})
    if args.compile and device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # no worker pool left competing with the measured cores
    net = torch.compile(model) if args.compile else model

    B, C, S = args.batch_size, args.in_channels, args.input_size
    x0 = torch.randn(B, C, S, S, device=device)
    y = torch.randint(0, args.num_classes, (B,), device=device)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0).float().to(device)  # DDPM linear schedule, as DiT
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16-mixed"
                else contextlib.nullcontext())

    def step(i: int, marks: list | None) -> torch.Tensor:
        t = torch.randint(0, 1000, (B,), device=device)
        noise = torch.randn_like(x0)
        ab = alpha_bar[t].view(B, 1, 1, 1)
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        with autocast:
            out = net(x_t, t.float(), y)
            loss = F.mse_loss(out[:, :C].float(), noise)
        mark(marks)
        loss.backward()
        mark(marks)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mark(marks)
        ema.update(model, i)
        mark(marks)
        return loss.detach()

    def mark(marks: list | None) -> None:
        if marks is None:
            return
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
        else:
            marks.append(time.perf_counter())

    for i in range(args.warmup):
        step(i, None)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # timed windows: per step 5 marks (start, after forward, backward, optimizer, EMA); host syncs per window
    step_times, phases, losses, syncs = [], {"forward": [], "backward": [], "optimizer": [], "ema": []}, [], 0
    step_cpu_times = []  # process CPU seconds per step (all threads), CPU only
    for _ in range(args.windows):
        marks_per_step = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            for i in range(args.steps):
                marks, cpu_start = [], time.process_time()
                mark(marks)
                losses.append(step(args.warmup + i, marks))
                marks_per_step.append(marks)
                if device.type == "cpu":
                    step_cpu_times.append(time.process_time() - cpu_start)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        syncs += sum("synchroniz" in str(w.message) for w in caught)
        _sync(device)
        for marks in marks_per_step:
            if device.type == "cuda":
                d = [marks[k].elapsed_time(marks[k + 1]) / 1e3 for k in range(4)]
            else:
                d = [marks[k + 1] - marks[k] for k in range(4)]
            step_times.append(sum(d))
            for name, value in zip(phases, d):
                phases[name].append(value)
    final_loss = torch.stack(losses).float()
    if not torch.isfinite(final_loss).all():
        raise RuntimeError("non-finite loss during the benchmark")

    step_s = statistics.median(step_times)
    flops_fwd = dit_forward_flops(model, B)
    flops_step = 3 * flops_fwd
    mem, mem_kind = peak_memory_bytes(device)
    return {
        "precision": precision,
        "compile": bool(args.compile),
        "adamw": args.adamw,
        "ema": ema_impl,
        "params": sum(p.numel() for p in model.parameters()),
        "step_time_s_median": step_s,
        "step_time_s_all": step_times,
        "step_cpu_time_s_median": statistics.median(step_cpu_times) if step_cpu_times else None,
        "phase_time_s_median": {k: statistics.median(v) for k, v in phases.items()},
        "images_per_s": B / step_s,
        "forward_flops": flops_fwd,
        "train_flops_per_step": flops_step,
        "achieved_flops_per_s": flops_step / step_s,
        "peak_memory_bytes": mem,
        "peak_memory_kind": mem_kind,
        "host_syncs_in_timed_loop": syncs if device.type == "cuda" else None,
        "loss_mean": float(final_loss.mean()),
    }


def peak_for(precision: str, device: torch.device, args) -> tuple[float | None, str, list[float] | None,
                                                                 list | None]:
    """Datasheet peak of the exact GPU (None when unknown), else the measured large-matmul rate in the dtype."""
    if device.type == "cuda":
        peak, source = datasheet_peak(torch.cuda.get_device_name(device), MATH_MODE[precision])
        return peak, source, None, None
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    rates, cpu_rates = matmul_flops_per_s(dtype, device, args.matmul_size, args.matmul_repeats)
    return statistics.median(rates), f"measured {args.matmul_size}^3 matmul {dtype} (median)", rates, cpu_rates


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="S/2", help="DiT preset S|B|L|XL / patch, e.g. B/2")
    parser.add_argument("--depth", type=int, default=None, help="override the preset depth (smoke tests)")
    parser.add_argument("--hidden-size", type=int, default=None, help="override the preset width (smoke tests)")
    parser.add_argument("--num-heads", type=int, default=None, help="override the preset heads (smoke tests)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=4)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=PRECISIONS)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--adamw", choices=("fused", "foreach"), default="fused", help="AdamW implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=2, help="timed windows (host sync after each)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="run every precision in this process (default: one child process per precision "
                             "when there are several, so each peak memory is its own)")
    parser.add_argument("--out", type=Path, default=Path("results/bench_train_step.json"))
    return parser.parse_args(argv)


def measure(args, precision: str, device: torch.device) -> dict:
    """One precision in this process: the matmul reference around the timed run, and the derived ratios."""
    peak_before, source, rates_before, cpu_before = peak_for(precision, device, args)
    record = run_one(args, precision, device)
    peak_after, _, rates_after, cpu_after = peak_for(precision, device, args)
    # on CPU the matmul rate is measured around the run (shared machines drift); use all samples
    rates = (rates_before or []) + (rates_after or [])
    peak = statistics.median(rates) if rates else peak_before
    record.update(peak_flops_per_s=peak, peak_source=source, matmul_flops_per_s_samples=rates or None,
                  peak_kind="matmul fraction (same-run matmul)" if rates else "MFU (datasheet)",
                  mfu=record["achieved_flops_per_s"] / peak if peak else None)
    # on a shared machine, best step vs best matmul sample estimates the uncontended ratio
    best_peak = max(rates) if rates else peak
    record["mfu_best"] = (record["train_flops_per_step"] / min(record["step_time_s_all"]) / best_peak
                          if best_peak else None)
    # the same ratio in process CPU time: immune to time slices lost to other processes
    cpu_rates = (cpu_before or []) + (cpu_after or [])
    record["mfu_cpu_time"] = (record["train_flops_per_step"] / record["step_cpu_time_s_median"]
                              / statistics.median(cpu_rates)) if cpu_rates else None
    record["pid"] = os.getpid()
    record["load_avg_1min_after"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    ratio = f"{record['mfu']:.1%} of {source} ({peak / 1e9:.1f} GFLOP/s)" if peak else source
    print(f"[train_step] DiT-{args.model} b={args.batch_size} {precision} compile={args.compile}: "
          f"{record['step_time_s_median'] * 1e3:.1f} ms/step, {record['images_per_s']:.2f} img/s, "
          f"{record['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, {ratio}"
          + (f"; in CPU time {record['mfu_cpu_time']:.1%}" if record["mfu_cpu_time"] else ""), flush=True)
    return record


def measure_in_child(argv: list[str], precision: str) -> dict:
    """One precision in a fresh process (its own peak memory); returns its run record."""
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        out = Path(tmp) / "run.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--precision", precision, "--out", str(out),
               "--in-process"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if ln.startswith("[train_step] DiT")))
        if proc.returncode != 0:
            raise RuntimeError(f"train_step child for {precision} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())["runs"][0]


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    if "bf16-mixed" in args.precision and device.type == "cpu" and not cpu_bf16_native():
        print("[train_step] warning: this CPU has no native bf16 (no AVX-512 BF16 / AMX); bf16 GEMMs run about "
              "10x slower than fp32 here, so bf16-mixed steps will be much slower than fp32", flush=True)
    if len(args.precision) > 1 and not args.in_process:
        runs = [measure_in_child(argv, precision) for precision in args.precision]
    else:
        runs = [measure(args, precision, device) for precision in args.precision]

    by_precision = {r["precision"]: r for r in runs}
    result = {
        "benchmark": "train_step",
        "model": f"DiT-{args.model}",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(),
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_flags": relevant_cpu_flags(),
        "cpu_bf16_native": cpu_bf16_native(),
        "torch": torch.__version__,
        "separate_processes": len({r["pid"] for r in runs}) == len(runs),
        "runs": runs,
        "bf16_speedup_vs_fp32": (by_precision["fp32"]["step_time_s_median"]
                                 / by_precision["bf16-mixed"]["step_time_s_median"])
        if {"fp32", "bf16-mixed"} <= by_precision.keys() else None,
        "bf16_speedup_vs_fp32_cpu_time": (by_precision["fp32"]["step_cpu_time_s_median"]
                                          / by_precision["bf16-mixed"]["step_cpu_time_s_median"])
        if {"fp32", "bf16-mixed"} <= by_precision.keys() and device.type == "cpu" else None,
        "machine": machine_info(command_line(__file__, argv)),
    }
    write_json(args.out, result)
    print(f"[train_step] wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
