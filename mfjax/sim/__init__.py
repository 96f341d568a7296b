"""The MF-LLM simulation: prompts and the scanned rollout over time."""
