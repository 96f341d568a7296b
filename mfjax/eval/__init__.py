"""Evaluation of simulated against real populations."""
