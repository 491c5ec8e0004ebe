"""benchmarks/sampling.py: FID-vs-NFE JSON fields and sane values on tiny checkpoints, and the NFE counter."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, run_train

from benchmarks.common import CountingNet, mean_std
from benchmarks.sampling import main as sampling_main
from benchmarks.sampling import nfe_to_reach


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A 3-step diffusion and flow checkpoint from one train.py multirun (the real training path)."""
    root = tmp_path_factory.mktemp("sampling_runs")
    run_train(["-m", *TINY, "objective=diffusion,flow", "trainer.max_steps=3", f"hydra.sweep.dir={root}",
               "hydra.sweep.subdir=${hydra:runtime.choices.objective}"])
    return {name: root / name / "checkpoints" / "last.ckpt" for name in ("diffusion", "flow")}


def test_sampling_json_fields_and_values(tiny_checkpoints, tmp_path):
    out, png = tmp_path / "sampling.json", tmp_path / "sampling.png"
    steps, tols = [1, 3], [1e-1, 1e-2]
    sampling_main(["--ckpt", str(tiny_checkpoints["diffusion"]), str(tiny_checkpoints["flow"]),
                   "--steps", ",".join(map(str, steps)), "--tols", ",".join(map(str, tols)),
                   "--num-samples", "24", "--batch-size", "12", "--out", str(out), "--plot", str(png),
                   "--threads", "1"])
    data = json.loads(out.read_text())
    assert png.is_file() and png.stat().st_size > 1000
    assert data["benchmark"] == "sampling" and data["metric"] == "digits-FID"
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["torch"] == torch.__version__
    runs = {r["objective"]: r for r in data["runs"]}
    assert set(runs) == {"diffusion", "flow"}
    from gen_objectives.objectives import DiffusionObjective, FlowObjective  # every sampler each one admits

    assert {r["sampler"] for r in runs["diffusion"]["records"]} == set(DiffusionObjective.samplers)
    assert {r["sampler"] for r in runs["flow"]["records"]} == set(FlowObjective.samplers)
    for run in runs.values():
        # every (sampler, setting) was either measured or is listed with the error that rejected it
        tried = {(r["sampler"], r.get("num_steps"), r.get("tol")) for r in run["records"] + run["failures"]}
        samplers = {r["sampler"] for r in run["records"] + run["failures"]}
        assert len(tried) == sum(len(tols) if s == "dopri5" else len(steps) for s in samplers)
        assert all(f["error"] for f in run["failures"])
        for rec in run["records"]:
            assert math.isfinite(rec["fid"]) and rec["fid"] >= 0.0
            assert 0.0 <= rec["class_accuracy"] <= 1.0
            assert rec["wall_s_per_sample"] > 0.0 and rec["num_samples"] == 24
            if rec["sampler"] == "dopri5":
                assert rec["tol"] in tols and rec["num_steps"] is None and rec["nfe"] >= 6  # >= one dopri5 step
            else:
                # the counter sees exactly one network call per step (Heun: two)
                assert rec["nfe"] == rec["num_steps"] * (2 if rec["sampler"] == "heun" else 1)
        finding = run["nfe_within_5pct"]
        assert set(finding) == {r["sampler"] for r in run["records"]}
        for sampler, f in finding.items():
            fids = [r["fid"] for r in run["records"] if r["sampler"] == sampler]
            assert f["best_fid"] == min(fids) and f["nfe_within"] <= max(
                r["nfe"] for r in run["records"] if r["sampler"] == sampler)


def test_counter_counts_a_cfg_doubled_call_once():
    from gen_objectives.objectives.flow import FlowObjective

    calls = []
    net = CountingNet(lambda x, t, y: (calls.append(x.shape[0]), torch.zeros_like(x))[1])
    obj = FlowObjective(num_classes=3)
    noise, y = torch.randn(5, 1, 2, 2), torch.randint(0, 3, (5,))
    obj.sample(net, noise, y, sampler="euler", num_steps=4, cfg_scale=2.0)
    assert net.calls == 4 and calls == [10] * 4  # doubled batch, one evaluation each step


