"""CLI for processing: ``owner grant-processing`` / ``revoke-processing``, ``job submit … --wait``,
``receiver results``.

Wiring (the top-level parsers ``owner`` and ``receiver`` belong to ``agents.cli``)::

    register(subparsers)            # adds `job submit`
    add_owner_commands(owner_sub)   # adds `owner grant-processing`, `owner revoke-processing`
    add_receiver_commands(recv_sub) # adds `receiver results`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ciphertwin.agents.cli import _bus_for, _common, _home, _identity, _time
from ciphertwin.agents.identity import load_public
from ciphertwin.agents.operator_cli import add_operator_key_option, pinned_operator
from ciphertwin.bus.envelope import Envelope
from ciphertwin.config.settings import load_deployment
from ciphertwin.crypto.tokens import TOKEN_ID_BYTES
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.roster_trust import (
    GRANTED_SHARES_FILE, ROSTER_STATE_FILE, RosterHistory, ShareIndexBook,
)


def _rosters(args: argparse.Namespace, deployment: Any) -> RosterHistory:
    """The principal's roster history (home folder), pinned to the deployment's operator key."""
    return RosterHistory(pinned_operator(args.operator_key, deployment),
                         _home(args) / ROSTER_STATE_FILE)


def _limits(pairs: list[str] | None) -> dict[str, int]:
    out = {}
    for p in pairs or []:
        name, _, value = p.partition("=")
        if not value.isdigit():
            raise ValidationError(f"--limit wants name=integer, got {p!r}")
        out[name] = int(value)
    return out


def _budget(args: argparse.Namespace) -> dict[str, int]:
    """--max-jobs / --job-window: the token's job budget, which the nodes enforce."""
    out = {"max_jobs": args.max_jobs} if args.max_jobs is not None else {}
    return out | ({"window_s": int(args.job_window * 3600)} if args.job_window is not None else {})


