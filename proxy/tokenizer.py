"""The model's own tokenizer in the proxy, for cache-aware routing: a prompt's token ids (and
from them its prefix-cache block keys) exactly as a vLLM 0.32 engine computes them.

Only built when the config names ``routing_tokenizer`` and only used for requests routed
by a policy that sets ``needs_kv_index`` (``kv_cache``): the default request path never
tokenizes. The legs send the client's request as is (text or messages), unless
``send_token_ids`` is on: then a completions text prompt travels to the engines as the ids
computed here (``PromptKeys.token_ids``), and they skip their own tokenization.

How vLLM 0.32 tokenizes, mirrored here (``vllm/renderers/base.py`` ``_tokenize_prompt``,
``vllm/renderers/hf.py`` ``safe_apply_chat_template``, the request models in
``vllm/entrypoints/openai/*/protocol.py``):

* ``/v1/completions`` text: ``tokenizer(text, add_special_tokens=...)["input_ids"]`` with the
  request's ``add_special_tokens`` (default true: BOS added). Token-id prompts are used as
  given. A batch of prompts is routed on its first, as everywhere in the proxy.
* ``/v1/chat/completions``: ``tokenizer.apply_chat_template(messages, tokenize=True,
  return_dict=False, add_generation_prompt=..., continue_final_message=...)`` with the
  request's values (defaults true and false) and its ``chat_template_kwargs``; the chat
  template adds the special tokens (vLLM's chat ``add_special_tokens`` defaults to false and
  does not apply to template-tokenized prompts). Content given as a list of text parts is
  joined with newlines, as vLLM's "string" content format does.

Requests whose ids the proxy cannot reproduce get no keys and are routed on load alone:
multimodal content, ``tools``, ``documents``, a request ``chat_template``,
``reasoning_effort``, ``truncate_prompt_tokens``, ``prompt_embeds``. So are all requests if
the engines run with ``--chat-template`` (the proxy renders with the model directory's own
template) or serve a LoRA adapter.

HF fast tokenizers release the GIL while encoding, so a pool of threads tokenizes a long
prompt while the event loop goes on serving other requests. A failure (the tokenizer cannot
be loaded, a prompt it refuses) is logged once; the request is routed on load alone and
never fails because of the tokenizer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Histogram

from proxy.block_hashes import HashSettings, block_keys
from proxy.request import ClientRequest, Endpoint

log = logging.getLogger(__name__)

TOKENIZE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
)  # fmt: skip

# Chat request fields that change the rendered prompt in ways the proxy does not mirror.
_UNMIRRORED_CHAT_FIELDS = ("tools", "documents", "chat_template", "reasoning_effort")
# apply_chat_template's own parameters: never taken from a client's chat_template_kwargs.
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation", "tools", "documents", "chat_template", "tokenize", "return_dict",
        "padding", "truncation", "max_length", "return_tensors", "return_assistant_tokens_mask",
        "tokenizer_kwargs", "add_generation_prompt", "continue_final_message",
    }
)  # fmt: skip


class Unsupported(Exception):
    """The request's ids cannot be reproduced in the proxy: it is routed on load alone."""


@dataclass(frozen=True, slots=True)
class PromptKeys:
    """A prompt as the engine sees it: its length in tokens and its block keys."""

    prompt_tokens: int
    block_keys: list[int]
    # The ids of a completions prompt the proxy tokenized itself (None for a token-id prompt
    # and for chat), which the legs may carry instead of its text.
    token_ids: list[int] | None = None


