"""``pdserve plan ACTION [options]``: profile a model, simulate a fleet, recommend a P:D split.

``pdserve plan profile`` measures one engine's step latencies into a profile file;
``pdserve plan simulate`` replays a workload on a simulated fleet built from that profile
(:mod:`benchmarks.planner.simulate`): latency percentiles at given request rates, the
goodput of one deployment under an SLO, or the goodput of every P:D split of N instances.
Each action's module is imported only when it runs; ``pdserve plan ACTION --help`` lists
its options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.workload import WorkloadError, add_workload_arguments, summary, workload_from_args
from deploy.cli import CliError

if TYPE_CHECKING:
    from benchmarks.planner.profile_model import Profile, StepModel
    from benchmarks.planner.simulate import (
        Deployment,
        GoodputResult,
        InstanceModel,
        Routing,
        SimulationResult,
        Slo,
    )
    from benchmarks.workload import WorkloadRequest

# action -> (module with add_arguments/run, one-line help)
ACTIONS: dict[str, tuple[str, str]] = {
    "profile": ("benchmarks.planner.profile", "measure one engine's step latencies into a profile"),
    "simulate": (
        "benchmarks.planner.cli",
        "simulate a fleet from a profile: latency at rates, goodput, or the best P:D split",
    ),
    "overhead": (
        "benchmarks.planner.decode_overhead",
        "a decode step's cost inside 1P1D, term by term: neighbour, handoff, proxy",
    ),
    "validate": (
        "benchmarks.planner.validate",
        "replay a measured `pdserve bench pd` run in the simulator: predicted vs measured",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    listing = "\n".join(f"  {name:<9} {help_text}" for name, (_, help_text) in ACTIONS.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = f"actions:\n{listing}\n\n`pdserve plan ACTION --help` lists its options."
    parser.add_argument("action", choices=sorted(ACTIONS), metavar="ACTION", help="action")
    # Everything after ACTION belongs to the action's own parser, built in run().
    parser.add_argument("action_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    action: str = args.action
    module_name, help_text = ACTIONS[action]
    parser = argparse.ArgumentParser(prog=f"pdserve plan {action}", description=help_text)
    if action == "simulate":
        # Simulate lives here; only its heavy imports (numpy, the proxy) wait for run.
        add_simulate_arguments(parser)
        return run_simulate(parser.parse_args(args.action_args))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise CliError(
                f"`plan {action}` is not available yet: no module {module_name}"
            ) from None
        raise CliError(f"`plan {action}` cannot start: {exc}") from None
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.action_args)) or 0)


# -- pdserve plan simulate --------------------------------------------------------------------


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile", type=Path, required=True, metavar="FILE",
        help="profile JSON written by `pdserve plan profile`",
    )  # fmt: skip
    fleet = parser.add_argument_group(
        "deployment", "--prefill X --decode Y (xPyD behind the proxy) or --aggregated N"
    )
    fleet.add_argument("--prefill", type=int, metavar="X", help="prefill instances")
    fleet.add_argument("--decode", type=int, metavar="Y", help="decode instances")
    fleet.add_argument("--aggregated", type=int, metavar="N", help="aggregated instances")
    mode = parser.add_argument_group("what to compute (one of)")
    mode.add_argument(
        "--rate", metavar="R[,R2...]",
        help="request rates (requests/s, Poisson; 'inf' sends all at once): latency at each",
    )  # fmt: skip
    mode.add_argument(
        "--find-goodput", action="store_true",
        help="the highest rate whose SLO attainment reaches --attainment",
    )  # fmt: skip
    mode.add_argument(
        "--recommend", type=int, metavar="N",
        help="goodput of every xPyD with x + y = N and of N aggregated; the best of them",
    )  # fmt: skip
    slo = parser.add_argument_group("SLO")
    slo.add_argument("--ttft-slo-ms", type=float, help="time to first token target")
    slo.add_argument("--tpot-slo-ms", type=float, help="time per output token target")
    slo.add_argument(
        "--attainment", type=float, default=0.9,
        help="share of requests that must meet the SLO (default 0.9)",
    )  # fmt: skip
    slo.add_argument(
        "--tolerance", type=float, default=0.02,
        help="goodput search stops when its bracket is within this ratio (default 0.02)",
    )  # fmt: skip
    routing = parser.add_argument_group(
        "routing", "defaults: the proxy config's (prefill_cost, least_load)"
    )
    routing.add_argument(
        "--proxy-config", type=Path, metavar="FILE",
        help="take the policies and disagg_min_prompt_tokens from this proxy config or topology",
    )  # fmt: skip
    routing.add_argument("--prefill-policy", metavar="NAME")
    routing.add_argument("--prefill-policy-options", metavar="JSON")
    routing.add_argument("--decode-policy", metavar="NAME")
    routing.add_argument("--decode-policy-options", metavar="JSON")
    routing.add_argument("--disagg-min-prompt-tokens", type=int, metavar="N")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results as JSON")
    add_workload_arguments(parser)


def run_simulate(args: argparse.Namespace) -> int:
    from benchmarks.planner.profile_model import Profile, ProfileError, StepModel, fit_report
    from benchmarks.planner.simulate import InstanceModel

    mode = _mode(args)
    deployment_sizes = _deployment_sizes(args, mode)
    slo = _slo(args, mode)
    if not 0 < args.attainment <= 1:
        raise CliError(f"--attainment must be in (0, 1], got {args.attainment:g}")
    if not args.tolerance > 0:
        raise CliError(f"--tolerance must be > 0, got {args.tolerance:g}")
    rates = _rates(args.rate) if mode == "rate" else []
    try:
        spec, requests = workload_from_args(args)
    except WorkloadError as exc:
        raise CliError(str(exc)) from None
    routing = _routing(args)
    try:
        profile = Profile.load(args.profile)
        step = StepModel.fit(profile)
    except ProfileError as exc:
        raise CliError(f"profile {exc}") from None
    model = InstanceModel.from_profile(profile, step)
    deployment = _deployment(deployment_sizes, routing)
    # Bad policy names and options fail here, before any long run.
    try:
        routing.build()
    except ValueError as exc:
        raise CliError(str(exc)) from None

    print(_header(profile, step, deployment, requests, slo, args.attainment))
    report: dict[str, Any] = {
        "profile": {
            "path": str(args.profile),
            "model": profile.model,
            "hardware": profile.hardware,
            "created": profile.created,
        },
        "fit": fit_report(profile, step),
        "workload": {"spec": vars(spec), **summary(requests)},
        "seed": args.seed,
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "attainment": args.attainment},
    }
    started = time.perf_counter()
    if mode == "rate":
        assert deployment is not None
        report["rates"] = _run_rates(model, deployment, requests, rates, slo, args.seed)
    elif mode == "goodput":
        assert deployment is not None
        report["goodput"] = _run_goodput(model, deployment, requests, slo, args)
    else:
        report["recommend"] = _run_recommend(model, routing, requests, slo, args)
    # What a planner costs to run is part of its answer (a speed figure, not a pass/fail).
    report["wall_s"] = time.perf_counter() - started
    print(f"simulated in {report['wall_s']:.1f} s")
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            raise CliError(f"cannot write {args.json}: {exc.strerror or exc}") from None
        print(f"wrote {args.json}")
    return 0


# -- argument checks --------------------------------------------------------------------------


def _mode(args: argparse.Namespace) -> str:
    chosen = [
        flag
        for flag, given in (
            ("--rate", args.rate is not None),
            ("--find-goodput", args.find_goodput),
            ("--recommend", args.recommend is not None),
        )
        if given
    ]
    if len(chosen) != 1:
        given = f"got {' and '.join(chosen)}" if chosen else "got none"
        raise CliError(f"give exactly one of --rate, --find-goodput, --recommend N ({given})")
    return {"--rate": "rate", "--find-goodput": "goodput", "--recommend": "recommend"}[chosen[0]]


def _deployment_sizes(args: argparse.Namespace, mode: str) -> tuple[str, int, int] | None:
    pd = args.prefill is not None or args.decode is not None
    aggregated = args.aggregated is not None
    if mode == "recommend":
        if pd or aggregated:
            raise CliError(
                "--recommend N tries every split itself: drop --prefill/--decode/--aggregated"
            )
        if args.recommend < 2:
            raise CliError(f"--recommend needs N >= 2 instances, got {args.recommend}")
        return None
    if pd and aggregated:
        raise CliError("give either --prefill X --decode Y or --aggregated N, not both")
    if aggregated:
        if args.aggregated < 1:
            raise CliError(f"--aggregated must be >= 1, got {args.aggregated}")
        return ("aggregated", 0, args.aggregated)
    if args.prefill is None or args.decode is None:
        raise CliError("a deployment needs --prefill X and --decode Y, or --aggregated N")
    if args.prefill < 1 or args.decode < 1:
        raise CliError(f"--prefill and --decode must be >= 1, got {args.prefill} and {args.decode}")
    return ("pd", args.prefill, args.decode)


def _slo(args: argparse.Namespace, mode: str) -> Slo:
    from benchmarks.planner.simulate import Slo

    for flag, value in (("--ttft-slo-ms", args.ttft_slo_ms), ("--tpot-slo-ms", args.tpot_slo_ms)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise CliError(f"{flag} must be a number > 0, got {value:g}")
    slo = Slo(
        ttft_s=None if args.ttft_slo_ms is None else args.ttft_slo_ms / 1000,
        tpot_s=None if args.tpot_slo_ms is None else args.tpot_slo_ms / 1000,
    )
    if mode != "rate" and not slo.given:
        flag = "--find-goodput" if mode == "goodput" else "--recommend"
        raise CliError(f"{flag} needs an SLO: --ttft-slo-ms and/or --tpot-slo-ms")
    return slo


def _rates(text: str) -> list[float]:
    rates = []
    for item in text.split(","):
        item = item.strip()
        try:
            rate = float(item)
        except ValueError:
            raise CliError(f"--rate: {item!r} is not a number (requests/s) or 'inf'") from None
        if not rate > 0:
            raise CliError(f"--rate: rates must be > 0, got {item!r}")
        rates.append(rate)
    return rates


def _options(flag: str, text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        options = json.loads(text)
    except ValueError:
        raise CliError(f"{flag}: not valid JSON: {text!r}") from None
    if not isinstance(options, dict):
        raise CliError(f"{flag}: expected a JSON object, got {text!r}")
    return options


def _routing(args: argparse.Namespace) -> Routing:
    from benchmarks.planner.simulate import Routing

    base = Routing()
    if args.proxy_config is not None:
        from proxy.config import load_proxy_config

        try:
            config = load_proxy_config(args.proxy_config)
        except ValueError as exc:
            raise CliError(str(exc)) from None
        base = Routing(
            prefill_policy=config.prefill_policy.name,
            prefill_options=config.prefill_policy.options,
            decode_policy=config.decode_policy.name,
            decode_options=config.decode_policy.options,
            disagg_min_prompt_tokens=config.disagg_min_prompt_tokens,
        )
    if args.disagg_min_prompt_tokens is not None and args.disagg_min_prompt_tokens < 0:
        raise CliError("--disagg-min-prompt-tokens must be >= 0")
    prefill_options = _options("--prefill-policy-options", args.prefill_policy_options)
    decode_options = _options("--decode-policy-options", args.decode_policy_options)
    return Routing(
        prefill_policy=args.prefill_policy or base.prefill_policy,
        prefill_options=prefill_options if prefill_options is not None else base.prefill_options,
        decode_policy=args.decode_policy or base.decode_policy,
        decode_options=decode_options if decode_options is not None else base.decode_options,
        disagg_min_prompt_tokens=(
            args.disagg_min_prompt_tokens
            if args.disagg_min_prompt_tokens is not None
            else base.disagg_min_prompt_tokens
        ),
    )


def _deployment(sizes: tuple[str, int, int] | None, routing: Routing) -> Deployment | None:
    from benchmarks.planner.simulate import Deployment

    if sizes is None:
        return None
    kind, prefill, decode = sizes
    return Deployment(kind, prefill, decode, routing)


# -- runs and tables --------------------------------------------------------------------------


def _header(
    profile: Profile,
    step: StepModel,
    deployment: Deployment | None,
    requests: list[WorkloadRequest],
    slo: Slo,
    attainment: float,
) -> str:
    from benchmarks.planner.profile_model import fit_report

    fleet = deployment.label if deployment is not None else "every split"
    prompt = sum(r.prompt_tokens for r in requests) / len(requests)
    output = sum(r.output_tokens for r in requests) / len(requests)
    errors = fit_report(profile, step)["errors"]
    fit = ", ".join(
        f"{kind} {100 * e['mean_abs_relative_error']:.1f} %" for kind, e in errors.items()
    )
    targets = []
    if slo.ttft_s is not None:
        targets.append(f"TTFT <= {1000 * slo.ttft_s:g} ms")
    if slo.tpot_s is not None:
        targets.append(f"TPOT <= {1000 * slo.tpot_s:g} ms")
    slo_text = f"; SLO {' and '.join(targets)} for {100 * attainment:g} %" if targets else ""
    return (
        f"{fleet} of {profile.model} ({profile.hardware}); {len(requests)} requests, "
        f"mean prompt {prompt:.0f} / output {output:.0f} tokens{slo_text}\n"
        f"step model mean |error| on the profile: {fit}"
    )


def _ms(value: float) -> str:
    return "-" if math.isnan(value) else f"{1000 * value:.1f}"


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "-"
    return "inf" if math.isinf(rate) else f"{rate:.3g}"


_ROW_HEADER = (
    f"{'rate/s':>8} {'TTFT p50':>9} {'p90':>8} {'p99':>8} {'TPOT p50':>9} {'p90':>7} {'p99':>7} "
    f"{'E2E p50 s':>9} {'p99':>7} {'req/s':>7} {'tok/s':>8} {'SLO ok':>7}"
)


def _row(result: SimulationResult) -> str:
    attainment = "-" if result.attainment is None else f"{100 * result.attainment:.1f}%"
    return (
        f"{_rate_text(result.rate):>8} {_ms(result.ttft.p50):>9} {_ms(result.ttft.p90):>8} "
        f"{_ms(result.ttft.p99):>8} {_ms(result.tpot.p50):>9} {_ms(result.tpot.p90):>7} "
        f"{_ms(result.tpot.p99):>7} {result.e2e.p50:>9.2f} {result.e2e.p99:>7.2f} "
        f"{result.throughput_rps:>7.3g} {result.output_tokens_per_s:>8.4g} {attainment:>7}"
    )


def _run_rates(
    model: InstanceModel,
    deployment: Deployment,
    requests: list[WorkloadRequest],
    rates: list[float],
    slo: Slo,
    seed: int,
) -> list[dict[str, Any]]:
    from benchmarks.planner.simulate import simulate_at_rate

    print("(times in ms unless marked)")
    print(_ROW_HEADER)
    results = []
    for rate in rates:
        result = simulate_at_rate(model, deployment, requests, rate, seed=seed, slo=slo)
        print(_row(result), flush=True)
        results.append(result.to_dict())
    return results


def _run_goodput(
    model: InstanceModel,
    deployment: Deployment,
    requests: list[WorkloadRequest],
    slo: Slo,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from benchmarks.planner.simulate import goodput

    found = goodput(
        model, deployment, requests, slo,
        target=args.attainment, seed=args.seed, rel_tol=args.tolerance,
    )  # fmt: skip
    tried = ", ".join(
        f"{_rate_text(rate)} -> {100 * attainment:.1f}%" for rate, attainment in found.evaluations
    )
    print(f"rates tried (req/s -> SLO ok): {tried}")
    print(f"goodput of {deployment.label}: {_goodput_text(found)}")
    if found.at_rate is not None:
        print("at the goodput (times in ms unless marked):")
        print(_ROW_HEADER)
        print(_row(found.at_rate))
    return found.to_dict()


def _goodput_text(found: GoodputResult) -> str:
    if found.rate == 0:
        return "0 (the SLO is missed even at a trickle of requests)"
    if math.isinf(found.rate):
        return "unbounded (all requests at once meet the SLO: simulate more requests)"
    return f"{found.rate:.3g} requests/s"


def _run_recommend(
    model: InstanceModel,
    routing: Routing,
    requests: list[WorkloadRequest],
    slo: Slo,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from benchmarks.planner.simulate import recommend_split

    print(
        f"{'deployment':>10} {'goodput/s':>10} {'per inst.':>9} {'TTFT p90 ms':>11} "
        f"{'TPOT p90 ms':>11}"
    )

    def show(row: GoodputResult) -> None:
        at = row.at_rate
        ttft = _ms(at.ttft.p90) if at is not None else "-"
        tpot = _ms(at.tpot.p90) if at is not None else "-"
        per_instance = row.rate / row.deployment.instances
        print(
            f"{row.deployment.label:>10} {_rate_text(row.rate):>10} "
            f"{_rate_text(per_instance):>9} {ttft:>11} {tpot:>11}",
            flush=True,
        )

    recommendation = recommend_split(
        args.recommend, model, requests, slo,
        routing=routing, target=args.attainment, seed=args.seed, rel_tol=args.tolerance,
        progress=show,
    )  # fmt: skip
    best = recommendation.best
    print(f"best of {args.recommend} instances: {best.deployment.label} ({_goodput_text(best)})")
    return recommendation.to_dict()