async def _grant_processing(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import fetch_roster, grant_processing

    deployment = load_deployment(args.config)
    rosters = _rosters(args, deployment)
    me = _identity(args)
    receivers = [load_public(f).hpke_public for f in args.receiver_key]
    async with _bus_for(args, deployment) as bus:
        roster = await fetch_roster(bus, rosters)
        token = await grant_processing(
            bus, me.name, me.pre, me.signing, roster, args.twins.split(","), args.subset,
            granted=ShareIndexBook(_home(args) / GRANTED_SHARES_FILE),
            function_classes=args.functions.split(","), receiver_keys=receivers,
            valid_for_s=int(args.days * 86400), limits=_limits(args.limit) | _budget(args))
    print(f"processing permitted: nodes {', '.join(roster.node_ids)} get share i of "
          f"{args.twins} where {args.subset!r} for {', '.join(token.function_classes)} "
          f"until {token.not_after}\ntoken id {token.token_id.hex()} "
          f"(withdraw with: owner revoke-processing --token-id {token.token_id.hex()})")
    return 0


async def _revoke_processing(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import revoke_processing

    try:
        token_id = bytes.fromhex(args.token_id)
    except ValueError:
        token_id = b""
    if len(token_id) != TOKEN_ID_BYTES:
        raise ValidationError(f"--token-id wants {2 * TOKEN_ID_BYTES} hex digits (as "
                              f"grant-processing printed it), got {args.token_id!r:.80}")
    me = _identity(args)
    async with _bus_for(args, load_deployment(args.config)) as bus:
        await revoke_processing(bus, me.name, me.signing, token_id)
    print(f"process token {token_id.hex()} revoked: nodes refuse jobs with it")
    return 0


def _bar(env: Envelope) -> None:
    width = 30
    frac = max(0.0, min(1.0, float(env["progress"])))
    detail = env["state"]
    if env["state"] == "computing" and env["rounds"]:
        detail = f"computing round {env['round']}/{env['rounds']}"
    elif env["state"] == "reencrypting":
        detail = f"re-encrypting {frac * 100:.0f} %"
    bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
    print(f"\r[{bar}] {detail:32} ({env['by']})", end="", file=sys.stderr, flush=True)


async def _job_submit(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import follow_status, new_job_id, submit_job

    inputs = []
    for spec in args.input:
        parts = spec.split(":")
        if len(parts) != 3:
            raise ValidationError(f"--input wants owner:twin:role, got {spec!r}")
        inputs.append((parts[0], parts[1], parts[2]))
    params = json.loads(args.params)
    receiver = load_public(args.receiver_key)
    job = args.job or new_job_id()
    async with _bus_for(args, load_deployment(args.config)) as bus:
        await submit_job(bus, job, args.function, params, inputs, receiver.name,
                         receiver.hpke_public, args.points, _time(args.since, 0.0),
                         _time(args.until, 4102444800.0))
        print(job)
        if not args.wait:
            return 0
        final = await follow_status(bus, job, _bar, timeout=args.timeout)
    print(file=sys.stderr)
    print(f"job {job}: {final['state']}" + (f" — {final['reason']}" if final["reason"] else ""))
    return 0 if final["state"] == "done" else 1


async def _receiver_results(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import ResultReceiver, write_results

    deployment = load_deployment(args.config)
    operator = pinned_operator(args.operator_key, deployment)
    me = _identity(args)
    params = json.loads(args.params) if args.params else None
    async with _bus_for(args, deployment) as bus:
        async with ResultReceiver(bus, me.name, me.hpke, operator=operator,
                                  roster_state=_home(args) / ROSTER_STATE_FILE) as rx:
            result = await rx.result(args.job, params, timeout=args.timeout)
    if args.out:
        write_results(result, Path(args.out), args.format)
        print(f"{len(result.labels)} results of {args.job} written to {args.out}")
    else:
        print(json.dumps(result.as_dict(), indent=2))
    return 0


def register(subparsers: Any) -> None:
    """Top-level ``job`` command."""
    job = subparsers.add_parser("job", help="processing jobs (MPC over the twins' shares)")
    jsub = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    p = jsub.add_parser("submit", help="publish a job on jobs/submit")
    _common(p)
    p.add_argument("--job", help="job id (default: random)")
    p.add_argument("--function", required=True, help="contact_tracing, sum, mean, …")
    p.add_argument("--params", default="{}", help='JSON, e.g. {"radius": 80}')
    p.add_argument("--input", action="append", required=True, help="owner:twin:role (repeat)")
    p.add_argument("--points", type=int, required=True, help="points per twin")
    p.add_argument("--receiver-key", required=True, help="receiver's public.key file")
    p.add_argument("--since", help="ISO time")
    p.add_argument("--until", help="ISO time")
    p.add_argument("--wait", action="store_true", help="follow the status with a progress bar")
    p.add_argument("--timeout", type=float, default=3600)
    p.set_defaults(func=_job_submit)


def add_owner_commands(osub: Any) -> None:
    p = osub.add_parser("grant-processing", help="let the nodes process share i of a subset (2+)")
    _common(p)
    p.add_argument("--twins", required=True, help="comma-separated twin ids")
    p.add_argument("--subset", required=True, help='e.g. "type:location AND day:2026-11-22"')
    p.add_argument("--functions", default="proximity", help="function classes, comma-separated")
    p.add_argument("--receiver-key", action="append", required=True,
                   help="public.key of an authorised receiver (repeat)")
    add_operator_key_option(p)
    p.add_argument("--days", type=float, default=1.0, help="token validity")
    p.add_argument("--limit", action="append",
                   help="max_items=N, min_owners=N (other owners in a job), max_points=N")
    p.add_argument("--max-jobs", type=int, help="jobs the nodes accept per window with this "
                   "token (default 20; bounds differencing across overlapping jobs)")
    p.add_argument("--job-window", type=float, help="budget window in hours (default 24; 0: "
                   "the token's whole validity)")
    p.set_defaults(func=_grant_processing)
    p = osub.add_parser("revoke-processing", help="withdraw a process token (nodes refuse it)")
    _common(p)
    p.add_argument("--token-id", required=True, help="the id grant-processing printed (hex)")
    p.set_defaults(func=_revoke_processing)


def add_receiver_commands(rsub: Any) -> None:
    p = rsub.add_parser("results", help="collect, verify, combine and write a job's output")
    _common(p)
    p.add_argument("--job", required=True)
    p.add_argument("--params", help="the job's parameters (JSON), for decoding")
    add_operator_key_option(p)
    p.add_argument("--out", help="file (.json or .csv); default: print JSON")
    p.add_argument("--format", choices=["json", "csv"])
    p.add_argument("--timeout", type=float, default=3600)
    p.set_defaults(func=_receiver_results)
