"""Proxy configuration: one pydantic model per section, unknown keys refused."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.registry import normalise_url, parse_kv_events

MIB = 1024 * 1024


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicySpec(_Strict):
    """A routing policy by name (``proxy.routing.<name>`` or a dotted module) and its options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class TimeoutConfig(_Strict):
    """Per-stage deadlines of one proxied request, in seconds."""

    connect_s: float = Field(default=2.0, gt=0)
    # Whole prefill round trip (the prompt's forward pass on the prefill instance).
    prefill_s: float = Field(default=300.0, gt=0)
    # Decode leg sent -> first body byte (for non-stream requests: the whole response).
    first_byte_s: float = Field(default=300.0, gt=0)
    # Longest silence between two chunks of a streamed decode response.
    stall_s: float = Field(default=120.0, gt=0)


class RetryConfig(_Strict):
    """Moving a request to another decode instance when its decode leg fails: before the
    client has a byte (connect failure, reset, first-byte timeout, a 5xx answer), or
    mid-stream (reset, stall) when ``mid_stream`` is on. Each move runs a fresh prefill
    leg: a prefill's KV handoff is only ever offered to one decode instance."""

    # Decode attempts in all, the first included (1: never move a request). Each one can
    # cost a prefill leg, so the bound keeps a broken decode pool from multiplying load.
    decode_attempts: int = Field(default=3, ge=1, le=16)
    # Wait before the first move, doubled for each further one up to backoff_max_s: an
    # instance that just refused may be restarting, and a burst of moves should not all
    # land on the survivors at once.
    backoff_s: float = Field(default=0.05, ge=0)
    backoff_max_s: float = Field(default=1.0, ge=0)
    # A request's whole budget from its arrival: no attempt (prefill or decode) starts
    # after it, and each attempt's prefill and first-byte deadlines are cut to what is
    # left. The default is timeouts.prefill_s + timeouts.first_byte_s, so a first attempt
    # keeps the stage deadlines it had before moves existed. A stream that broke after
    # new tokens reached the client gets the budget afresh from the break: it bounds
    # waiting for an answer, not how long a long answer takes to generate.
    deadline_s: float = Field(default=600.0, gt=0)
    # Continue a stream whose decode instance died or stalled after the client had bytes
    # on another decode instance, from the tokens already sent (the client sees one
    # stream). Decode legs of continuable streams then ask vLLM for token ids, which the
    # proxy removes again before the client sees them; off, a break mid-stream ends the
    # stream with an SSE error event and the relay does no per-chunk work at all.
    mid_stream: bool = True

    @model_validator(mode="after")
    def _backoff_bounds(self) -> RetryConfig:
        if self.backoff_max_s < self.backoff_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s:g}) is below backoff_s ({self.backoff_s:g})"
            )
        return self


class HealthConfig(_Strict):
    """Active health checks: ``GET <instance>/health`` every ``interval_s``."""

    interval_s: float = Field(default=2.0, gt=0)
    timeout_s: float = Field(default=2.0, gt=0)
    failures_to_eject: int = Field(default=3, ge=1)
    successes_to_readmit: int = Field(default=2, ge=1)


class AdminConfig(_Strict):
    """The admin API listener. ``port: null`` serves it on the public listener, but only
    when a token is set; with neither a port nor a token the admin API is off."""

    host: str = "127.0.0.1"
    port: int | None = Field(default=8001, ge=0, le=65535)
    token: str | None = None


