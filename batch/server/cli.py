"""``pulse-batch serve``: run the local Pulse-compatible server until Ctrl-C or SIGTERM.

Register on a typer app with ``app.command("serve")(serve)``. Fault flags override
the same settings from ``--fault-config`` (a YAML or JSON mapping of `FaultConfig`
fields). The API key is read from the environment variable named by
``--api-key-env``, never from the command line, and is never printed or logged. A host
other than loopback needs ``--api-key-env`` (or ``--allow-open``, said knowingly).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from batch.logjson import LogFormat
from batch.server.app import local_server
from batch.server.engines import EngineUnavailable, make_engine
from batch.server.faults import FaultConfig, FaultConfigError

FAULTS = "Fault injection"


class EngineName(StrEnum):
    synthetic = "synthetic"
    synthetic_multilingual = "synthetic-multilingual"
    whisper = "whisper"


def serve(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port; 0 picks a free one.")
    ] = 8765,
    engine: Annotated[
        EngineName, typer.Option(help="Recogniser: whisper (tiny.en) or synthetic (tones).")
    ] = EngineName.whisper,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Require 'Authorization: Bearer <key>' with the key in this env var."),
    ] = None,
    fault_config: Annotated[
        Path | None,
        typer.Option(help="YAML/JSON file of fault settings.", rich_help_panel=FAULTS),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the per-session fault draws.", rich_help_panel=FAULTS),
    ] = None,
    refuse_429_rate: Annotated[
        float | None,
        typer.Option(help="Share of handshakes refused with 429.", rich_help_panel=FAULTS),
    ] = None,
    retry_after_s: Annotated[
        float | None, typer.Option(help="Retry-After of 429s, in seconds.", rich_help_panel=FAULTS)
    ] = None,
    refuse_5xx_rate: Annotated[
        float | None,
        typer.Option(help="Share of handshakes refused with a 5xx.", rich_help_panel=FAULTS),
    ] = None,
    refuse_5xx_status: Annotated[
        int | None,
        typer.Option(help="Status of injected 5xx refusals (default 503).", rich_help_panel=FAULTS),
    ] = None,
    drop_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions aborted mid-stream (no close frame).", rich_help_panel=FAULTS
        ),
    ] = None,
    error_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions ended by an error message and close 1011.",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    malformed_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions sent one non-JSON frame (then completed).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    stall_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions that go silent (never send is_last).", rich_help_panel=FAULTS
        ),
    ] = None,
    early_last_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions ended early (is_last before the client's end).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    odd_values_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions sent one final with an odd field value (NaN times, "
            '"word": null, "is_final": "false", ...).',
            rich_help_panel=FAULTS,
        ),
    ] = None,
    late_1008_rate: Annotated[
        float | None,
        typer.Option(
            help="Share of sessions closed 1008 (no is_last) after the client's end signal.",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    odd_value_kinds: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated odd-value variants to draw from (default: all).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    max_sessions: Annotated[
        int | None,
        typer.Option(help="Concurrent session limit (429 beyond).", rich_help_panel=FAULTS),
    ] = None,
    fault_limit: Annotated[
        int | None, typer.Option(help="Fault at most this many sessions.", rich_help_panel=FAULTS)
    ] = None,
    retry_after_header: Annotated[
        str | None,
        typer.Option(
            help="Send this text as the 429s' Retry-After verbatim (e.g. inf, 1e8).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    echo_authorization: Annotated[
        bool | None,
        typer.Option(
            "--echo-authorization",
            help="Repeat the request's Authorization header in refusal bodies and errors.",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    stall_after_s: Annotated[
        float | None,
        typer.Option(
            help="Sessions go silent after this many seconds of audio (keep reading, "
            "never answer or close); fault_limit caps how many.",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    reply_latency_s: Annotated[
        float | None,
        typer.Option(
            help="Wait this long before the upgrade and before every message sent, as a "
            "distant service would (not a fault: every session).",
            rich_help_panel=FAULTS,
        ),
    ] = None,
    allow_open: Annotated[
        bool,
        typer.Option(
            "--allow-open",
            help="Listen on a non-loopback --host without --api-key-env: anyone who can "
            "reach the port can use the server.",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
    log_format: LogFormat = "text",
) -> None:
    """Run a local Pulse-compatible streaming speech-to-text server."""
    if api_key_env is None and not allow_open and not is_loopback(host):
        # Before binding: an open server on a shared network takes anyone's audio and CPU.
        typer.echo(
            f"error: --host {host} is reachable from other machines and no --api-key-env "
            "is set, so anyone could use this server. Set --api-key-env VAR (clients send "
            "the key in VAR), or pass --allow-open to serve without a key knowingly.",
            err=True,
        )
        raise typer.Exit(2)
    # With --log-format json the root logger has its JSON handler already: only the level.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(log_level.upper())
    api_key = _api_key(api_key_env)
    flags = {
        "seed": seed,
        "refuse_429_rate": refuse_429_rate,
        "retry_after_s": retry_after_s,
        "refuse_5xx_rate": refuse_5xx_rate,
        "refuse_5xx_status": refuse_5xx_status,
        "drop_rate": drop_rate,
        "error_rate": error_rate,
        "malformed_rate": malformed_rate,
        "stall_rate": stall_rate,
        "early_last_rate": early_last_rate,
        "odd_values_rate": odd_values_rate,
        "late_1008_rate": late_1008_rate,
        "odd_value_kinds": None
        if odd_value_kinds is None
        else tuple(k.strip() for k in odd_value_kinds.split(",") if k.strip()),
        "max_sessions": max_sessions,
        "fault_limit": fault_limit,
        "retry_after_header": retry_after_header,
        "echo_authorization": echo_authorization,
        "stall_after_s": stall_after_s,
        "reply_latency_s": reply_latency_s,
    }
    faults = _fault_config(fault_config, flags)
    try:
        asyncio.run(_serve_until_stopped(host, port, engine.value, api_key, api_key_env, faults))
    except OSError as exc:
        typer.echo(f"error: cannot listen on {host}:{port}: {exc}", err=True)
        raise typer.Exit(1) from exc
    except EngineUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (``localhost``, 127.0.0.0/8, ``::1``).
    Any other name, and the wildcards ``0.0.0.0``, ``::`` and ``""``, can be reached from
    other machines (a name is not resolved: it may point anywhere tomorrow)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise typer.BadParameter(
            f"environment variable {env_name} is not set or empty", param_hint="--api-key-env"
        )
    return key


def _fault_config(path: Path | None, flags: dict[str, Any]) -> FaultConfig:
    """The file's settings (if any) with every given flag on top."""
    try:
        base = FaultConfig.from_file(path) if path is not None else FaultConfig()
        overrides = {name: value for name, value in flags.items() if value is not None}
        return dataclasses.replace(base, **overrides)
    except FaultConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


