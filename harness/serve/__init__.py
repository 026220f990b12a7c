"""Experiment B: first-token latency and warm start of an OpenAI-compatible server (vLLM first)."""