class KVEventsSubscribeConfig(_Strict):
    """The proxy's subscription to its instances' KV cache events (``proxy/kv_events.py``),
    kept in an index of which prefix blocks each instance holds (read by the ``kv_cache``
    routing policy).

    Memory is bounded: about 127 bytes per indexed block, at most
    ``max_blocks_per_instance * max_instances`` blocks (about 2.1 GB at the defaults; real
    use is the engines' own block counts), plus per instance at most
    ``receive_queue_batches`` queued messages of at most ``max_message_bytes`` (128 MiB at
    the defaults; a step's batch is a few KiB)."""

    subscribe: bool = True
    # A bound above any engine's block count: blocks beyond it are dropped oldest first.
    max_blocks_per_instance: int = Field(default=262_144, ge=1)
    # Instances beyond this are not indexed (logged once).
    max_instances: int = Field(default=64, ge=1)
    # The engines' hash block size; stored events of another size are ignored. null: any.
    block_size: int | None = Field(default=None, ge=1)
    # ZMQ RCVHWM of each subscription: messages beyond it are dropped (a gap, replayed).
    receive_queue_batches: int = Field(default=128, ge=1)
    # ZMQ MAXMSGSIZE: one batch of a large prefill is well under 1 MiB.
    max_message_bytes: int = Field(default=1 * MIB, ge=1024)
    # A subscription yields the event loop after this many batches, so a flood cannot
    # starve request handling.
    max_batches_per_turn: int = Field(default=64, ge=1)
    # A replay silent this long is given up (the gap is resynced) ...
    replay_timeout_s: float = Field(default=2.0, gt=0)
    # ... and the instance's gaps are resynced without asking for this long.
    replay_backoff_s: float = Field(default=30.0, ge=0)
    # How often new instances are subscribed to and re-admitted ones reset.
    sync_interval_s: float = Field(default=1.0, gt=0)


class RoutingTokenizerConfig(_Strict):
    """The model's own tokenizer in the proxy (``proxy/tokenizer.py``), for routing only: a
    policy that routes on the engines' prefix caches (``kv_cache``) needs each prompt's
    block hashes, hence its token ids exactly as the engine computes them. Loaded with
    ``transformers.AutoTokenizer`` from a local HF model directory, never from the network;
    prompts are tokenized in a pool of ``workers`` threads, off the event loop, and only
    while such a policy is configured. The legs send the client's request as is unless
    ``send_token_ids`` says otherwise."""

    # The HF model directory the engines serve (tokenizer.json, tokenizer_config.json and
    # its chat template): the same files, or the ids will not match the engines'.
    model_dir: Path
    workers: int = Field(default=2, ge=1, le=64)
    # The engines' PYTHONHASHSEED, which seeds vLLM's block hashes. null: unset, as pdserve's
    # worker launch leaves it (vLLM then seeds sha256 hashes with "vllm-none-hash").
    engine_pythonhashseed: str | None = None
    # Completions with one text prompt: both legs carry the proxy's token ids, so the engines
    # do not tokenize it again. Off by default: the proxy's tokenizer then decides what the
    # model reads, so model_dir must be the engines' own. Never for chat (vLLM's chat API
    # takes no token ids) nor for echo (the engine would echo the ids' text).
    send_token_ids: bool = False


class InstanceEntry(_Strict):
    """A static instance with more than its URL: ``{url: ..., kv_events: {endpoint: ...,
    replay_endpoint: ...}}`` (the admin API's registration fields; a plain URL string is the
    same entry without ``kv_events``)."""

    url: str
    # Where the instance publishes vLLM's KV cache events: tcp:// on the URL's own host.
    kv_events: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _normalise(self) -> Self:
        self.url = normalise_url(self.url)
        if self.kv_events is not None:
            self.kv_events = parse_kv_events(self.kv_events, self.url).to_json()
        return self

    @classmethod
    def of(cls, item: str | InstanceEntry) -> InstanceEntry:
        return cls(url=item) if isinstance(item, str) else item


def _entry_kind(value: Any) -> str:
    return "url" if isinstance(value, str) else "entry"


# A plain URL string or an InstanceEntry mapping. Tagged, so that a bad mapping is reported
# once, as an entry, rather than also as "not a valid string".
StaticInstance = Annotated[
    Annotated[str, Tag("url")] | Annotated[InstanceEntry, Tag("entry")],
    Discriminator(_entry_kind),
]


class PrefillBypassConfig(_Strict):
    """The cache-aware PD decision: the decode instance is chosen first, by the decode pool's
    cache-aware policy (``kv_cache``), and when its own prefix cache holds all of the prompt
    but at most ``max_uncached_tokens`` tokens, the prefill leg is skipped: that decode
    serves the request whole (path ``cache_bypass``). Otherwise the prefill leg runs and
    the decode leg goes to the instance chosen first."""

    # The uncached tail a decode instance computes itself rather than pull: about what it
    # computes in one engine step without hurting its other requests' inter-token latency.
    max_uncached_tokens: int = Field(default=256, ge=0)


