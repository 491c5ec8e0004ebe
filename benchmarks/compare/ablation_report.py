"""The ablation's analysis and report: per-cell scores, the additive main-effects model with 95% intervals, and
each gap between two objectives split into the factors in which their corners differ."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import write_json
from benchmarks.compare.design import CORNERS
from benchmarks.compare.report import IMAGE_METRICS, fmt_interval, fmt_mean_sd, provenance, shown, write_text
from benchmarks.compare.stats import (
    CONFIDENCE,
    NOT_DISTINGUISHABLE,
    fit_main_effects,
    paired_difference,
    verdict,
)

GAPS = (("diffusion", "score"), ("flow", "score"), ("diffusion", "flow"))  # (a, b): a - b


def rows_of(payload: dict) -> list[dict]:
    """One row per run: the cell's factor levels, the seed and every response."""
    cell_of = {c["name"]: c for c in payload["cells"]}
    run_of = {r["run_id"]: r for r in payload["training"]}
    rows = []
    for e in payload["evaluations"]:
        run = run_of[e["run_id"]]
        rows.append({**cell_of[run["name"]]["levels"], "cell": run["name"], "seed": run["seed"],
                     **{m: e[m] for m in payload["settings"]["responses"]}})
    return rows


def analyse(payload: dict) -> dict:
    """Per response: the fit (effects, F-tests, residual sd), corner gaps observed vs explained by the model."""
    rows = rows_of(payload)
    factors = {f: [lvl for lvl in levels if any(r[f] == lvl for r in rows)]
               for f, levels in payload["factors"].items()}
    factors = {f: levels for f, levels in factors.items() if len(levels) > 1}
    block = "seed" if len({r["seed"] for r in rows}) > 1 else None
    lower = {m: low for m, _, low, _, _ in IMAGE_METRICS}
    out = {"factors": factors, "block": block, "responses": {}}
    for response in payload["settings"]["responses"]:
        fit = fit_main_effects(rows, factors, response, block=block)
        effects = [{"factor": f, "level": lvl, "reference": levels[0], **fit.effect(f, lvl).as_dict()}
                   for f, levels in factors.items() for lvl in levels[1:]]
        gaps = []
        for a, b in GAPS:
            values = {name: {r["seed"]: r[response] for r in rows if r["cell"] == name} for name in (a, b)}
            observed = paired_difference(values[a], values[b], CONFIDENCE)
            differing = [f for f in factors if CORNERS[a][f] != CORNERS[b][f]]
            parts = []
            for f in differing:
                iv = fit.difference({f: CORNERS[a][f]}, {f: CORNERS[b][f]})
                parts.append({"factor": f, "levels": [CORNERS[a][f], CORNERS[b][f]], **iv.as_dict()})
            model = fit.difference({f: CORNERS[a][f] for f in factors}, {f: CORNERS[b][f] for f in factors})
            gaps.append({"a": a, "b": b, "observed": observed.as_dict(),
                         "verdict": verdict(observed, a, b, lower[response]), "model": model.as_dict(),
                         "parts": parts})
        residual = {}
        for name in CORNERS:
            corner_rows = [r for r in rows if r["cell"] == name]
            blocks = [{f"seed={r['seed']}": 1.0} if block and f"seed={r['seed']}" in fit.columns else {}
                      for r in corner_rows]
            fitted = [fit.predict(CORNERS[name], w) for w in blocks]
            residual[name] = sum(r[response] - y for r, y in zip(corner_rows, fitted)) / len(corner_rows)
        out["responses"][response] = {
            "effects": effects, "factor_tests": fit.factor_tests, "df": fit.df, "n": fit.n,
            "residual_sd": (fit.rss / fit.df) ** 0.5 if fit.df > 0 else None, "gaps": gaps,
            "corner_residuals": residual}
    return out


def _scale(metric: str) -> tuple[str, float, int]:
    label, scale, digits = next((lab, sc, d) for m, lab, _, sc, d in IMAGE_METRICS if m == metric)
    return label, scale, digits


