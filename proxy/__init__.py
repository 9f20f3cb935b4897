"""The pdserve global proxy: OpenAI-compatible xPyD routing over vLLM's
kv_transfer_params handoff."""
