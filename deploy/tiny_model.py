"""``pdserve make-tiny-model DIR``: a tiny random-weight Llama model with a real tokenizer.

Tests and the quickstart need a model vLLM can load without network access. This writes one in
HF format (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) in a few
seconds. Weights and tokenizer are deterministic, so two runs produce the same files and the
same greedy outputs.

The tokenizer is a small BPE trained on the built-in text below. Its vocabulary is small on
purpose: ordinary English splits into many tokens, so prompts span many KV blocks. It uses a
Metaspace pre-tokenizer (no byte fallback), so every token id decodes to valid text and random
generations never produce broken UTF-8.
"""

from __future__ import annotations

import argparse
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deploy.cli import CliError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
UNK_TOKEN = "<unk>"
PAD_TOKEN = "<pad>"

# Role markers are plain text, so a chat prompt is ordinary tokens the model attends to.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_TRAINING_TEXT = """
Prefill and decode are two phases of serving a large language model. The prefill phase reads the
whole prompt at once and writes the key and value cache for every token. The decode phase produces
one token at a time and reads that cache again and again. Prefill is bound by compute, decode is
bound by memory bandwidth, so running them on separate machines lets each pool be sized for its
own work. A proxy sends each request to a prefill worker first, then hands the cached blocks to a
decode worker, which streams the answer back to the client.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single
step. It was the best of times, it was the worst of times. Once upon a time there was a small
village at the edge of a great forest, where people grew wheat and kept bees and told stories in
the evening. The weather today is sunny with a light breeze from the west, and tomorrow it will
rain. Please write a short poem about the sea, the moon and the stars. What is the capital of
France? Paris is the capital of France, and Berlin is the capital of Germany. Explain how a
computer network sends data from one machine to another, step by step, in simple words.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024. Punctuation: , . ; : ! ? ' " ( ) [ ] { } - _ / @ #.
""".strip()


@dataclass(frozen=True)
class TinyModelShape:
    """Sizes of the generated model. The CPU attention kernel needs head_dim >= 32."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 4096
    # Larger than Llama's 0.02 so logits are peaked: greedy argmax then does not flip on the
    # tiny numeric differences between batch shapes, which keeps PD-vs-aggregated checks exact.
    initializer_range: float = 0.25
    seed: int = 1234


# "small": a Llama shape (GQA, 6 layers, 4x wider) in which prefill costs what it costs on real
# models: on one core of a 2-core x86 box a 512-token prefill took 38x one decode step at batch
# 8 (0.62 s vs 16 ms; `pdserve plan profile` measures it on yours). "tiny" keeps prefill nearly
# free, which is what functional tests want: fast engine starts and cheap requests.
PRESETS: dict[str, TinyModelShape] = {
    "tiny": TinyModelShape(),
    "small": TinyModelShape(
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def build_tokenizer(vocab_size: int) -> Tokenizer:
    """Train the BPE tokenizer on the built-in text (deterministic, no network)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    tokenizer = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        # Every printable ASCII character is in the vocabulary, so ASCII text never maps to <unk>.
        initial_alphabet=[*string.printable.strip(), "\u2581"],
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


def make_tiny_model(directory: Path, shape: TinyModelShape | None = None) -> Path:
    """Write the tiny model and tokenizer into ``directory`` (created if needed); return it."""
    import torch
    from safetensors.torch import save_file

    shape = shape or TinyModelShape()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(shape.vocab_size)
    tokenizer.save(str(directory / "tokenizer.json"))
    vocab_size: int = tokenizer.get_vocab_size()
    token_id = tokenizer.token_to_id
    bos_id, eos_id, pad_id = token_id(BOS_TOKEN), token_id(EOS_TOKEN), token_id(PAD_TOKEN)

    head_dim = shape.hidden_size // shape.num_attention_heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": shape.initializer_range,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "torch_dtype": "float32",
    }
    _write_json(directory / "config.json", config)
    _write_json(
        directory / "generation_config.json",
        {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
    )
    _write_json(
        directory / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": UNK_TOKEN,
            "pad_token": PAD_TOKEN,
            "add_bos_token": True,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": shape.max_position_embeddings,
            "chat_template": CHAT_TEMPLATE,
        },
    )
    _write_json(
        directory / "special_tokens_map.json",
        {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": UNK_TOKEN,
            "pad_token": PAD_TOKEN,
        },
    )

    generator = torch.Generator().manual_seed(shape.seed)
    save_file(
        _random_llama_weights(shape, vocab_size, head_dim, generator),
        directory / "model.safetensors",
    )
    return directory


def _random_llama_weights(
    shape: TinyModelShape, vocab_size: int, head_dim: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    import torch

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=generator) * shape.initializer_range

    hidden, inter = shape.hidden_size, shape.intermediate_size
    q_out = shape.num_attention_heads * head_dim
    kv_out = shape.num_key_value_heads * head_dim
    weights: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(vocab_size, hidden),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": normal(vocab_size, hidden),
    }
    for layer in range(shape.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        weights |= {
            f"{prefix}.input_layernorm.weight": torch.ones(hidden),
            f"{prefix}.post_attention_layernorm.weight": torch.ones(hidden),
            f"{prefix}.self_attn.q_proj.weight": normal(q_out, hidden),
            f"{prefix}.self_attn.k_proj.weight": normal(kv_out, hidden),
            f"{prefix}.self_attn.v_proj.weight": normal(kv_out, hidden),
            f"{prefix}.self_attn.o_proj.weight": normal(hidden, q_out),
            f"{prefix}.mlp.gate_proj.weight": normal(inter, hidden),
            f"{prefix}.mlp.up_proj.weight": normal(inter, hidden),
            f"{prefix}.mlp.down_proj.weight": normal(hidden, inter),
        }
    return {name: tensor.contiguous() for name, tensor in weights.items()}


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def add_model_arguments(parser: argparse.ArgumentParser, default_preset: str) -> None:
    """``--model DIR`` or a generated ``--preset``: for the commands that start engines."""
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local HF model directory (default: the generated --preset model)",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=default_preset,
        help=f"the generated model when --model is not given (default {default_preset})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "directory", type=Path, help="where to write the model (created if missing)"
    )
    parser.add_argument(
        "--force", action="store_true", help="overwrite a directory that already holds files"
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tiny",
        help="tiny (default: 2 layers, prefill nearly free) or small (6 layers, GQA, a "
        "512-token prefill costs tens of decode steps, as on real models)",
    )


def run(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if directory.exists() and not directory.is_dir():
        raise CliError(f"directory: {directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not args.force:
        raise CliError(f"directory: {directory} is not empty (pass --force to overwrite)")
    try:
        path = make_tiny_model(directory, PRESETS[args.preset])
    except OSError as exc:
        raise CliError(f"directory: cannot write {directory}: {exc.strerror or exc}") from exc
    print(path)
    return 0


if __name__ == "__main__":
    import sys

    _parser = argparse.ArgumentParser(prog="pdserve make-tiny-model")
    add_arguments(_parser)
    try:
        sys.exit(run(_parser.parse_args()))
    except CliError as _exc:
        print(f"pdserve make-tiny-model: {_exc}", file=sys.stderr)
        sys.exit(2)
