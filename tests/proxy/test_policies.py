"""Unit tests of the routing policies and of load_policy: each policy's choice under known loads."""

from __future__ import annotations

import math
import random
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.instances import Instance, Role
from proxy.routing import RoutingPolicy, load_policy, shipped_policies
from proxy.routing.base import RoutingRequest
from proxy.routing.least_load import LeastLoadPolicy
from proxy.routing.power_of_two import PowerOfTwoPolicy
from proxy.routing.prefill_cost import PrefillCostPolicy
from proxy.routing.prefix_affinity import HashRing, PrefixAffinityPolicy
from proxy.routing.round_robin import RoundRobinPolicy

SHIPPED = [
    "kv_cache",
    "least_load",
    "power_of_two",
    "prefill_cost",
    "prefix_affinity",
    "round_robin",
]


def pool(count: int, role: Role = Role.DECODE, port: int = 8200) -> list[Instance]:
    return [Instance(url=f"http://127.0.0.1:{port + i}", role=role) for i in range(count)]


def req(
    prompt: str | list[int] = "hello", *, request_id: str = "r", tokens: int | None = None
) -> RoutingRequest:
    prompt_tokens = tokens if tokens is not None else max(1, len(prompt) // 4)
    return RoutingRequest(
        request_id=request_id, prompt=prompt, prompt_tokens=prompt_tokens, max_tokens=16
    )


def random_prompts(count: int, seed: int = 7, length: int = 600) -> list[str]:
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyz "
    return ["".join(rng.choices(alphabet, k=length)) for _ in range(count)]


# -- load_policy -------------------------------------------------------------------------


def test_shipped_policies_are_listed_and_load_by_bare_name() -> None:
    assert shipped_policies() == SHIPPED
    for name in SHIPPED:
        policy = load_policy(name, {})
        assert isinstance(policy, RoutingPolicy)
        assert type(policy).__module__ == f"proxy.routing.{name}"


def test_load_policy_passes_options() -> None:
    policy = load_policy("least_load", {"request_weight": 2.0, "token_weight": 0})
    assert isinstance(policy, LeastLoadPolicy)
    assert policy.weights.request_weight == 2.0
    assert policy.weights.token_weight == 0.0
    affinity = load_policy("prefix_affinity", {"block_chars": 32, "epsilon": 0.5})
    assert isinstance(affinity, PrefixAffinityPolicy)
    assert (affinity.block_chars, affinity.epsilon) == (32, 0.5)


@pytest.mark.parametrize("name", ["no_such_policy", "base", "_options", "bad name", ""])
def test_unknown_policy_name_lists_shipped_ones(name: str) -> None:
    with pytest.raises(ValueError) as info:
        load_policy(name, {})
    message = str(info.value)
    for shipped in SHIPPED:
        assert shipped in message


def test_unknown_option_names_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match=r"'least_load'.*unknown option\(s\) tokens_weight"):
        load_policy("least_load", {"tokens_weight": 1})
    with pytest.raises(ValueError, match="accepted: request_weight, token_weight"):
        load_policy("least_load", {"tokens_weight": 1})
    with pytest.raises(ValueError, match=r"unknown option\(s\) seed; accepted: \(none\)"):
        load_policy("round_robin", {"seed": 1})


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("least_load", {"request_weight": "heavy"}, "request_weight"),
        ("least_load", {"request_weight": -1}, "request_weight"),
        ("least_load", {"request_weight": 0, "token_weight": 0}, "both be 0"),
        ("power_of_two", {"seed": "x"}, "seed"),
        ("power_of_two", {"seed": True}, "seed"),
        ("prefix_affinity", {"block_chars": 0}, "block_chars"),
        ("prefix_affinity", {"virtual_nodes": 2.5}, "virtual_nodes"),
        ("prefix_affinity", {"epsilon": -0.1}, "epsilon"),
        ("prefix_affinity", {"epsilon": float("nan")}, "epsilon"),
        ("prefill_cost", {"prior_tokens_per_s": 0}, "prior_tokens_per_s"),
        ("prefill_cost", {"ewma_alpha": 1.5}, "ewma_alpha"),
    ],
)
def test_invalid_option_values_name_the_option(name: str, options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field) as info:
        load_policy(name, options)
    assert repr(name) in str(info.value)


