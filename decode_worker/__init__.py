"""Decode worker: a vLLM OpenAI server in the KV-consumer role."""
