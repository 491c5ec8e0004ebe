"""A fair comparison of generative objectives on one backbone: training runs, metrics, statistics, reports.

    runs.py     train.py runs (one subprocess per objective x seed), checkpoints at every training budget
    metrics.py  what one checkpoint scores: digits-FID / KID / class accuracy per sampler, converged NLL
    stats.py    paired t-intervals, rankings, the main-effects model of the ablation, the budget rule
    design.py   the fractional factorial design of the ablation
    report.py   markdown, JSON and figures; the docs/RESULTS.md sections

benchmarks/table1.py and benchmarks/ablation.py are the two command lines built from these parts.
"""
