"""IB-Tune: information-bottleneck fine-tuning of the policy and mean-field models (SPEC §3).

Not built yet: this package is where the jitted losses (ib_tune.py), the Optax step (step.py) and the
orbax-managed loop (loop.py) will live.
"""
