"""Evaluation of simulated against real populations (SPEC §4).

Not built yet: this package is where the labelers, the distribution metrics (KL, JS, Wasserstein, DTW)
and the reports will live.
"""
