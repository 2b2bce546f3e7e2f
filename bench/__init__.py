"""normpilot's benchmarks and small-batch studies, run as modules from the repository
root (``python -m bench.study``, ``make study``); results go to bench/results/."""