def conclusions(payload: dict, response: str = "fid") -> list[str]:
    """Which of the factors separating two objectives' corners have effects whose intervals exclude zero."""
    r = payload["analysis"]["responses"][response]
    label, scale, digits = _scale(response)

    def part(p: dict) -> str:
        return f"{p['factor']} ({p['levels'][0]} vs {p['levels'][1]}: {fmt_interval(p, scale, digits)})"

    lines, moves, still = [], set(), set()
    for g in r["gaps"]:
        real = [p for p in g["parts"] if p["excludes_zero"]]
        null = [p for p in g["parts"] if not p["excludes_zero"]]
        moves |= {p["factor"] for p in real}
        still |= {p["factor"] for p in null}
        text = (f"- **{g['a']} − {g['b']}** (corners differ in {', '.join(p['factor'] for p in g['parts'])}): "
                f"observed {label} {fmt_interval(g['observed'], scale, digits)} ({g['verdict']}); the additive model "
                f"gives {fmt_interval(g['model'], scale, digits)}.")
        if real:
            text += " Effects distinguishable from zero: " + "; ".join(part(p) for p in real) + "."
        if null:
            text += " Not distinguishable from zero: " + "; ".join(part(p) for p in null) + "."
        lines.append(text)
    in_gaps = moves | still
    others = [e for e in r["effects"] if e["factor"] not in in_gaps]
    lines.append(f"- In sum, the differences between the objectives come from: {', '.join(sorted(moves)) or 'none'}"
                 f"; not from: {', '.join(sorted(still - moves)) or 'none'} (intervals contain zero). Factors on "
                 "which the three corners agree: " + ("; ".join(
                     f"{e['factor']} {e['level']} vs {e['reference']} {fmt_interval(e, scale, digits)}"
                     + ("" if e["excludes_zero"] else " (n.d.)") for e in others) or "none") + ".")
    return lines


