"""``pdserve proxy``: run the PD proxy from a config file and/or command-line instances."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", "-c", metavar="YAML",
        help="proxy config, or a topology file with a `proxy:` section",
    )  # fmt: skip
    parser.add_argument(
        "--prefill", nargs="+", action="extend", metavar="URL", default=None,
        help="prefill instance base URLs (added to the config's)",
    )  # fmt: skip
    parser.add_argument(
        "--decode", nargs="+", action="extend", metavar="URL", default=None,
        help="decode instance base URLs (added to the config's)",
    )  # fmt: skip
    parser.add_argument("--host", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="listen port (default 8000)")
    parser.add_argument("--admin-port", type=int, help="admin API port (default 8001)")
    parser.add_argument(
        "--admin-token-file",
        type=Path,
        metavar="FILE",
        help="file (mode 0600) holding the admin API's bearer token (default: "
        "$PDSERVE_ADMIN_TOKEN, else $PDSERVE_ADMIN_TOKEN_FILE, else none)",
    )
    from deploy.cli import add_removed_secret_flag

    add_removed_secret_flag(parser, "--admin-token", "PDSERVE_ADMIN_TOKEN", "--admin-token-file")
    parser.add_argument("--prefill-policy", metavar="NAME", help="default prefill_cost")
    parser.add_argument("--decode-policy", metavar="NAME", help="default least_load")
    parser.add_argument(
        "--disagg-min-prompt-tokens", type=int, metavar="N",
        help="prompts shorter than N (estimated) tokens skip the prefill leg",
    )  # fmt: skip


def build_config(args: argparse.Namespace) -> Any:
    """The ProxyConfig from --config plus flag overrides; CliError on bad input."""
    from deploy.cli import CliError
    from proxy.config import ProxyConfig, describe_validation_error, load_proxy_config

    try:
        base = load_proxy_config(args.config) if args.config else ProxyConfig()
    except ValueError as exc:
        raise CliError(str(exc)) from None
    data = base.model_dump()
    data["prefill"] = [*data["prefill"], *(args.prefill or [])]
    data["decode"] = [*data["decode"], *(args.decode or [])]
    for key in ("host", "port", "disagg_min_prompt_tokens"):
        if getattr(args, key) is not None:
            data[key] = getattr(args, key)
    if args.admin_port is not None:
        data["admin"]["port"] = args.admin_port
    from kv_transfer.config import SecretError, read_secret

    try:
        token = read_secret(
            None,
            args.admin_token_file,
            env_var="PDSERVE_ADMIN_TOKEN",
            file_env_var="PDSERVE_ADMIN_TOKEN_FILE",
            names=("--admin-token", "--admin-token-file"),
        )
    except SecretError as exc:
        raise CliError(str(exc)) from None
    if token:
        data["admin"]["token"] = token
    if args.prefill_policy:
        data["prefill_policy"] = {"name": args.prefill_policy, "options": {}}
    if args.decode_policy:
        data["decode_policy"] = {"name": args.decode_policy, "options": {}}
    try:
        config = ProxyConfig.model_validate(data)
    except ValidationError as exc:
        raise CliError(describe_validation_error(exc)) from None
    admin_on = config.admin.port is not None or bool(config.admin.token)
    if not config.decode and not admin_on:
        raise CliError(
            "decode: no decode instances and no admin API to add them; pass --decode URL"
        )
    return config


def run(args: argparse.Namespace) -> int:
    import uvloop

    from deploy.cli import CliError
    from proxy.server import ProxyServer

    config = build_config(args)
    try:
        server = ProxyServer(config)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if not config.decode:
        # Legitimate when instances are registered later through the admin API.
        print(
            "pdserve proxy: no decode instances yet; add them with the admin API",
            file=sys.stderr,
        )
    try:
        uvloop.run(_serve(server))
    except OSError as exc:
        raise CliError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    return 0


async def _serve(server: Any) -> None:
    await server.start()
    print(f"pdserve proxy on {server.url} (admin: {server.admin_url or 'off'})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop()
