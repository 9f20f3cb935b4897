"""The generated tiny model: deterministic, loadable by transformers, a tokenizer that splits."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from deploy.cli import CliError
from deploy.tiny_model import PRESETS, add_arguments, make_tiny_model, run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_writes_a_hf_llama_directory(model_dir: Path) -> None:
    names = {path.name for path in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["max_position_embeddings"] == 4096
    assert config["head_dim"] >= 32  # the CPU attention kernel's minimum
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA, like real Llamas


def test_is_deterministic(model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (model_dir / name).read_bytes(), name


def test_weights_match_the_config(model_dir: Path) -> None:
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        embed = weights.get_tensor("model.embed_tokens.weight")
        k_proj = weights.get_tensor("model.layers.0.self_attn.k_proj.weight")
    assert embed.shape == (config["vocab_size"], config["hidden_size"])
    assert k_proj.shape == (
        config["num_key_value_heads"] * config["head_dim"],
        config["hidden_size"],
    )
    assert f"model.layers.{config['num_hidden_layers'] - 1}.mlp.down_proj.weight" in names


def test_english_splits_into_many_tokens_and_round_trips(model_dir: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "Could you describe, in plain words, how a decode worker streams tokens back?"
    encoding = tokenizer.encode(text)
    assert encoding.ids[0] == tokenizer.token_to_id("<s>")
    assert len(encoding.ids) > len(text.split()) * 1.5
    assert tokenizer.decode(encoding.ids) == text
    assert tokenizer.token_to_id("<unk>") not in encoding.ids
    # Every id decodes to valid text, so random generations never break UTF-8.
    for token_id in range(tokenizer.get_vocab_size()):
        assert isinstance(tokenizer.decode([token_id], skip_special_tokens=False), str)


@pytest.mark.slow  # importing transformers takes ~25 s on this machine
def test_transformers_loads_tokenizer_and_chat_template(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<s><|user|>\nhello\n<|assistant|>\n"


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CliError, match="not empty"):
        run(_args(str(tmp_path)))
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_cli_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CliError, match="not a directory"):
        run(_args(str(target)))


def test_cli_writes_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_args(str(tmp_path / "m"))) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")


def test_small_preset_is_a_deeper_wider_gqa_llama(tmp_path: Path) -> None:
    assert run(_args(str(tmp_path / "small"), "--preset", "small")) == 0
    small = json.loads((tmp_path / "small" / "config.json").read_text())
    tiny = PRESETS["tiny"]
    assert small["num_hidden_layers"] > tiny.num_hidden_layers
    assert small["hidden_size"] > tiny.hidden_size
    assert small["intermediate_size"] > tiny.intermediate_size
    assert small["num_key_value_heads"] < small["num_attention_heads"]
    assert small["head_dim"] >= 32
    # Same tokenizer, so workloads and prompts carry over between the presets.
    assert (tmp_path / "small" / "tokenizer.json").read_bytes() == (
        make_tiny_model(tmp_path / "tiny") / "tokenizer.json"
    ).read_bytes()


def test_cli_refuses_an_unknown_preset(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args([str(tmp_path), "--preset", "huge"])