def markdown(payload: dict) -> str:
    s, a = payload["settings"], payload["analysis"]
    quick = payload["variant"] != "full"
    n_runs = len(payload["training"])
    lines = [f"# What separates diffusion, score and flow: factorial ablation on digits"
             f"{' — ' + payload['variant'].upper() + ' variant' if quick else ''}", ""]
    if quick:
        lines += [f"**{payload['variant'].upper()} variant**: {len(s['seeds'])} seeds, {s['steps']} steps, "
                  f"{s['num_samples']} samples per cell — the same code path as `make ablation` at smaller sizes; "
                  "its intervals are wide and its training short.", ""]
    lines += [
        "Factors (reference level first: score's corner): "
        + "; ".join(f"{f}: {', '.join(map(str, v))}" for f, v in payload["factors"].items()) + ". "
        f"{len(payload['cells'])} cells — the 16 of an orthogonal array L16 (every main effect estimable, none "
        "confounded with another) plus the three objectives' own corners (run as themselves; the array's cells run "
        f"as `objective=score` with every key set) — × seeds {list(s['seeds'])} = {n_runs} runs of {s['steps']} "
        f"steps on {payload['data']} with {payload['model']}. Each scored with {s['sampler'][0]} at "
        f"{s['sampler'][1]} NFE ({s['sampler'][2]} grid), {s['num_samples']} samples, the same noise for every run. "
        f"Model: response = intercept + Σ factor effects + seed block + noise (least squares; "
        f"{100 * CONFIDENCE:.0f}% t-intervals from the residual variance, df = "
        f"{a['responses'][s['responses'][0]]['df']}). Interactions are assumed small; the corners' residuals "
        "below show how well the additive model describes the objectives.", ""]
    if payload["refused_cells"]:
        lines += ["Cells the objectives refused at construction (left out; the fit uses the rest): "
                  + "; ".join(f"{c['name']} {c['levels']}: {c['error']}" for c in payload["refused_cells"]), ""]
    lines += ["## Which factors account for the differences between the objectives", "",
              f"digits-FID ({s['sampler'][0]} @ {s['sampler'][1]} NFE). A factor accounts for part of a gap only "
              "where its effect's interval excludes zero:", ""] + conclusions(payload, "fid") + [""]
    responses = s["responses"]
    lines += ["## Main effects (change from the reference level, other factors fixed)", "",
              "| factor | level vs reference | " + " | ".join(_scale(m)[0] for m in responses) + " |",
              "|---|---|" + "---|" * len(responses)]
    first = a["responses"][responses[0]]["effects"]
    for k, e in enumerate(first):
        cells = []
        for m in responses:
            eff = a["responses"][m]["effects"][k]
            _, scale, digits = _scale(m)
            cells.append(fmt_interval(eff, scale, digits) + ("" if eff["excludes_zero"] else " n.d."))
        lines.append(f"| {e['factor']} | {e['level']} vs {e['reference']} | " + " | ".join(cells) + " |")
    lines += ["", "n.d. = not distinguishable from zero (the interval contains it). F-test per factor "
              "(all its levels at once), p-value: "
              + "; ".join(f"{f}: FID p = {t['p']:.3g}" for f, t in a["responses"]["fid"]["factor_tests"].items())
              + ".", ""]
    lines += ["## Gaps between the objectives, by response", "",
              "| response | gap | observed (paired over seeds) | model | factor contributions | corner residual (a, b) |",
              "|---|---|---|---|---|---|"]
    for m in responses:
        r = a["responses"][m]
        label, scale, digits = _scale(m)
        for g in r["gaps"]:
            parts = "; ".join(f"{p['factor']} {fmt_interval(p, scale, digits)}" for p in g["parts"])
            res = f"{scale * r['corner_residuals'][g['a']]:+.{digits}f}, {scale * r['corner_residuals'][g['b']]:+.{digits}f}"
            lines.append(f"| {label} | {g['a']} − {g['b']} | {fmt_interval(g['observed'], scale, digits)} "
                         f"({g['verdict'] if g['verdict'] != NOT_DISTINGUISHABLE else 'n.d.'}) "
                         f"| {fmt_interval(g['model'], scale, digits)} | {parts} | {res} |")
    lines += ["", "## Cells", "", "| cell | objective | " + " | ".join(payload["factors"]) + " | "
              + " | ".join(_scale(m)[0] for m in responses) + " |",
              "|---|---|" + "---|" * (len(payload["factors"]) + len(responses))]
    rows = rows_of(payload)
    for c in payload["cells"]:
        cr = [r for r in rows if r["cell"] == c["name"]]
        vals = [fmt_mean_sd([r[m] for r in cr], _scale(m)[1], _scale(m)[2]) for m in responses]
        lines.append(f"| {c['name']} | {c['objective']} | " + " | ".join(str(c["levels"][f]) for f in payload["factors"])
                     + " | " + " | ".join(vals) + " |")
    cps = [r["cpu_seconds_per_step"] for r in payload["training"]]
    lines += ["", f"Cost: training {sum(cps) / len(cps):.3f} CPU-s per step on average (1 thread), "
              f"{sum(r['cpu_seconds'] for r in payload['training']) / 3600:.2f} CPU-hours in all; scoring "
              f"{sum(e['cpu_seconds'] for e in payload['evaluations']) / 3600:.2f} CPU-hours.", ""]
    lines += provenance(payload) + [""]
    return "\n".join(lines)


def write(payload: dict, out_dir: Path) -> dict:
    stem = "ablation" + ("" if payload["variant"] == "full" else f"_{payload['variant']}")
    out_dir = Path(out_dir)
    payload["analysis"] = analyse(payload)
    payload["report_md"], payload["report_json"] = shown(out_dir / f"{stem}.md"), shown(out_dir / f"{stem}.json")
    write_json(out_dir / f"{stem}.json", payload)
    write_text(out_dir / f"{stem}.md", markdown(payload))
    return payload