class RoutingTokenizer:
    """Tokenizes prompts in a bounded thread pool; see the module docstring."""

    def __init__(
        self,
        model_dir: Path | str | None,
        workers: int = 2,
        registry: CollectorRegistry | None = None,
    ) -> None:
        # None: no tokenizer, only token-id prompts get block keys.
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="pdserve-tokenize"
        )
        self._tokenizer: Any = None
        self._load_failed = False
        self._failure_logged = False
        self.seconds = Histogram(
            "pdserve_routing_tokenize_seconds",
            "Per request routed by a cache-aware policy: waiting for and running the proxy's "
            "tokenization of the prompt and the hashing of its blocks (in the tokenizer "
            "pool, off the event loop).",
            buckets=TOKENIZE_BUCKETS,
            registry=registry,
        )

    @property
    def loaded(self) -> bool:
        return self._tokenizer is not None

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the tokenizer in the pool; a failure is logged and leaves routing load-only."""
        if self._tokenizer is not None or self._load_failed or self.model_dir is None:
            return
        loop = asyncio.get_running_loop()
        try:
            self._tokenizer = await loop.run_in_executor(self._executor, self._load)
        except Exception as exc:
            self._load_failed = True
            log.error(
                "routing_tokenizer: cannot load a tokenizer from %s (%s: %s); cache-aware "
                "routing falls back to load only",
                self.model_dir, type(exc).__name__, exc,
            )  # fmt: skip
            return
        log.info("routing_tokenizer: loaded %s", self.model_dir)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> Any:
        from transformers import AutoTokenizer  # seconds to import: only when configured

        if self.model_dir is None:
            raise ValueError("no routing_tokenizer.model_dir configured")
        return AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)

    def load_now(self) -> None:
        """Load in the calling thread (for tests and tools; the proxy uses ``start``)."""
        if self._tokenizer is None:
            self._tokenizer = self._load()

    # -- per request ----------------------------------------------------------------------

    async def prompt_keys(self, req: ClientRequest, settings: HashSettings) -> PromptKeys | None:
        """The request's block keys under ``settings``, computed in the pool; None when
        they cannot be (routed on load alone, never an error for the request)."""
        if isinstance(req.prompt, str) and self._tokenizer is None:
            return None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, self.keys_sync, req, settings)
        except Unsupported as exc:
            log.debug("no block keys for this request (%s): routed on load", exc)
            return None
        except Exception as exc:
            if not self._failure_logged:
                self._failure_logged = True
                log.warning(
                    "routing_tokenizer: tokenizing a prompt failed (%s: %s); such requests "
                    "are routed on load alone (logged once)",
                    type(exc).__name__, exc,
                )  # fmt: skip
            return None
        finally:
            self.seconds.observe(time.perf_counter() - started)

    def keys_sync(self, req: ClientRequest, settings: HashSettings) -> PromptKeys:
        """Token ids and block keys of ``req`` (runs in a pool thread)."""
        ids = self.prompt_ids(req)
        salt = req.body.get("cache_salt")
        if salt is not None and not isinstance(salt, str):
            raise Unsupported("cache_salt is not a string")
        tokenized = req.endpoint is Endpoint.COMPLETIONS and isinstance(req.prompt, str)
        return PromptKeys(
            len(ids), block_keys(ids, settings, cache_salt=salt), ids if tokenized else None
        )

    def prompt_ids(self, req: ClientRequest) -> list[int]:
        """The ids the engine computes for ``req``'s (first) prompt; raises Unsupported."""
        body = req.body
        if "prompt_embeds" in body or body.get("truncate_prompt_tokens") is not None:
            raise Unsupported("prompt_embeds or truncate_prompt_tokens")
        if req.endpoint is Endpoint.COMPLETIONS:
            if isinstance(req.prompt, list):
                return req.prompt  # token ids, used as given
            return self.encode_completion(req.prompt, body.get("add_special_tokens", True))
        for field in _UNMIRRORED_CHAT_FIELDS:
            if body.get(field) is not None:
                raise Unsupported(f"chat field {field!r}")
        return self.encode_chat(
            body["messages"],
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
            chat_template_kwargs=body.get("chat_template_kwargs"),
        )

    def encode_completion(self, text: str, add_special_tokens: object = True) -> list[int]:
        if not isinstance(add_special_tokens, bool):
            raise Unsupported("add_special_tokens is not a boolean")
        tokenizer = self._require()
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def encode_chat(
        self,
        messages: list[Any],
        *,
        add_generation_prompt: object = True,
        continue_final_message: object = False,
        chat_template_kwargs: object = None,
    ) -> list[int]:
        if not isinstance(add_generation_prompt, bool) or not isinstance(
            continue_final_message, bool
        ):
            raise Unsupported("add_generation_prompt / continue_final_message not booleans")
        extra: dict[str, Any] = {}
        if chat_template_kwargs is not None:
            if not isinstance(chat_template_kwargs, Mapping):
                raise Unsupported("chat_template_kwargs is not an object")
            extra = {
                str(key): value
                for key, value in chat_template_kwargs.items()
                if key not in _RESERVED_TEMPLATE_KWARGS
            }
        tokenizer = self._require()
        ids = tokenizer.apply_chat_template(
            _conversation(messages),
            tokenize=True,
            return_dict=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **extra,
        )
        return [int(token) for token in ids]

    def _require(self) -> Any:
        if self._tokenizer is None:
            raise Unsupported("no tokenizer loaded")
        return self._tokenizer


def _conversation(messages: list[Any]) -> list[dict[str, Any]]:
    """The messages as vLLM hands them to a chat template: list content joined to a string."""
    conversation: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise Unsupported("a message is not an object")
        content = message.get("content")
        if isinstance(content, list):
            texts: list[str] = []
            for part in content:
                if isinstance(part, str):
                    texts.append(part)
                elif (
                    isinstance(part, dict)
                    and part.get("type", "text") == "text"
                    and isinstance(part.get("text"), str)
                ):
                    texts.append(part["text"])
                else:
                    raise Unsupported("non-text message content")
            message = {**message, "content": "\n".join(texts)}
        elif content is not None and not isinstance(content, str):
            raise Unsupported("message content is neither a string nor a list of parts")
        conversation.append(message)
    return conversation
