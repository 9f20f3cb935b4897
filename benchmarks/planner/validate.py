"""``pdserve plan validate``: the simulator's predictions against a measured ``bench pd`` run.

For each measured PD (1P1D) and 2-aggregated run at the chosen rates, the simulator replays
the run as it happened: the same requests in the same order, sent at the same moments
(``pdserve bench pd`` records both), on a fleet built from a ``pdserve plan profile`` of
one engine. The table sets predicted against measured TTFT and TPOT p50 and p90, with the
relative error of each.

What the simulator does not model shows up here, and the report says which term it is:
prefix caching is approximated by taking the shared prefix's whole blocks off the prompts
that carry it (every instance has the system prompt cached after its first request), and
the proxy and the load generator's own CPU time, which shares the two cores with the engines
in the measured runs, is not in the profile (``--proxy-overhead-ms`` in ``plan profile``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.pd_vs_aggregated import rate_list
from deploy.cli import CliError

DEFAULT_BENCH = Path("benchmarks/results/pd_vs_aggregated.json")
DEFAULT_OUT = Path("benchmarks/results/plan_validation.json")
DEPLOYMENTS = {"pd": (1, 1), "aggregated": (0, 2)}  # setup -> (prefill, decode) instances
METRICS = (("ttft", "p50"), ("ttft", "p90"), ("tpot", "p50"), ("tpot", "p90"))


def default_rates(runs: Sequence[dict[str, Any]]) -> list[float]:
    """The three lowest rates both setups were measured at (below saturation, where a
    prediction means something)."""
    both = sorted(
        {r["rate"] for r in runs if r["setup"] == "pd"}
        & {r["rate"] for r in runs if r["setup"] == "aggregated"}
    )
    return both[:3]


def replay(run: dict[str, Any], block_size: int) -> tuple[list[Any], list[float]]:
    """The run's requests (prefix-cached blocks taken off) and arrival times."""
    from benchmarks.workload import WorkloadRequest

    requests = []
    for prompt, output, shared in run["requests"]:
        cached = (shared // block_size) * block_size
        requests.append(WorkloadRequest(max(1, prompt - cached), output, 0))
    return requests, list(run["arrivals_s"])


def compare(run: dict[str, Any], predicted: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"setup": run["setup"], "rate": run["rate"], "metrics": {}}
    for metric, quantile in METRICS:
        measured = float(run[f"{metric}_ms"][quantile])
        value = getattr(getattr(predicted, metric), quantile) * 1000.0
        error = value / measured - 1.0 if measured > 0 else None
        row["metrics"][f"{metric}_{quantile}"] = {
            "measured_ms": measured,
            "predicted_ms": value,
            "error": error,
        }
    return row


def validate(
    profile_path: Path, bench: dict[str, Any], rates: Sequence[float]
) -> list[dict[str, Any]]:
    from benchmarks.planner.profile_model import load_step_model
    from benchmarks.planner.simulate import Deployment, InstanceModel, simulate

    profile, step = load_step_model(profile_path)
    model = InstanceModel.from_profile(profile, step)
    rows = []
    for run in bench["runs"]:
        if run["setup"] not in DEPLOYMENTS or run["rate"] not in rates:
            continue
        if not run.get("arrivals_s") or not run.get("requests"):
            raise CliError(
                f"{run['setup']} at {run['rate']:g} req/s: the report has no per-request "
                "record (re-run pdserve bench pd)"
            )
        prefill, decode = DEPLOYMENTS[run["setup"]]
        deployment = Deployment.pd(prefill, decode) if prefill else Deployment.aggregated(decode)
        requests, arrivals = replay(run, profile.block_size)
        rows.append(compare(run, simulate(model, deployment, requests, arrivals)))
    return rows


def format_table(rows: Sequence[dict[str, Any]], tolerance: float) -> str:
    header = f"{'setup':<11} {'rate':>5} " + " ".join(
        f"{metric + ' ' + q:>22}" for metric, q in METRICS
    )
    lines = [
        "predicted / measured ms (relative error)",
        header,
        "-" * len(header),
    ]
    for row in sorted(rows, key=lambda r: (r["rate"], r["setup"])):
        cells = []
        for metric, quantile in METRICS:
            cell = row["metrics"][f"{metric}_{quantile}"]
            error = cell["error"]
            mark = "" if error is not None and abs(error) <= tolerance else "*"
            text = f"{cell['predicted_ms']:.0f}/{cell['measured_ms']:.0f}"
            text += f" ({error:+.0%}){mark}" if error is not None else " (-)"
            cells.append(f"{text:>22}")
        lines.append(f"{row['setup']:<11} {row['rate']:>5g} " + " ".join(cells))
    within = sum(
        1
        for row in rows
        for cell in row["metrics"].values()
        if cell["error"] is not None and abs(cell["error"]) <= tolerance
    )
    total = sum(len(row["metrics"]) for row in rows)
    lines.append(f"\n{within} of {total} within {tolerance:.0%} (* marks the others)")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", type=Path, required=True, metavar="FILE",
                        help="profile JSON from `pdserve plan profile`")  # fmt: skip
    parser.add_argument("--bench", type=Path, default=DEFAULT_BENCH, metavar="FILE",
                        help=f"`pdserve bench pd` report (default {DEFAULT_BENCH})")  # fmt: skip
    parser.add_argument("--rates", type=rate_list, default=None,
                        help="measured rates to replay (default: the three lowest)")  # fmt: skip
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="relative error counted as a match (default 0.15)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")


def run(args: argparse.Namespace) -> int:
    from benchmarks.planner.profile_model import ProfileError

    try:
        bench = json.loads(args.bench.read_text())
        runs = bench["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"--bench: cannot read a bench pd report from {args.bench}: {exc}") from None
    rates = args.rates or default_rates(runs)
    if not rates:
        raise CliError("--bench: no rate was measured for both pd and aggregated")
    try:
        rows = validate(args.profile, bench, rates)
    except ProfileError as exc:
        raise CliError(f"--profile: {exc}") from None
    if not rows:
        raise CliError(f"--rates: none of {rates} was measured in {args.bench}")
    print(format_table(rows, args.tolerance))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"profile": str(args.profile), "bench": str(args.bench),
                    "tolerance": args.tolerance, "rows": rows}, indent=2) + "\n"
    )  # fmt: skip
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
