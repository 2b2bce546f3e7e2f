"""normpilot's training service (configs, policy application, distributed loop).

Being built in the tracker's issues 3 (config + policy command) and 4 (training loop);
until then ``make train`` runs ``python -m norms.demo``.
"""
