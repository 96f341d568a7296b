"""IB-Tune: information-bottleneck fine-tuning of the policy and mean-field models."""
