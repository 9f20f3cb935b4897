"""Engine settings of a prefill worker.

A prefill instance runs each prompt once with ``max_tokens=1`` and then holds the finished
request's KV blocks until a decode instance pulls them. Its work is compute-bound batches of
prompt tokens, so it gets a large batched-token budget and only a few concurrent sequences:
more sequences would only split the same compute budget and hold more blocks.
"""

from __future__ import annotations

from deploy.worker_launch import RoleSettings

SETTINGS = RoleSettings(
    name="prefill",
    kv_role="producer",
    api_port_base=8100,
    kv_port_base=15100,
    kv_events_port_base=16100,
    kv_events_replay_port_base=17100,
    max_num_batched_tokens=16384,
    max_num_seqs=16,
)
