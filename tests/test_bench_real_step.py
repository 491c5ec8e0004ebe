"""The real-step benchmark (train.py timed from inside) at tiny size, provenance in RESULTS.md, and the GPU check's
parts that run without a GPU: its clear failure on CPU, the CUDA-only test selection, sampling/loader phases."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check, real_step
from benchmarks.common import datasheet_device, datasheet_peak
from benchmarks.run_all import write_results_md
from benchmarks.train_step import dit_forward_flops

ROOT = Path(__file__).resolve().parents[1]
TINY_NET = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("real_step")


@pytest.fixture(scope="module")
def tiny_run(bench_dir):
    """real_step.py at tiny size: DiT depth 1 on 4x8x8 latents, diffusion (with its VLB term), fp32."""
    argv = ["--objectives", "diffusion", "--precisions", "32-true", "--resolution", "64", "--warmup", "1",
            "--steps", "2", "--matmul-size", "128", "--matmul-repeats", "1", "--workdir", str(bench_dir),
            "--out", str(bench_dir / "bench_real_step.json"), *sum((["--override", o] for o in TINY_NET), [])]
    return real_step.main(argv)


def test_real_step_times_train_py_and_the_hand_written_step(tiny_run, bench_dir):
    on_disk = json.loads((bench_dir / "bench_real_step.json").read_text())
    assert on_disk["comparisons"] == json.loads(json.dumps(tiny_run["comparisons"]))
    real = [r for r in on_disk["records"] if r["kind"] == "real"]
    hand = [r for r in on_disk["records"] if r["kind"] == "hand_written"]
    assert [r["objective"] for r in real] == ["diffusion"] and len(hand) == 1
    assert real[0]["raw"]["objective"] == "DiffusionObjective" and real[0]["raw"]["optimizer"] == "AdamW"
    assert len({r["raw"]["pid"] for r in on_disk["records"]}) == 2  # one process per row: its own peak memory
    from backbones.dit import DiT

    for r in real:
        raw = r["raw"]
        assert raw["trainer_precision"] == "32-true" and raw["net"] == "DiT" and raw["batch_size"] == 4
        assert raw["global_step_end"] == 1 + 2 + 1  # warmup + timed + the profiled step
        assert len(raw["step_wall_s"]) == len(raw["step_cpu_s"]) == 2 and min(raw["step_cpu_s"]) > 0
        assert r["step_time_s"] == pytest.approx(statistics.median(raw["step_wall_s"]))
        assert r["images_per_s"] == pytest.approx(4 / r["step_time_s"])
        assert "train.py" in r["command"] and "callbacks.sample_grid=null" in r["command"]
        assert any("scaled_dot_product" in op for op in raw["sdpa_ops"])
        assert 0 < r["matmul_fraction"] < 5 and raw["peak_memory_bytes"] > 2**20
        net = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=1000,
                  learn_sigma=True)  # diffusion learns the variance: 2C output channels
        assert r["train_flops_per_step"] == 3 * dit_forward_flops(net, 4)
    for c in on_disk["comparisons"]:
        assert c["ratio_wall"] == pytest.approx(c["real_step_time_s"] / hand[0]["step_time_s"])
        assert c["ratio_cpu_time"] == pytest.approx(c["real_step_cpu_s"] / hand[0]["step_cpu_s"])
    machine = on_disk["machine"]
    assert (len(machine["git_commit"]) == 40 and machine["git_dirty"] in (True, False)
            or machine["git_commit"] == "unknown" and machine["git_dirty"] is None)
    assert len(machine["load_avg_1_5_15"]) == 3
    assert set(machine["cpu_flags"]) >= {"avx512f", "avx512_bf16", "amx_bf16"} and "real_step" in machine["command"]
    assert (bench_dir / "latents_32x64" / "metadata.json").is_file()  # the project's encoder wrote the cache


def test_ratios_pair_each_run_with_the_precision_train_py_chose():
    def rec(kind, objective, precision, step, cpu, picked=None):
        return {"kind": kind, "objective": objective, "precision": precision, "batch_size": 4, "compile": False,
                "step_time_s": step, "step_cpu_s": cpu, "raw": {"trainer_precision": picked or precision}}

    rows = real_step.compare([rec("hand_written", None, "32-true", 1.0, 2.0), rec("real", "flow", "32-true", 1.1, 2.4),
                              rec("hand_written", None, "bf16-mixed", 0.5, 1.0),
                              rec("real", "flow", "auto", 0.55, 1.2, picked="bf16-mixed")])
    fp32, auto = rows
    assert fp32["ratio_wall"] == pytest.approx(1.1) and fp32["ratio_cpu_time"] == pytest.approx(1.2)
    assert auto["trainer_precision"] == "bf16-mixed" and auto["ratio_wall"] == pytest.approx(1.1)
    assert auto["bf16_speedup_vs_fp32"] == pytest.approx(2.0) and auto["bf16_speedup_vs_fp32_cpu_time"] == 2.0
    assert "bf16_speedup_vs_fp32" not in fp32


def test_auto_precision_replaces_the_explicit_run_of_its_choice():
    from workflow.hardware import cpu_has_native_bf16

    picked = "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    other = {"bf16-mixed": "32-true", "32-true": "bf16-mixed"}[picked]
    assert real_step.plan_precisions(["auto", "32-true", "bf16-mixed"], "cpu") == (["auto", other], picked)
    assert real_step.plan_precisions(["32-true"], "cpu") == (["32-true"], None)


def test_datasheet_peak_of_the_exact_device_or_unknown():
    sxm, pcie, nvl = (datasheet_peak(n, "bf16")[0] for n in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe",
                                                              "NVIDIA H100 NVL"))
    assert sxm == 989.4e12 and pcie == 756.5e12 and nvl == 835.5e12
    assert datasheet_device("NVIDIA H200") == "H200 SXM" and datasheet_device("NVIDIA H200 NVL") == "H200 NVL"
    assert datasheet_device("NVIDIA A100-SXM4-80GB") == datasheet_device("NVIDIA A100 80GB PCIe") == "A100"
    for name in ("NVIDIA H100", "NVIDIA L40S", "NVIDIA H800", "NVIDIA A100X"):
        peak, source = datasheet_peak(name, "bf16")
        assert peak is None and source.startswith("unknown")


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="checks the failure path where nvidia-smi and torch see no device")
def test_gpu_check_fails_with_one_line_without_a_gpu():
    for cmd in (["bash", "benchmarks/gpu_check.sh"], [sys.executable, "benchmarks/gpu_check.py"]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and "gpu_check:" in proc.stderr


def test_gpu_test_selection_keeps_only_device_tests(tmp_path):
    (tmp_path / "test_mix.py").write_text(  # as pytest sees them on a GPU machine
        "import pytest\n"
        "def test_plain():\n    pass\n"
        "@pytest.mark.skipif(False, reason='needs CUDA')\ndef test_runs_only_with_it():\n    assert 0\n"
        "def test_sync_free_on_cuda():\n    pass\n"
        "@pytest.mark.skipif(True, reason='checks the message on a machine without GPUs')\n"
        "def test_for_cpu_machines():\n    pass\n"
        "@pytest.mark.skipif(True, reason='slow on CPU')\ndef test_other_skip():\n    pass\n")
    report = tmp_path / "report.json"
    env = {**os.environ, "GPU_TESTS_JSON": str(report), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "benchmarks.gpu_tests", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout  # the selected CUDA test fails: the check must say so
    report = json.loads(report.read_text())
    assert {k.split("::")[1]: v for k, v in report["tests"].items()} == {"test_runs_only_with_it": "failed",
                                                                          "test_sync_free_on_cuda": "passed"}
    assert report["counts"] == {"passed": 1, "failed": 1, "skipped": 0}


def test_sampling_and_loader_phases_run_on_cpu(tiny_run, bench_dir):
    out = gpu_check.sampling_throughput(torch.device("cpu"), "dit_s", 2, cfg_scales=(1.0, 1.5),
                                        runs=(("diffusion", "ddpm", 3), ("flow", "heun", 2)), overrides=tuple(TINY_NET))
    assert [(s["sampler"], s["cfg_scale"], s["nfe"]) for s in out] == [
        ("ddpm", 1.0, 3), ("ddpm", 1.5, 3), ("heun", 1.0, out[2]["nfe"]), ("heun", 1.5, out[2]["nfe"])]
    assert out[2]["nfe"] in (3, 4) and all(s["images_per_s"] > 0 for s in out)
    data = real_step.synthetic_cache(bench_dir, 32, 64)  # the cache tiny_run wrote, reused
    loader = gpu_check.loader_throughput(torch.device("cpu"), data, 8, 0, 0.2)
    assert loader["cache_latents"] == 32 and loader["datamodule_cpu_posterior"]["latents"] >= 8
    assert loader["device_posterior_single_process"]["latents_per_s"] > 0
    assert gpu_check.sdpa_backend(["aten::_scaled_dot_product_flash_attention"]) == "flash"
    assert gpu_check.sdpa_backend(["aten::_scaled_dot_product_efficient_attention"]) == "efficient"


def test_results_md_takes_each_sections_machine_from_its_own_file(tiny_run, bench_dir, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(bench_dir / "bench_real_step.json", results / "bench_real_step.json")
    summary_machine = {"cpu_model": "BORROWED-CPU", "git_commit": "f" * 40}
    (results / "bench_summary.json").write_text(json.dumps({"machine": summary_machine, "commands": {}}))
    (results / "latent_loader.json").write_text(json.dumps({"read": {}, "encode": {}}))  # no machine of its own
    gpu = {"quick": True, "budget_s": 480, "seconds": {"total": 12.0}, "errors": {"loader": "OSError: x"},
           "machine": {"cpu_model": "GPU-HOST", "gpu": {"name": "NVIDIA H100 PCIe", "datasheet_device": "H100 PCIe"}},
           "phases": {"train": {"records": [{**{k: v for k, v in r.items() if not k.startswith("matmul")}, "mfu": 0.5,
                                                  "sdpa_backend": "flash"} for r in tiny_run["records"]],
                                "comparisons": tiny_run["comparisons"]},
                      "sampling": [{"objective": "flow", "sampler": "heun", "num_steps": 50, "nfe": 99,
                                    "cfg_scale": 1.0, "batch_size": 8, "images_per_s": 3.0}],
                      "tests": {"counts": {"passed": 1, "failed": 0, "skipped": 0}, "command": "pytest"}}}
    (results / "gpu_check.json").write_text(json.dumps(gpu))
    md = write_results_md(results, tmp_path / "RESULTS.md").read_text()
    assert "BORROWED-CPU" not in md
    real = md.split("## Training step as users run it")[1].split("\n## ")[0]
    own = json.loads((results / "bench_real_step.json").read_text())["machine"]
    assert f"commit {own['git_commit'][:10]}" in real and "avx512_bf16+" in real
    assert "| 0 | diffusion (train.py) | 32-true → 32-true | 4 | off |" in real and "| hand-written |" in real
    assert "machine: not recorded in this result file" in md.split("## latent_loader.json")[1]
    check = md.split("## GPU check")[1]
    assert "GPU NVIDIA H100 PCIe (datasheet: H100 PCIe)" in check and "Phase loader FAILED" in check
    assert "| flow heun-50 | 99 | 1.0 | 8 | 3.0 |" in check and "MFU 50.0%" in check
