"""normpilot's training service: ``normpilot`` (= ``python -m trainer``) train, policy,
eval, predict, export, runs.

config.py (typed config) -> plan.py (the run plan: batches, norms per part) -> training.py
(datasets, model, DDP, optimizer) -> loop.py (``train``) with checkpoint.py, evaluate.py
and tracking.py at their points.  See the README's Architecture section.
"""