async def _serve_until_stopped(
    host: str,
    port: int,
    engine_name: str,
    api_key: str | None,
    api_key_env: str | None,
    faults: FaultConfig,
) -> None:
    engine = make_engine(engine_name)
    warm_up = getattr(engine, "warm_up", None)
    if warm_up is not None:
        typer.echo(f"loading the {engine_name} model ...")
        await asyncio.to_thread(warm_up)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with local_server(
        engine=engine, api_key=api_key, faults=faults, host=host, port=port
    ) as server:
        typer.echo(f"Pulse-compatible server ({engine_name} engine) listening on {server.base_url}")
        typer.echo(f"  url:         {server.url}")
        typer.echo(f"  unified url: {server.unified_url}  (needs model=pulse)")
        typer.echo(f"  current url: {server.current_url}")
        auth = f"Bearer key from ${api_key_env}" if api_key_env else "none (any key accepted)"
        typer.echo(f"  auth:        {auth}")
        if faults != FaultConfig():
            typer.echo(f"  faults:      {faults}")
        typer.echo("Press Ctrl-C to stop.")
        await stop.wait()
        typer.echo("stopping ...")
    stats = server.stats
    typer.echo(
        f"stopped: {stats.sessions_opened} sessions opened, "
        f"{stats.sessions_completed} completed, refused {dict(stats.refused)}"
    )
