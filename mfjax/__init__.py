"""mfjax: a JAX/Flax implementation of MF-LLM, the mean-field LLM population simulator."""

__version__ = "0.1.0"
