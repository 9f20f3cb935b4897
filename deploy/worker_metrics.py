"""What the controller and ``pdserve status`` read from a worker's own ``/metrics``.

Kept apart from :mod:`kv_transfer.stats`, which defines the metric: that module imports
vLLM, and neither the CLI nor the controller should pay for that to read one gauge.
"""

from __future__ import annotations

# kv_transfer.stats.BLOCKS_HELD: the blocks a prefill instance holds until decode
# instances have pulled them (or their leases expire); one sample per engine.
KV_BLOCKS_METRIC = "pdserve_kv_blocks_held"


def kv_blocks_in(text: str) -> int | None:
    """The sum of ``pdserve_kv_blocks_held`` over its samples in Prometheus text format;
    None when the text has no such metric (a decode instance, a stock vLLM server) or is
    not Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    total: float | None = None
    try:
        for family in text_string_to_metric_families(text):
            if family.name == KV_BLOCKS_METRIC:
                total = (total or 0.0) + sum(sample.value for sample in family.samples)
    except ValueError:
        return None
    return None if total is None else int(total)
