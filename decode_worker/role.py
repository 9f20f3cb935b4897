"""Engine settings of a decode worker.

A decode instance pulls each prompt's KV blocks from a prefill instance and then generates one
token per step for every running sequence. A step is memory-bound, so throughput comes from
batching many sequences; a prompt needs almost no compute here (only the tokens the transfer
did not cover), so the batched-token budget stays modest.
"""

from __future__ import annotations

from deploy.worker_launch import RoleSettings

SETTINGS = RoleSettings(
    name="decode",
    kv_role="consumer",
    api_port_base=8200,
    # Decode instances only dial out; the port is kept in the config for symmetry.
    kv_port_base=None,
    kv_events_port_base=16200,
    kv_events_replay_port_base=17200,
    max_num_batched_tokens=4096,
    max_num_seqs=256,
)
