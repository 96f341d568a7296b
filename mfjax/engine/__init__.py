"""Batched generation and scoring for many agents at once."""