def test_options_must_be_a_mapping() -> None:
    with pytest.raises(ValueError, match="options must be a mapping"):
        load_policy("least_load", [("request_weight", 1)])  # type: ignore[arg-type]


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    package = tmp_path / "oot_routing"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "first.py").write_text(
        textwrap.dedent(
            """
            from proxy.routing.base import RoutingPolicy

            class FirstPolicy(RoutingPolicy):
                def __init__(self, offset: int = 0) -> None:
                    self.offset = offset

                def select(self, candidates, request):
                    return candidates[self.offset % len(candidates)]

            POLICY = FirstPolicy
            """
        )
    )
    (package / "nopolicy.py").write_text("VALUE = 1\n")
    (package / "notaclass.py").write_text("POLICY = 'round_robin'\n")
    (package / "broken.py").write_text("import module_that_does_not_exist_anywhere\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m == "oot_routing" or m.startswith("oot_routing.")]:
        del sys.modules[name]


def test_dotted_name_loads_an_out_of_tree_policy(plugin_dir: Path) -> None:
    policy = load_policy("oot_routing.first", {"offset": 1})
    instances = pool(3)
    assert policy.select(instances, req()) is instances[1]
    with pytest.raises(ValueError, match="unknown option"):
        load_policy("oot_routing.first", {"offset": 1, "other": 2})


def test_dotted_name_loads_a_shipped_module_by_full_path() -> None:
    assert isinstance(load_policy("proxy.routing.round_robin", {}), RoundRobinPolicy)


def test_dotted_name_errors(plugin_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown routing policy 'oot_routing\.missing'"):
        load_policy("oot_routing.missing", {})
    with pytest.raises(ValueError, match=r"unknown routing policy 'nowhere\.at\.all'"):
        load_policy("nowhere.at.all", {})
    with pytest.raises(ValueError, match="has no POLICY"):
        load_policy("oot_routing.nopolicy", {})
    with pytest.raises(ValueError, match="has no POLICY"):
        load_policy("oot_routing.notaclass", {})
    # A policy whose own imports fail is broken, not unknown: the message says which import.
    with pytest.raises(ValueError, match=r"failed to import.*module_that_does_not_exist"):
        load_policy("oot_routing.broken", {})


# -- round_robin -------------------------------------------------------------------------


def test_round_robin_cycles_and_follows_pool_changes() -> None:
    policy = RoundRobinPolicy()
    instances = pool(3)
    picks = [policy.select(instances, req()) for _ in range(6)]
    assert picks == instances + instances
    two = instances[:2]
    later = [policy.select(two, req()) for _ in range(4)]
    assert Counter(id(p) for p in later) == {id(two[0]): 2, id(two[1]): 2}


def test_round_robin_ignores_load() -> None:
    policy = RoundRobinPolicy()
    instances = pool(2)
    instances[0].in_flight_requests = 1000
    assert {id(policy.select(instances, req())) for _ in range(4)} == {id(i) for i in instances}


# -- least_load --------------------------------------------------------------------------


def test_least_load_picks_fewest_requests() -> None:
    policy = LeastLoadPolicy()
    instances = pool(3)
    for instance, load in zip(instances, [5, 2, 7], strict=True):
        instance.in_flight_requests = load
    for _ in range(5):
        assert policy.select(instances, req()) is instances[1]


def test_least_load_counts_tokens_with_default_weight() -> None:
    policy = LeastLoadPolicy()
    a, b = pool(2)
    # 3 requests carrying 300 tokens (load 3.6) beat 2 requests carrying 2000 tokens (load 6.0).
    a.in_flight_requests, a.in_flight_tokens = 3, 300
    b.in_flight_requests, b.in_flight_tokens = 2, 2000
    assert policy.select([a, b], req()) is a
    assert policy.weights.load(a) == pytest.approx(3.6)
    assert policy.weights.load(b) == pytest.approx(6.0)


def test_least_load_weighting_is_an_option() -> None:
    a, b = pool(2)
    a.in_flight_requests, a.in_flight_tokens = 1, 5000
    b.in_flight_requests, b.in_flight_tokens = 4, 100
    requests_only = LeastLoadPolicy(request_weight=1.0, token_weight=0.0)
    tokens_only = LeastLoadPolicy(request_weight=0.0, token_weight=1.0)
    assert requests_only.select([a, b], req()) is a
    assert tokens_only.select([a, b], req()) is b


def test_least_load_ties_rotate_over_an_idle_pool() -> None:
    policy = LeastLoadPolicy()
    instances = pool(4)
    picks = Counter(id(policy.select(instances, req())) for _ in range(8))
    assert picks == {id(instance): 2 for instance in instances}


def test_least_load_follows_counters_as_they_change() -> None:
    policy = LeastLoadPolicy()
    instances = pool(3)
    for _ in range(30):
        chosen = policy.select(instances, req())
        chosen.in_flight_requests += 1
    assert [i.in_flight_requests for i in instances] == [10, 10, 10]


# -- power_of_two ------------------------------------------------------------------------


def test_power_of_two_with_two_candidates_always_takes_the_lighter() -> None:
    policy = PowerOfTwoPolicy(seed=1)
    a, b = pool(2)
    a.in_flight_requests = 3
    assert all(policy.select([a, b], req()) is b for _ in range(50))


def test_power_of_two_never_picks_the_most_loaded_and_prefers_light_ones() -> None:
    policy = PowerOfTwoPolicy(seed=3)
    instances = pool(4)
    for instance, load in zip(instances, [0, 1, 2, 3], strict=True):
        instance.in_flight_requests = load
    picks = Counter(instances.index(policy.select(instances, req())) for _ in range(1200))
    assert picks[3] == 0
    # The lightest wins every pair it is in: 3 of the 6 pairs -> about half the picks.
    assert 0.4 < picks[0] / 1200 < 0.6
    assert picks[0] > picks[1] > picks[2] > 0


def test_power_of_two_seed_makes_choices_reproducible() -> None:
    instances = pool(5)
    for i, instance in enumerate(instances):
        instance.in_flight_requests = i % 3
    first = [policy_pick for policy_pick in _picks(PowerOfTwoPolicy(seed=42), instances)]
    again = [policy_pick for policy_pick in _picks(PowerOfTwoPolicy(seed=42), instances)]
    other = [policy_pick for policy_pick in _picks(PowerOfTwoPolicy(seed=43), instances)]
    assert first == again
    assert first != other


def _picks(policy: RoutingPolicy, instances: list[Instance]) -> list[int]:
    return [instances.index(policy.select(instances, req())) for _ in range(40)]


def test_power_of_two_single_candidate() -> None:
    (only,) = pool(1)
    assert PowerOfTwoPolicy().select([only], req()) is only


# -- prefix_affinity ---------------------------------------------------------------------


def test_prefix_affinity_is_sticky_for_a_shared_prefix() -> None:
    policy = PrefixAffinityPolicy(block_chars=64, prefix_blocks=4)
    instances = pool(4)
    system = "You are a helpful assistant. " * 20  # longer than the 256-char window
    first = policy.select(instances, req(system + "question one"))
    for suffix in ["question two", "a much longer and completely different question " * 5]:
        assert policy.select(instances, req(system + suffix)) is first
    # The same choice from a fresh policy and a reordered pool: the hash is stable.
    again = PrefixAffinityPolicy(block_chars=64, prefix_blocks=4)
    assert again.select(list(reversed(instances)), req(system + "x")) is first


def test_prefix_affinity_spreads_distinct_prefixes() -> None:
    policy = PrefixAffinityPolicy()
    instances = pool(4)
    picks = Counter(id(policy.select(instances, req(p))) for p in random_prompts(2000))
    shares = [picks[id(i)] / 2000 for i in instances]
    assert all(0.15 < share < 0.35 for share in shares), shares


def test_prefix_affinity_uses_whole_leading_blocks() -> None:
    policy = PrefixAffinityPolicy(block_chars=10, prefix_blocks=2)
    # Only the first 2 whole blocks (20 chars) count.
    assert policy.prefix_key("a" * 20 + "tail one") == policy.prefix_key("a" * 20 + "other")
    assert policy.prefix_key("a" * 20) != policy.prefix_key("b" + "a" * 19)
    # Under two blocks: only whole blocks count, and under one block the whole prompt.
    assert policy.prefix_key("a" * 15) == policy.prefix_key("a" * 10 + "zzzzz")
    assert policy.prefix_key("short") != policy.prefix_key("shore")


def test_prefix_affinity_hashes_token_prompts_by_token_blocks() -> None:
    policy = PrefixAffinityPolicy(block_tokens=4, prefix_blocks=2)
    assert policy.prefix_key([1, 2, 3, 4, 5, 6, 7, 8, 9]) == policy.prefix_key(
        [1, 2, 3, 4, 5, 6, 7, 8, 100, 200]
    )
    assert policy.prefix_key([1, 2, 3, 4, 5, 6, 7, 8]) != policy.prefix_key([1, 2, 3, 4, 5, 6, 7])
    # Ids an array cannot hold still give a stable key instead of an exception.
    assert policy.prefix_key([2**70, 1]) == policy.prefix_key([2**70, 1])
    # Lone surrogates (valid in JSON strings) hash too.
    assert policy.prefix_key("\ud800abc") == policy.prefix_key("\ud800abc")


def test_prefix_affinity_bounds_the_load_of_a_hot_prefix() -> None:
    epsilon = 0.25
    policy = PrefixAffinityPolicy(epsilon=epsilon)
    instances = pool(4)
    hot = req("the same hot system prompt " * 30)
    preferred = policy.select(instances, hot)
    for total in range(1, 201):
        chosen = policy.select(instances, hot)
        chosen.in_flight_requests += 1
        bound = math.ceil((1 + epsilon) * total / len(instances))
        assert max(i.in_flight_requests for i in instances) <= bound
    # The preferred instance filled up to the bound before overflow went elsewhere.
    assert preferred.in_flight_requests == max(i.in_flight_requests for i in instances)
    assert min(i.in_flight_requests for i in instances) > 0


def test_prefix_affinity_overflow_then_returns_home() -> None:
    policy = PrefixAffinityPolicy(epsilon=0.0)
    instances = pool(3)
    hot = req("hot prefix " * 40)
    home = policy.select(instances, hot)
    home.in_flight_requests = 5
    overflow = policy.select(instances, hot)
    assert overflow is not home
    # Overflow goes to a stable next instance on the ring, not a random one.
    assert policy.select(instances, hot) is overflow
    home.in_flight_requests = 0
    assert policy.select(instances, hot) is home


def test_prefix_affinity_ignores_moderate_imbalance() -> None:
    policy = PrefixAffinityPolicy(epsilon=1.0)
    instances = pool(2)
    prompt = req("sticky " * 100)
    home = policy.select(instances, prompt)
    other = instances[1] if home is instances[0] else instances[0]
    home.in_flight_requests, other.in_flight_requests = 3, 1
    # capacity = ceil(2 x 5 / 2) = 5: home (3) still has room, so affinity wins.
    assert policy.capacity(instances) == 5
    assert policy.select(instances, prompt) is home


def _assignments(
    policy: PrefixAffinityPolicy, instances: list[Instance], prompts: list[str]
) -> list[str]:
    return [policy.select(instances, req(p)).url for p in prompts]


def test_ring_stability_when_an_instance_leaves() -> None:
    policy = PrefixAffinityPolicy()
    instances = pool(5)
    prompts = random_prompts(3000)
    before = _assignments(policy, instances, prompts)
    removed = instances[2]
    after = _assignments(policy, [i for i in instances if i is not removed], prompts)
    moved = [b != a for b, a in zip(before, after, strict=True)]
    # Exactly the removed instance's keys move; everyone else's stay put.
    assert all(b == removed.url for b, m in zip(before, moved, strict=True) if m)
    assert all(m for b, m in zip(before, moved, strict=True) if b == removed.url)
    assert 0.12 < sum(moved) / len(prompts) < 0.28  # ~1/5


def test_ring_stability_when_an_instance_joins() -> None:
    policy = PrefixAffinityPolicy()
    instances = pool(5)
    prompts = random_prompts(3000, seed=11)
    before = _assignments(policy, instances, prompts)
    newcomer = Instance(url="http://10.0.0.9:8200", role=Role.DECODE)
    after = _assignments(policy, [*instances, newcomer], prompts)
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == newcomer.url for _, a in moved)
    assert 0.10 < len(moved) / len(prompts) < 0.24  # ~1/6
    # Back to the old pool: the old assignment exactly (the ring depends only on members).
    assert _assignments(policy, instances, prompts) == before


def test_ring_is_rebuilt_only_when_membership_changes() -> None:
    policy = PrefixAffinityPolicy(virtual_nodes=10)
    instances = pool(3)
    policy.select(instances, req("a" * 300))
    ring = policy._last_ring
    policy.select(list(instances), req("b" * 300))
    assert policy._last_ring is ring
    policy.select(instances[:2], req("c" * 300))
    assert policy._last_ring is not ring
    assert len(policy._last_ring.points) == 20  # type: ignore[union-attr]
    policy.select(list(reversed(instances)), req("d" * 300))
    assert policy._last_ring is ring  # same members: the cached ring
    policy.forget(instances[0])
    assert all(instances[0].url not in members for members in policy._rings)


def test_hash_ring_points_per_instance() -> None:
    ring = HashRing.build(frozenset({"http://a", "http://b"}), virtual_nodes=50)
    assert len(ring.points) == 100
    assert ring.points == sorted(ring.points)
    assert Counter(ring.owners) == {0: 50, 1: 50}
    assert ring.start(ring.points[-1] + 1) == 0  # wraps around


# -- prefill_cost ------------------------------------------------------------------------


def test_prefill_cost_uses_the_prior_until_an_observation() -> None:
    policy = PrefillCostPolicy(prior_tokens_per_s=1000.0)
    a, b = pool(2, Role.PREFILL, 8100)
    a.queued_prompt_tokens, b.queued_prompt_tokens = 3000, 1000
    request = req(tokens=500, request_id="r1")
    assert policy.learned_rate(a) is None
    assert policy.predicted_finish_s(a, request) == pytest.approx(3.5)
    assert policy.predicted_finish_s(b, request) == pytest.approx(1.5)
    assert policy.select([a, b], request) is b


def test_prefill_cost_first_observation_replaces_the_prior() -> None:
    policy = PrefillCostPolicy(prior_tokens_per_s=1000.0, ewma_alpha=0.5)
    (a,) = pool(1, Role.PREFILL, 8100)
    request = req(tokens=800, request_id="r1")
    policy.select([a], request)
    policy.observe(a, request, 0.1)  # 8000 tok/s
    assert policy.learned_rate(a) == pytest.approx(8000.0)
    second = req(tokens=400, request_id="r2")
    policy.select([a], second)
    policy.observe(a, second, 0.1)  # 4000 tok/s sample -> EWMA halfway
    assert policy.learned_rate(a) == pytest.approx(6000.0)


def test_prefill_cost_counts_the_queue_ahead_at_dispatch() -> None:
    policy = PrefillCostPolicy()
    (a,) = pool(1, Role.PREFILL, 8100)
    a.queued_prompt_tokens = 1500  # work already sent there
    request = req(tokens=500, request_id="r1")
    policy.select([a], request)
    a.queued_prompt_tokens += 500  # what the proxy does after dispatch
    policy.observe(a, request, 1.0)  # 2000 tokens of work done in 1 s
    assert policy.learned_rate(a) == pytest.approx(2000.0)


def test_prefill_cost_learns_rates_and_prefers_the_faster_instance() -> None:
    true_rate = {"slow": 1000.0, "fast": 4000.0}
    slow = Instance(url="slow", role=Role.PREFILL)
    fast = Instance(url="fast", role=Role.PREFILL)
    policy = PrefillCostPolicy(prior_tokens_per_s=2000.0, ewma_alpha=0.3)
    rng = random.Random(5)
    # Sequential requests of random sizes; each leg takes (queue ahead + prompt) / true rate.
    for i in range(60):
        request = req(tokens=rng.randint(100, 2000), request_id=f"r{i}")
        chosen = policy.select([slow, fast], request)
        ahead = chosen.queued_prompt_tokens
        policy.observe(chosen, request, (ahead + request.prompt_tokens) / true_rate[chosen.url])
        # Force both instances to be measured at least once early on.
        if i == 0:
            other = fast if chosen is slow else slow
            policy.select([other], req(tokens=500, request_id="warm"))
            policy.observe(other, req(tokens=500, request_id="warm"), 500 / true_rate[other.url])
    assert policy.learned_rate(slow) == pytest.approx(1000.0, rel=0.01)
    assert policy.learned_rate(fast) == pytest.approx(4000.0, rel=0.01)
    # Idle pool: the fast one wins.
    assert policy.select([slow, fast], req(tokens=1000, request_id="x")) is fast
    # The fast one is 4x faster: it still wins with 2000 tokens queued (0.75 s vs 1.0 s)...
    fast.queued_prompt_tokens = 2000
    assert policy.select([slow, fast], req(tokens=1000, request_id="y")) is fast
    # ...but not with 4000 queued (1.25 s vs 1.0 s).
    fast.queued_prompt_tokens = 4000
    assert policy.select([slow, fast], req(tokens=1000, request_id="z")) is slow


def test_prefill_cost_spreads_concurrent_load_by_rate() -> None:
    slow = Instance(url="slow", role=Role.PREFILL)
    fast = Instance(url="fast", role=Role.PREFILL)
    policy = PrefillCostPolicy()
    for instance, rate in [(slow, 1000.0), (fast, 3000.0)]:
        warm = req(tokens=1000, request_id=f"warm-{instance.url}")
        policy.select([instance], warm)
        policy.observe(instance, warm, 1000 / rate)
    # 40 concurrent prompts of 100 tokens, none answered yet: the queues fill ~1:3.
    for i in range(40):
        chosen = policy.select([slow, fast], req(tokens=100, request_id=f"c{i}"))
        chosen.queued_prompt_tokens += 100
    assert fast.queued_prompt_tokens == 3000
    assert slow.queued_prompt_tokens == 1000


def test_prefill_cost_unmeasured_instance_assumes_the_measured_mean() -> None:
    policy = PrefillCostPolicy(prior_tokens_per_s=1_000_000.0)
    a, b, new = pool(3, Role.PREFILL, 8100)
    for instance, rate in [(a, 1000.0), (b, 3000.0)]:
        warm = req(tokens=1000, request_id=f"warm-{instance.url}")
        policy.select([instance], warm)
        policy.observe(instance, warm, 1000 / rate)
    request = req(tokens=1000, request_id="n")
    # Not the (huge) prior: the mean of what was measured, 2000 tok/s.
    assert policy.predicted_finish_s(new, request) == pytest.approx(0.5)


def test_prefill_cost_ignores_unusable_observations_and_forgets() -> None:
    policy = PrefillCostPolicy()
    (a,) = pool(1, Role.PREFILL, 8100)
    for elapsed in [0.0, -1.0, float("nan"), float("inf")]:
        policy.observe(a, req(tokens=100, request_id="bad"), elapsed)
    policy.observe(a, req(tokens=0, request_id="empty"), 0.5)
    assert policy.learned_rate(a) is None
    request = req(tokens=100, request_id="ok")
    policy.select([a], request)
    policy.observe(a, request, 0.05)
    assert policy.learned_rate(a) == pytest.approx(2000.0)
    policy.select([a], req(tokens=100, request_id="pending"))
    policy.forget(a)
    assert policy.learned_rate(a) is None
    assert not policy._pending


def test_prefill_cost_pending_dispatches_are_bounded() -> None:
    policy = PrefillCostPolicy()
    instances = pool(2, Role.PREFILL, 8100)
    for i in range(10_000):  # legs that failed and never reported
        policy.select(instances, req(tokens=10, request_id=f"lost-{i}"))
    assert len(policy._pending) <= 4096


def test_prefill_cost_retry_on_another_instance_reports_once() -> None:
    policy = PrefillCostPolicy()
    a, b = pool(2, Role.PREFILL, 8100)
    a.queued_prompt_tokens = 10_000
    request = req(tokens=1000, request_id="retry")
    first = policy.select([a, b], request)
    assert first is b
    # b failed; the proxy retries on a under the same request id.
    second = policy.select([a], request)
    assert second is a
    policy.observe(a, request, 11.0)  # 10000 ahead + 1000 in 11 s
    assert policy.learned_rate(a) == pytest.approx(1000.0)
    assert policy.learned_rate(b) is None
