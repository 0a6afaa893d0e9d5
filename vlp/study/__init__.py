"""vlp-study: multi-seed comparisons of config variants, each run an ordinary training run.

spec (the study file), runner (runs and commands, resumable), stats (Student-t intervals),
results (study.json), report (study.md, figures), cli (`vlp-study`). docs/study.md.
"""