def test_nfe_to_reach_picks_the_cheapest_setting_within_5_percent():
    recs = [{"sampler": "a", "nfe": n, "fid": f, "num_steps": n, "tol": None}
            for n, f in [(1, 50.0), (2, 12.0), (4, 10.4), (8, 10.0), (16, 10.2)]]
    out = nfe_to_reach(recs)["a"]
    assert out["best_fid"] == 10.0 and out["best_nfe"] == 8
    assert out["nfe_within"] == 4  # 10.4 <= 1.05 * 10.0, 12.0 is not
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))


def test_run_all_collects_json_and_renders_results_md(tmp_path):
    """`make bench`'s driver: runs a benchmark CLI as a subprocess, records command and time, renders RESULTS.md."""
    from benchmarks.run_all import main as run_all_main
    from benchmarks.run_all import write_results_md

    out = tmp_path / "results"
    summary = run_all_main(["--quick", "--only", "train_step", "--out-dir", str(out), "--workdir",
                            str(tmp_path / "work"), "--no-report"])
    assert summary["seconds"]["train_step"] > 0 and "train_step.py" in summary["commands"]["train_step"]
    saved = json.loads((out / "bench_summary.json").read_text())
    assert saved["machine"]["cpu_model"] and saved["outputs"]["train_step"] == str(out / "bench_train_step.json")
    bench = json.loads((out / "bench_train_step.json").read_text())
    assert {r["precision"] for r in bench["runs"]} == {"fp32", "bf16-mixed"}
    md = write_results_md(out, tmp_path / "RESULTS.md").read_text()
    assert "## Training step throughput" in md and "| fp32 |" in md and "machine: " in md
    assert "Command: `python benchmarks/train_step.py" in md


def test_results_md_has_a_section_for_the_oracle_table(tmp_path):
    """docs/RESULTS.md renders results/oracle_table.json: one table row per JSON row, with its command and commit."""
    from benchmarks.run_all import write_results_md

    out = tmp_path / "results"
    out.mkdir()
    rows = [{"objective": "flow/linear", "sampler": "dopri5", "steps": None, "nfe": 32, "mean_err": 0.0,
             "std_err": 1.8e-5, "ll_err_nats_per_dim": 1.8e-5},
            {"objective": "diffusion", "sampler": "ddpm", "steps": 250, "nfe": 250, "mean_err": 0.0052,
             "std_err": 0.0091, "map_err": None, "ll_err_nats_per_dim": None}]
    payload = {"machine": {"command": "python benchmarks/oracle_table.py --n 123", "git_commit": "abcdef1234567",
                           "cpu_model": "cpu"}, "problem": {"dims": [2, 1, 1], "s": 0.5, "classes": 2, "n": 123,
                                                            "n_ll": 7}, "rows": rows}
    (out / "oracle_table.json").write_text(json.dumps(payload))
    md = write_results_md(out, tmp_path / "RESULTS.md").read_text()
    assert "## Samplers on an analytic oracle" in md and "`python benchmarks/oracle_table.py --n 123`" in md
    assert "| flow/linear | dopri5 | adaptive | 32 | 0.0000 | 0.0000 | – | 1.80e-05 |" in md
    assert "| diffusion | ddpm | 250 | 250 | 0.0052 | 0.0091 | – | – |" in md
    assert "commit abcdef1234" in md


def test_results_md_takes_each_command_from_its_own_result_file(tmp_path):
    """A section's command is the one its JSON recorded, not an older `make bench` summary's (stale checkpoints)."""
    from benchmarks.common import REPO_ROOT
    from benchmarks.run_all import write_results_md

    out = tmp_path / "results"
    out.mkdir()
    d = json.loads((REPO_ROOT / "results" / "sampling.json").read_text())
    d["machine"]["command"] = "python benchmarks/sampling.py --from-table1 THIS-RUN.json"
    (out / "sampling.json").write_text(json.dumps(d))
    (out / "bench_summary.json").write_text(json.dumps(
        {"commands": {"sampling": "python benchmarks/sampling.py --ckpt OLD-RUN.ckpt"}}))
    md = write_results_md(out, tmp_path / "RESULTS.md").read_text()
    assert "Command: `python benchmarks/sampling.py --from-table1 THIS-RUN.json`" in md and "OLD-RUN" not in md
