"""Table 1's analysis and report: per-sampler tables with seed and sampling spreads, paired comparisons with
95% t-intervals, the likelihood and solver-convergence tables, the training-budget curves."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import write_json
from benchmarks.compare.report import (
    IMAGE_METRICS,
    fmt_interval,
    fmt_mean_sd,
    group_by_objective,
    mean_sd,
    provenance,
    save_grid,
    shown,
    write_text,
)
from benchmarks.compare.stats import CONFIDENCE, paired_difference, ranking, verdict

OWN_DEFAULT = "own_default"


def analyse(payload: dict) -> dict:
    """Everything the report prints, computed from the evaluation records (and stored in the JSON)."""
    s, runs = payload["settings"], payload["training"]
    names = list(s["objectives"])
    samples = [e for e in payload["evaluations"] if e["kind"] == "sample"]
    keys = list(dict.fromkeys(e["key"] for e in samples))
    run_of = {r["run_id"]: r for r in runs}
    out = {"sampler_keys": keys, "tables": {}, "own_default": {}}
    for e in samples:
        if e["key"] == OWN_DEFAULT:
            out["own_default"][run_of[e["run_id"]]["name"]] = f"{e['sampler']}, {e['num_steps']} steps, {e['nfe']:.0f} NFE"
    for key in keys:
        recs = [e for e in samples if e["key"] == key]
        for metric, _, lower, _, _ in IMAGE_METRICS:
            per = group_by_objective(recs, runs, metric)
            boot = group_by_objective(recs, runs, f"{metric}_boot_sd") if f"{metric}_boot_sd" in recs[0] else {}
            out["tables"][f"{key}|{metric}"] = _comparison(per, names, lower, boot)
    likes = [e for e in payload["evaluations"] if e["kind"] == "likelihood"]
    for e in likes:
        e["nll_bpd"] = e["dopri5"]["bpd"]
    out["tables"]["likelihood|nll_bpd"] = _comparison(group_by_objective(likes, runs, "nll_bpd"), names, True, {})
    elbo = [e for e in likes if "elbo_bpd" in e]
    out["elbo"] = {m: group_by_objective(elbo, runs, m) for m in ("elbo_bpd", "elbo_discrete_bpd")} if elbo else {}
    out["convergence"] = {run_of[e["run_id"]]["name"] + f" (seed {run_of[e['run_id']]['seed']})":
                          {"dopri5": e["dopri5"], "fixed": e["fixed"], "solver": e["fixed_solver"]}
                          for e in likes if e["fixed"]}
    per_step = {n: sorted(r["cpu_seconds_per_step"] for r in runs if r["name"] == n) for n in names}
    out["train_cpu_seconds_per_step"] = {n: v[len(v) // 2] for n, v in per_step.items() if v}  # median
    out["eval_cpu_seconds"] = sum(e.get("cpu_seconds", 0.0) for e in samples) + sum(
        e["dopri5"]["cpu_seconds"] + sum(f["cpu_seconds"] for f in e["fixed"].values()) for e in likes) + sum(
        p.get("cpu_seconds", 0.0) for p in payload["curves"]["points"])
    return out


def _comparison(per: dict, names: list[str], lower: bool, boot: dict) -> dict:
    """Per objective: values by seed, mean, sd, mean bootstrap sd; fixed-order paired differences; ranking."""
    present = [n for n in names if n in per]
    pairs = []
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            iv = paired_difference(per[a], per[b], CONFIDENCE)
            pairs.append({"a": a, "b": b, "difference": iv.as_dict(), "verdict": verdict(iv, a, b, lower)})
    return {"lower_is_better": lower,
            "per_objective": {n: {"values": per[n], "mean": mean_sd(per[n].values())[0],
                                  "sd": mean_sd(per[n].values())[1],
                                  "sampling_sd": (mean_sd(boot[n].values())[0] if n in boot else None)}
                              for n in present},
            "pairs": pairs, "ranking": ranking({n: per[n] for n in present}, lower)["order"]}


def sampler_label(key: str) -> str:
    """'dpmpp_2m@20/time_grid=log_snr' -> 'dpmpp_2m @ 20 NFE, time_grid=log_snr'."""
    if key == OWN_DEFAULT:
        return "own default"
    head, *keys = key.split("/")
    name, _, nfe = head.partition("@")
    return ", ".join([f"{name} @ {nfe} NFE", *keys])


def plot_curves(payload: dict, path: Path) -> Path:
    """digits-FID and KID vs training steps (log x), mean ± sd over seeds, one line per objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, points = payload["training"], payload["curves"]["points"]
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    for ax, (metric, label, _, scale, _) in zip(axes, IMAGE_METRICS[:2]):
        for name, per_budget in group_by_objective(points, runs, metric, by_budget=True).items():
            budgets = sorted(per_budget)
            stats = [mean_sd([scale * v for v in per_budget[b].values()]) for b in budgets]
            ax.errorbar(budgets, [m for m, _ in stats], yerr=[sd for _, sd in stats], marker="o", ms=3, capsize=3,
                        label=name)
        ax.axvline(payload["headline_budget"]["budget"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("training steps")
        ax.set_ylabel(f"{label} ({payload['curves']['sampler']})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Quality vs training budget (mean ± sd over seeds; dotted: headline budget) — "
                 f"{payload['variant']}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(payload: dict) -> str:
    s, a, h = payload["settings"], payload["analysis"], payload["headline_budget"]
    names, seeds = list(s["objectives"]), list(s["seeds"])
    quick = payload["variant"] != "full"
    lines = [f"# Table 1 on the embedded default (digits){' — ' + payload['variant'].upper() + ' variant' if quick else ''}",
             ""]
    if quick:
        lines += [f"**{payload['variant'].upper()} variant**: {len(seeds)} seeds, budgets {list(s['budgets'])}, "
                  f"{s['num_samples']} samples per metric, {s['nll_images']} NLL images — the same code path as "
                  "`make table1` at smaller sizes; its intervals are wide and its budgets short.", ""]
    lines += [
        f"Diffusion, score and flow with the same DiT ({payload['model']}), data ({payload['data']}), training seeds "
        f"{seeds} and sampling noise. Same seed ⇒ same initial weights, data order and training noise, so every "
        f"comparison is **paired by seed**: the per-seed difference with its {100 * CONFIDENCE:.0f}% t-interval "
        f"(df = {len(seeds) - 1}). A ranking joins neighbours with `<`/`>` only where that interval excludes zero; "
        "`≈` and 'not distinguishable' mean it does not. EMA weights, cfg scale 1. digits-FID / KID: the "
        f"features of a small digits CNN (NOT Inception), {s['num_samples']} samples against the train split.", "",
        f"**Headline budget: {h['budget']} training steps.** Rule: {h['rule']} (metric: digits-FID with "
        f"{payload['curves']['sampler']}). " + ("The curves had flattened there." if h["flattened"] else
                                                "**The curves had NOT flattened by the largest budget run**: the "
                                                "table is at that budget and says how the objectives compare there, "
                                                "not where they converge."), "",
    ]
    for metric, label, lower, scale, digits in IMAGE_METRICS:
        lines += [f"**{label}** ({'lower' if lower else 'higher'} is better): mean ± sd over seeds "
                  "[sampling sd: bootstrap over samples, mean over runs]", "",
                  "| objective | " + " | ".join(sampler_label(k) for k in a["sampler_keys"]) + " |",
                  "|---|" + "---|" * len(a["sampler_keys"])]
        for n in names:
            cells = []
            for key in a["sampler_keys"]:
                t = a["tables"][f"{key}|{metric}"]["per_objective"].get(n)
                cell = "–" if t is None else fmt_mean_sd(list(t["values"].values()), scale, digits)
                if t and t["sampling_sd"] is not None:
                    cell += f" [{scale * t['sampling_sd']:.{digits}f}]"
                cells.append(cell)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    floor = payload["data_floor"]
    lines += [f"Reference: the {floor['num_samples']} held-out real digits score digits-FID {floor['fid']:.2f}, "
              f"KID ×10³ {1e3 * floor['kid']:.2f} and class accuracy {floor['class_accuracy']:.3f} against the "
              "same train-split features (FID is biased upwards at small sample counts; KID is not).", ""]
    if a["own_default"]:
        lines += ["Own defaults (each objective's configured sampler, as it ships): "
                  + "; ".join(f"{n}: {v}" for n, v in a["own_default"].items()) + ".", ""]
    lines += _comparison_table(payload) + _likelihood_lines(payload) + _curve_lines(payload)
    lines += _per_run_table(payload)
    lines += ["", "Figures: " + ", ".join(f"`{Path(p).name}`" for p in payload["figures"]), ""]
    cps = a["train_cpu_seconds_per_step"]
    lines += [f"Cost: training {', '.join(f'{n} {v:.3f}' for n, v in cps.items())} CPU-s per step (median over "
              f"runs, 1 thread), {sum(r['cpu_seconds'] for r in payload['training']) / 3600:.2f} CPU-hours in all; "
              f"evaluation {a['eval_cpu_seconds'] / 3600:.2f} CPU-hours.", ""]
    lines += provenance(payload) + [""]
    return "\n".join(lines)


def _comparison_table(payload: dict) -> list[str]:
    a, names = payload["analysis"], list(payload["settings"]["objectives"])
    pair_names = [(x, y) for i, x in enumerate(names) for y in names[i + 1:]]
    lines = [f"Paired differences (row objective order; {100 * CONFIDENCE:.0f}% t-interval over seeds) and the "
             "ranking they support:", "",
             "| metric | sampler | ranking | " + " | ".join(f"{x} − {y}" for x, y in pair_names) + " |",
             "|---|---|---|" + "---|" * len(pair_names)]
    rows = [(key, metric, label, scale, digits) for key in a["sampler_keys"]
            for metric, label, _, scale, digits in IMAGE_METRICS]
    rows.append(("likelihood", "nll_bpd", "NLL, discrete bits/dim", 1.0, 3))
    for key, metric, label, scale, digits in rows:
        t = a["tables"][f"{key}|{metric}"]
        by_pair = {(p["a"], p["b"]): p for p in t["pairs"]}
        cells = []
        for x, y in pair_names:
            p = by_pair.get((x, y))
            cells.append("–" if p is None else f"{fmt_interval(p['difference'], scale, digits)}: {p['verdict']}")
        sampler = "dopri5 (exact div.)" if key == "likelihood" else sampler_label(key)
        lines.append(f"| {label} | {sampler} | {t['ranking']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _likelihood_lines(payload: dict) -> list[str]:
    s, a = payload["settings"], payload["analysis"]
    t = a["tables"]["likelihood|nll_bpd"]
    lines = [f"**Likelihood** on the first {s['nll_images']} held-out images, uniformly dequantised over the data's "
             f"bins (width {s['bin_width']} in model space): discrete bits/dim = −(log p(x + u) + D log w)/(D ln 2), "
             "an upper bound on −log₂ P(bin) per dimension, ≥ 0 and comparable with published bits/dim. "
             "PF-ODE by dopri5 (the objective's atol = rtol), exact divergence; for diffusion the PF-ODE of its "
             "ε-net on its own VP path.", "",
             "| objective | NLL bits/dim (dopri5) | ELBO bits/dim (continuous, as trained) | ELBO, dequantised "
             "(discrete bound) |", "|---|---|---|---|"]
    for n in payload["settings"]["objectives"]:
        po = t["per_objective"].get(n)
        e1 = a["elbo"].get("elbo_bpd", {}).get(n)
        e2 = a["elbo"].get("elbo_discrete_bpd", {}).get(n)
        lines.append(f"| {n} | {fmt_mean_sd(list(po['values'].values()), 1.0, 3) if po else '–'} "
                     f"| {fmt_mean_sd(list(e1.values()), 1.0, 3) if e1 else '–'} "
                     f"| {fmt_mean_sd(list(e2.values()), 1.0, 3) if e2 else '–'} |")
    if a["convergence"]:
        steps = list(next(iter(a["convergence"].values()))["fixed"])
        solver = next(iter(a["convergence"].values()))["solver"]
        lines += ["", "Solver convergence of the NLL (same points and divergence; bits/dim, and the gap to dopri5):", "",
                  "| run | " + " | ".join(f"{solver} {n} steps" for n in steps) + " | dopri5 (NFE) |",
                  "|---|" + "---|" * (len(steps) + 1)]
        for run, c in a["convergence"].items():
            ref = c["dopri5"]["bpd"]
            cells = [f"{c['fixed'][n]['bpd']:.3f} ({c['fixed'][n]['bpd'] - ref:+.3f})" for n in steps]
            lines.append(f"| {run} | " + " | ".join(cells) + f" | {ref:.3f} ({c['dopri5']['nfe']}) |")
    return lines + [""]


def _curve_lines(payload: dict) -> list[str]:
    runs, points, h = payload["training"], payload["curves"]["points"], payload["headline_budget"]
    curves = group_by_objective(points, runs, "fid", by_budget=True)
    budgets = sorted(next(iter(curves.values())))
    lines = [f"**Training-budget curves** (digits-FID, {payload['curves']['sampler']}; mean ± sd over seeds; "
             "relative change from the previous budget in brackets):", "",
             "| objective | " + " | ".join(f"{b} steps" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for n, per in curves.items():
        cells = []
        for b in budgets:
            change = h["relative_changes"][n].get(b, h["relative_changes"][n].get(str(b)))
            cells.append(fmt_mean_sd(list(per[b].values())) + (f" [{100 * change:.0f}%]" if change is not None else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _per_run_table(payload: dict) -> list[str]:
    a, runs = payload["analysis"], payload["training"]
    keys = a["sampler_keys"]
    lines = ["Per run (digits-FID per sampler; NLL bits/dim):", "",
             "| run | " + " | ".join(sampler_label(k) for k in keys) + " | NLL | train CPU-s/step |",
             "|---|" + "---|" * (len(keys) + 2)]
    for r in runs:
        cells = []
        for key in keys:
            po = a["tables"][f"{key}|fid"]["per_objective"].get(r["name"], {})
            v = po.get("values", {}).get(r["seed"])
            cells.append("–" if v is None else f"{v:.2f}")
        nll = a["tables"]["likelihood|nll_bpd"]["per_objective"].get(r["name"], {}).get("values", {}).get(r["seed"])
        lines.append(f"| {r['run_id']} | " + " | ".join(cells) + f" | {'–' if nll is None else f'{nll:.3f}'} "
                     f"| {r['cpu_seconds_per_step']:.3f} |")
    return lines


def write(payload: dict, out_dir: Path) -> dict:
    """table1[_variant].{json,md}, the curves figure and a sample grid per objective."""
    stem = "table1" + ("" if payload["variant"] == "full" else f"_{payload['variant']}")
    out_dir = Path(out_dir)
    payload["analysis"] = analyse(payload)
    budget = str(payload["headline_budget"]["budget"])  # the headline checkpoints (sampling.py --from-table1)
    payload["objectives"] = {o: {"runs": [{"seed": r["seed"], "run_id": r["run_id"], "ckpt": r["checkpoints"][budget]}
                                          for r in payload["training"] if r["name"] == o]}
                             for o in payload["settings"]["objectives"]}
    figures = [plot_curves(payload, out_dir / f"{stem}_curves.png")]
    for e in payload["evaluations"]:
        if "_images" in e:
            name = e["run_id"].rsplit("_seed", 1)[0]
            figures.append(save_grid(e.pop("_images"), e.pop("_labels"), out_dir / f"{stem}_samples_{name}.png"))
    kept = [out_dir / Path(p).name for p in payload.get("figures", []) if "_samples_" in p]  # --report-only
    figures += [p for p in kept if p.is_file() and p not in figures]
    payload["figures"] = [shown(p) for p in figures]
    payload["report_md"], payload["report_json"] = shown(out_dir / f"{stem}.md"), shown(out_dir / f"{stem}.json")
    write_json(out_dir / f"{stem}.json", payload)
    write_text(out_dir / f"{stem}.md", markdown(payload))
    return payload
