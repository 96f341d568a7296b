"""Backbone LLMs: pure-function maths (layers, decoder) and the NNX module wrapper."""
