"""The kv_cache routing policy against a fake KV index: hits, fallbacks, the hot-spot bound."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest

from proxy.block_hashes import HashSettings
from proxy.instances import Instance, Role
from proxy.kv_index import KVIndex
from proxy.routing import load_policy
from proxy.routing.base import RoutingRequest
from proxy.routing.kv_cache import KVCachePolicy

SETTINGS = HashSettings(16, "sha256", "vllm-none-hash")
KEYS = list(range(100, 160))  # a 60-block prompt (960 tokens)


class FakeIndex:
    """cached_prefix_blocks as KVIndex answers it: leading keys held, 0 when unsynced."""

    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}
        self.synced: dict[str, bool] = {}

    def cached_prefix_blocks(self, instance: str, keys: Sequence[int]) -> int:
        if not self.synced.get(instance, True):
            return 0
        held = self.blocks.get(instance, set())
        count = 0
        for key in keys:
            if key not in held:
                break
            count += 1
        return count


def pool(count: int = 4) -> list[Instance]:
    return [Instance(f"http://10.0.0.{i}:8200", Role.DECODE) for i in range(count)]


def bound_policy(index: FakeIndex, known: set[str] | None = None, **options: Any) -> KVCachePolicy:
    policy = KVCachePolicy(**options)

    def lookup(url: str) -> HashSettings | None:
        return SETTINGS if known is None or url in known else None

    policy.bind_kv_index(cast(KVIndex, index), lookup)
    return policy


def request(keys: Sequence[int] | None = KEYS, prompt_tokens: int = 1000) -> RoutingRequest:
    return RoutingRequest("r", "prompt", prompt_tokens, 16, keys)


def test_prefers_the_instance_caching_the_prefix() -> None:
    instances = pool()
    index = FakeIndex()
    index.blocks[instances[2].url] = set(KEYS[:40])
    index.blocks[instances[3].url] = set(KEYS[:10])
    # Some load everywhere, a little more on the cacher: its hits still win.
    for instance in instances:
        instance.in_flight_requests, instance.in_flight_tokens = 1, 100
    instances[2].in_flight_tokens = 300
    policy = bound_policy(index)
    assert policy.saved_tokens(instances[2], request()) == 40 * 16
    assert policy.select(instances, request()) is instances[2]


def test_saved_tokens_leave_the_last_prompt_token_to_compute() -> None:
    instances = pool(2)
    index = FakeIndex()
    index.blocks[instances[0].url] = set(KEYS)
    policy = bound_policy(index)
    # The whole 960-token prompt is cached: vLLM still computes its last token.
    assert policy.saved_tokens(instances[0], request(prompt_tokens=960)) == 959


@pytest.mark.parametrize("why", ["unsynced", "unknown_settings", "no_keys", "unbound"])
def test_falls_back_to_least_load(why: str) -> None:
    instances = pool()
    index = FakeIndex()
    cacher = instances[0]
    index.blocks[cacher.url] = set(KEYS)
    for load, instance in zip((500, 300, 100, 200), instances, strict=True):
        instance.in_flight_tokens = load
        instance.in_flight_requests = 1
    keys: Sequence[int] | None = KEYS
    if why == "unsynced":
        index.synced[cacher.url] = False
        policy = bound_policy(index)
    elif why == "unknown_settings":
        policy = bound_policy(index, known={i.url for i in instances[1:]})
    elif why == "no_keys":
        policy, keys = bound_policy(index), None
    else:
        policy = KVCachePolicy()
    assert policy.select(instances, request(keys)) is instances[2]


def test_ties_go_to_fewer_requests_then_rotate() -> None:
    instances = pool(3)
    policy = bound_policy(FakeIndex())
    instances[0].in_flight_requests = 1
    chosen = {policy.select(instances, request(None)).url for _ in range(6)}
    assert chosen == {instances[1].url, instances[2].url}


def route_hot_prefix(policy: KVCachePolicy, instances: list[Instance]) -> list[Instance]:
    """100 requests of one prompt, none finishing; each choice within the load bound, and
    no instance above ceil(1.25 x 100 / 4) at the end. The instances chosen, in order."""
    chosen = []
    for _ in range(100):
        capacity = policy.capacity(instances)
        instance = policy.select(instances, request())
        assert instance.in_flight_requests + 1 <= capacity
        instance.in_flight_requests += 1
        instance.in_flight_tokens += 1016
        chosen.append(instance)
    assert max(i.in_flight_requests for i in instances) <= -(-125 // 4)
    return chosen


def test_a_hot_prefix_is_bounded_but_mostly_lands_on_cachers() -> None:
    """100 requests of one prefix over 4 instances, two of them caching it, none finishing."""
    instances = pool(4)
    index = FakeIndex()
    cachers = {instances[0].url, instances[1].url}
    for url in cachers:
        index.blocks[url] = set(KEYS)
    # The index alone: routed prefixes (pending_s) would make every instance a cacher.
    policy = bound_policy(index, hit_weight=1.0, load_weight=0.01, epsilon=0.25, pending_s=0)
    on_cachers = sum(chosen.url in cachers for chosen in route_hot_prefix(policy, instances))
    assert on_cachers > 50, on_cachers
    # Without the bound every request would have gone to the cachers.
    assert on_cachers < 100


def test_requests_sharing_a_new_prefix_follow_the_first_until_the_index_knows() -> None:
    """Nothing is indexed yet: the first request goes by load, the next ones sharing its
    prefix go where it went (its blocks are being computed there), within the load bound;
    after pending_s the routed prefix no longer counts."""
    instances = pool(2)
    policy = bound_policy(FakeIndex(), pending_s=5.0, load_weight=0.1)
    now = [100.0]
    policy.clock = lambda: now[0]
    first = policy.select(instances, request())
    first.in_flight_requests, first.in_flight_tokens = 1, 1016
    # A prompt sharing 20 blocks: the first instance is expected to hold them.
    other = request([*KEYS[:20], 9001, 9002])
    assert policy.saved_tokens(first, other) == 20 * 16
    assert policy.select(instances, other) is first
    unrelated = request([7, 8, 9])
    assert policy.select(instances, unrelated) is not first  # load decides
    now[0] += 5.1
    assert policy.saved_tokens(first, other) == 0
    assert policy.select(instances, other) is not first
    policy.forget(first)
    now[0] -= 5.1
    assert policy.saved_tokens(first, other) == 0


def test_routed_prefixes_are_bounded_per_instance() -> None:
    instances = pool(1)
    policy = bound_policy(FakeIndex(), pending_blocks=8)
    policy.select(instances, request(list(range(100, 120))))
    assert policy.saved_tokens(instances[0], request(list(range(100, 120)))) == 0  # 100 dropped
    assert policy.saved_tokens(instances[0], request(list(range(112, 120)))) == 8 * 16


def test_a_hot_new_prefix_stays_bounded_with_routed_prefixes() -> None:
    """100 requests of one prefix nobody caches yet, none finishing: they gather where the
    first went until the bound sends the rest elsewhere (where the prefix is then computed)."""
    instances = pool(4)
    policy = bound_policy(FakeIndex(), hit_weight=1.0, load_weight=0.01, epsilon=0.25)
    first, *_ = route_hot_prefix(policy, instances)
    assert first.in_flight_requests == max(i.in_flight_requests for i in instances)


def test_loads_by_bare_name_with_options() -> None:
    policy = load_policy("kv_cache", {"hit_weight": 2.0, "load_weight": 0.5, "epsilon": 0.1})
    assert isinstance(policy, KVCachePolicy) and policy.needs_kv_index
    assert (policy.hit_weight, policy.load_weight, policy.epsilon) == (2.0, 0.5, 0.1)
    assert not load_policy("least_load", {}).needs_kv_index


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hit_wieght": 1.0}, "unknown option(s) hit_wieght; accepted: epsilon, hit_weight"),
        ({"epsilon": -1}, "option epsilon must be >= 0.0"),
        ({"load_weight": "high"}, "option load_weight must be a finite number"),
        ({"hit_weight": 0, "load_weight": 0}, "cannot both be 0"),
    ],
)
def test_bad_options_are_refused_clearly(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="routing policy 'kv_cache'") as info:
        load_policy("kv_cache", options)
    assert message in str(info.value)


def test_hash_settings_come_from_the_engines_metrics() -> None:
    from proxy.hash_settings import parse_cache_config_info, settings_from_labels

    text = (
        "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
        "# TYPE vllm:cache_config_info gauge\n"
        'vllm:cache_config_info{block_size="16",cache_dtype="auto",enable_prefix_caching="True",'
        'prefix_caching_hash_algo="sha256_cbor",swap_space="4.0"} 1.0\n'
    )
    labels = parse_cache_config_info(text)
    assert labels is not None
    assert settings_from_labels(labels, None) == HashSettings(16, "sha256_cbor", "vllm-none-hash")
    assert settings_from_labels(labels, "7") == HashSettings(16, "sha256_cbor", "7")
    assert parse_cache_config_info("vllm:num_requests_running 0.0\n") is None
    with pytest.raises(ValueError, match="prefix caching is off"):
        settings_from_labels({**labels, "enable_prefix_caching": "False"}, None)
    with pytest.raises(ValueError, match="random per-process"):
        settings_from_labels({**labels, "prefix_caching_hash_algo": "xxhash"}, None)
