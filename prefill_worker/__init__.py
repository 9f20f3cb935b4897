"""Prefill worker: a vLLM OpenAI server in the KV-producer role."""