class CacheCheckConfig(_Strict):
    """How the proxy checks its prefix-cache predictions against the engines' own figures
    (``proxy/hit_check.py``): per instance, over the last ``window`` requests where either
    side saw a hit, the predicted and observed hit tokens must agree to ``min_agreement``
    (1 - sum|predicted - observed| / sum max(predicted, observed)); an instance that does
    not is routed on load alone until it does again."""

    enabled: bool = True
    window: int = Field(default=16, ge=1, le=4096)
    min_agreement: float = Field(default=0.5, ge=0.0, le=1.0)


class ProxyConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # Static instances: URL strings, or {url, kv_events} entries (see InstanceEntry).
    prefill: list[StaticInstance] = Field(default_factory=list)
    decode: list[StaticInstance] = Field(default_factory=list)
    prefill_policy: PolicySpec = Field(default_factory=lambda: PolicySpec(name="prefill_cost"))
    decode_policy: PolicySpec = Field(default_factory=lambda: PolicySpec(name="least_load"))
    # Prompts with fewer (estimated) tokens skip the prefill leg and go straight to decode.
    disagg_min_prompt_tokens: int = Field(default=0, ge=0)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    retries: RetryConfig = Field(default_factory=RetryConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    # Idle upstream connections are closed before vLLM's own 5 s keep-alive does it,
    # so the proxy never writes a request onto a socket the worker is closing.
    upstream_keepalive_s: float = Field(default=4.0, gt=0)
    # At most this many connections to one instance; further requests queue (FIFO) for
    # one within their stage deadline. Health checks are not held back by the cap.
    upstream_max_connections_per_instance: int = Field(default=256, ge=1)
    max_body_bytes: int = Field(default=8 * MIB, gt=0)
    # Subscribing to the instances' KV cache events (see KVEventsSubscribeConfig).
    kv_events: KVEventsSubscribeConfig = Field(default_factory=KVEventsSubscribeConfig)
    # The model's tokenizer for cache-aware routing (see RoutingTokenizerConfig); null: off.
    routing_tokenizer: RoutingTokenizerConfig | None = None
    # Skip the prefill leg when the chosen decode instance caches the prompt (see
    # PrefillBypassConfig); null: off. Needs a cache-aware decode policy (kv_cache).
    prefill_bypass: PrefillBypassConfig | None = None
    # Predicted vs observed prefix-cache hits of cache-aware routing (see CacheCheckConfig).
    cache_check: CacheCheckConfig = Field(default_factory=CacheCheckConfig)
    # The KV transfer's shared secret, to release prefill blocks no decode leg will read.
    # Read from this file (mode 0600), else from $PDSERVE_KV_SECRET; never from the command line.
    kv_secret_file: Path | None = None

    def kv_secret(self) -> bytes:
        """The secret the workers authenticate KV peers with (empty if none is configured):
        ``kv_secret_file`` (mode 0600), else $PDSERVE_KV_SECRET or $PDSERVE_KV_SECRET_FILE."""
        from kv_transfer.config import SecretError, read_secret

        try:
            secret = read_secret(
                None, self.kv_secret_file, names=("proxy.kv_secret", "proxy.kv_secret_file")
            )
        except SecretError as exc:
            raise ValueError(str(exc)) from None
        return secret.encode()

    @field_validator("prefill", "decode")
    @classmethod
    def _normalise_urls(cls, items: list[str | InstanceEntry]) -> list[str | InstanceEntry]:
        return [normalise_url(item) if isinstance(item, str) else item for item in items]


def load_proxy_config(path: str | Path) -> ProxyConfig:
    """Read a YAML file; a document with a ``proxy:`` key (a topology file) yields that section.

    Raises ValueError with a one-line message naming the file and the bad field.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    section = document.get("proxy", document)
    if section is None:
        section = {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: proxy: expected a mapping")
    try:
        return ProxyConfig.model_validate(section)
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    """The first error as ``dotted.field: message`` (one line, for the CLI), plus how many more."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{where}: {message}{more}"
