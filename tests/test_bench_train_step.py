"""Smoke test of benchmarks/train_step.py on a tiny DiT: the JSON has its fields and sane values."""

import importlib.util
import json
import math
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from backbones.dit import DiT

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flop_count_matches_torch_flop_counter():
    bench = _load_script()
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    B, N, D = 3, 16, 64
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(B, 4, 8, 8), torch.rand(B) * 999, torch.randint(0, 10, (B,)))
    counted = counter.get_total_flops()
    # the CPU SDPA kernel is not in torch's counter: add q @ k^T and attn @ v (2 FLOPs per multiply-add)
    attention = 2 * (2 * N * N * D) * B * len(model.blocks)
    if not any("scaled_dot_product" in str(op) for op in counter.get_flop_counts()["Global"]):
        counted += attention
    assert bench.dit_forward_flops(model, B) == counted


def test_train_step_json_fields(tmp_path):
    bench = _load_script()
    out = tmp_path / "bench.json"
    result = bench.main([
        "--model", "S/2", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--input-size", "8",
        "--in-channels", "4", "--num-classes", "10", "--batch-size", "2", "--precision", "fp32", "bf16-mixed",
        "--warmup", "1", "--steps", "2", "--windows", "2", "--matmul-size", "128", "--matmul-repeats", "2",
        "--device", "cpu", "--out", str(out),
    ])
    on_disk = json.loads(out.read_text())
    # each precision in its own process, so each peak memory is its own (#15 item 3)
    assert on_disk["separate_processes"] and len({r["pid"] for r in on_disk["runs"]}) == 2
    machine = on_disk["machine"]  # provenance in the file itself
    assert machine["cpu_flags"]["avx512_bf16"] == ("avx512_bf16" in Path("/proc/cpuinfo").read_text())
    assert (len(machine["git_commit"]) == 40 and machine["git_dirty"] in (True, False)
            or machine["git_commit"] == "unknown" and machine["git_dirty"] is None)
    assert machine["load_avg_1_5_15"]
    assert "train_step" in machine["command"] and machine["torch"] == torch.__version__
    assert on_disk["runs"] == json.loads(json.dumps(result["runs"]))
    assert on_disk["model"] == "DiT-S/2" and on_disk["device"] == "cpu" and on_disk["threads"] >= 1
    assert [r["precision"] for r in on_disk["runs"]] == ["fp32", "bf16-mixed"]
    for run in on_disk["runs"]:
        assert len(run["step_time_s_all"]) == 4  # 2 windows x 2 steps
        assert 0 < run["step_time_s_median"] < 10
        assert math.isclose(run["images_per_s"], 2 / run["step_time_s_median"])
        assert run["train_flops_per_step"] == 3 * run["forward_flops"] > 0
        assert math.isclose(run["achieved_flops_per_s"], run["train_flops_per_step"] / run["step_time_s_median"])
        assert run["peak_source"].startswith("measured 128^3 matmul")
        assert len(run["matmul_flops_per_s_samples"]) == 4 and run["peak_flops_per_s"] > 0
        assert 0 < run["mfu"] < 2 and math.isclose(run["mfu"], run["achieved_flops_per_s"] / run["peak_flops_per_s"])
        assert 0 < run["mfu_best"] < 4 and 0 < run["mfu_cpu_time"] < 4 and run["step_cpu_time_s_median"] > 0
        assert run["peak_memory_bytes"] > 10 * 2**20 and run["peak_memory_kind"] == "process_peak_rss"
        assert math.isfinite(run["loss_mean"]) and 0 < run["loss_mean"] < 10
        assert set(run["phase_time_s_median"]) == {"forward", "backward", "optimizer", "ema"}
        assert run["params"] > 0 and run["host_syncs_in_timed_loop"] is None
    assert on_disk["bf16_speedup_vs_fp32"] > 0 and on_disk["bf16_speedup_vs_fp32_cpu_time"] > 0
    assert set(on_disk["cpu_flags"]) >= {"avx512_bf16", "amx_bf16"}
