"""TCP pull KV-transfer connector for vLLM (out-of-tree KVConnectorBase_V1)."""
