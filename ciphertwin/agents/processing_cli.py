"""CLI for processing: ``owner grant-processing`` / ``revoke-processing``, ``job submit … --wait``,
``receiver results``.

Wiring: ``register(subparsers)`` adds the top-level ``job``; ``agents.cli`` (which owns the
``owner`` and ``receiver`` parsers) calls :func:`add_owner_commands` and
:func:`add_receiver_commands`. This module imports only :mod:`agents.cli_base`, never
``agents.cli``.

Times: ``--since`` / ``--until`` take ISO-8601 (no zone: UTC) or Unix seconds; everything
printed is ISO-8601 UTC. Exit codes (:mod:`agents.cli_base`) of every command here: 0 done,
1 the job failed, 2 bad input or a refusal, 3 timed out waiting — always with a one-line
``ciphertwin: error``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ciphertwin.agents.cli_base import (
    EXIT_FAILED, EXIT_TIMEOUT, add_common, bus_for, fail, home, identity, iso_utc,
    json_object_option, parse_time,
)
from ciphertwin.agents.identity import load_public
from ciphertwin.agents.operator_cli import add_operator_key_option, pinned_operator
from ciphertwin.bus.envelope import Envelope
from ciphertwin.bus.errors import RequestTimeout
from ciphertwin.config.settings import load_deployment
from ciphertwin.crypto.tokens import TOKEN_ID_BYTES
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.job_epochs import DEFAULT_EPOCH_S
from ciphertwin.protocol.roster_trust import (
    GRANTED_SHARES_FILE, ROSTER_STATE_FILE, RosterHistory, ShareIndexBook,
)

DEFAULT_WINDOW_S = 86_400


def _rosters(args: argparse.Namespace, deployment: Any) -> RosterHistory:
    """The principal's roster history (home folder), pinned to the deployment's operator key."""
    return RosterHistory(pinned_operator(args.operator_key, deployment),
                         home(args) / ROSTER_STATE_FILE)


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
    me = identity(args)
    receivers = [load_public(f).hpke_public for f in args.receiver_key]
    async with bus_for(args, deployment) as bus:
        roster = await fetch_roster(bus, rosters)
        token = await grant_processing(
            bus, me.name, me.pre, me.signing, roster, args.twins.split(","), args.subset,
            granted=ShareIndexBook(home(args) / GRANTED_SHARES_FILE),
            function_classes=args.functions.split(","), receiver_keys=receivers,
            valid_for_s=int(args.days * 86400), limits=_limits(args.limit) | _budget(args))
    print(f"processing permitted: nodes {', '.join(roster.node_ids)} get share i of "
          f"{args.twins} where {args.subset!r} for {', '.join(token.function_classes)} "
          f"until {iso_utc(token.not_after)}\ntoken id {token.token_id.hex()} "
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
    me = identity(args)
    async with bus_for(args, load_deployment(args.config)) as bus:
        await revoke_processing(bus, me.name, me.signing, token_id)
    print(f"process token {token_id.hex()} revoked: nodes refuse jobs with it")
    return 0


# --- job submit ------------------------------------------------------------------------------


def _status_text(env: Envelope) -> str:
    if env["state"] == "computing" and env["rounds"]:
        return f"computing round {env['round']}/{env['rounds']}"
    if env["state"] == "reencrypting":
        return f"re-encrypting {max(0.0, min(1.0, float(env['progress']))) * 100:.0f} %"
    return str(env["state"])


class _Progress:
    """A bar on a terminal; one line per change of state otherwise (logs, scripts)."""

    def __init__(self, job: str) -> None:
        self.job, self.tty = job, sys.stderr.isatty()
        self.state = self.last = ""

    def __call__(self, env: Envelope) -> None:
        text = _status_text(env)
        if self.tty:
            frac = max(0.0, min(1.0, float(env["progress"])))
            bar = "#" * int(frac * 30) + "-" * (30 - int(frac * 30))
            print(f"\r[{bar}] {text:32} ({env['by']})", end="", file=sys.stderr, flush=True)
        if env["by"] != "cloud":
            return
        if not self.tty and env["state"] != self.state:
            print(f"{iso_utc(env['time'])} job {self.job}: {text}", file=sys.stderr, flush=True)
        self.state, self.last = env["state"], text

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def _job_inputs(specs: list[str]) -> list[tuple[str, str, str]]:
    inputs = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) != 3 or not all(parts):
            raise ValidationError(f"--input wants owner:twin:role, got {spec!r:.80}")
        inputs.append((parts[0], parts[1], parts[2]))
    return inputs


def _job_fields(args: argparse.Namespace) -> dict[str, Any] | None:
    """--fields: JSON ``{field: {unit, frac, min, max}}``, ``@file.json``, or ``@file.toml`` — a
    device share-mode file, whose ``[fields]`` the job then declares exactly; None: the
    function's DEFAULT_FIELDS."""
    if args.fields is None:
        return None
    if args.fields.startswith("@") and args.fields.lower().endswith(".toml"):
        from ciphertwin.agents.share_mode import load_share_mode

        return {f: enc.as_dict() for f, enc in load_share_mode(args.fields[1:]).encodings.items()}
    return json_object_option(args.fields, "--fields")


def _job_window(args: argparse.Namespace) -> tuple[float, float]:
    """[since, until); default the 24 hours up to now."""
    until = parse_time(args.until, time.time(), "--until")
    return parse_time(args.since, until - DEFAULT_WINDOW_S, "--since"), until


async def _job_submit(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import follow_status, new_job_id, submit_job
    from ciphertwin.protocol.jobs import DEFAULT_FIELDS, check_job_shape, with_defaults

    inputs, params = _job_inputs(args.input), json_object_option(args.params, "--params")
    fields, (since, until) = _job_fields(args), _job_window(args)
    if fields is None:
        if args.function not in DEFAULT_FIELDS:
            raise ValidationError(f"{args.function}: no default field encodings; give --fields")
        fields = {f: enc.as_dict() for f, enc in DEFAULT_FIELDS[args.function].items()}
    params = with_defaults(args.function, params, fields)  # e.g. a sum's frac_bits: its field's
    check_job_shape(args.function, params, fields, since, until, args.epoch_s)  # fail at once
    receiver = load_public(args.receiver_key)
    job = args.job or new_job_id()
    async with bus_for(args, load_deployment(args.config)) as bus:
        await submit_job(bus, job, args.function, params, inputs, receiver.name,
                         receiver.hpke_public, args.points, since, until,
                         epoch_s=args.epoch_s, fields=fields)
        print(job, flush=True)
        print(f"job {job}: {args.function} over [{iso_utc(since)}, {iso_utc(until)}) in "
              f"{args.epoch_s} s epochs for {receiver.name}", file=sys.stderr, flush=True)
        if not args.wait:
            return 0
        progress = _Progress(job)
        try:
            final = await follow_status(bus, job, progress, timeout=args.timeout)
        finally:
            progress.close()
    if final["state"] != "done":
        return fail(f"job {job} {final['state']} at {iso_utc(final['time'])}: "
                    f"{final['reason'] or 'no reason given'}", EXIT_FAILED)
    print(f"job {job}: done at {iso_utc(final['time'])}")
    return 0


# --- receiver results ----------------------------------------------------------------------


async def _receiver_results(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import ResultReceiver, write_results

    deployment = load_deployment(args.config)
    operator = pinned_operator(args.operator_key, deployment)
    me = identity(args)
    params = json_object_option(args.params, "--params") if args.params else None
    async with bus_for(args, deployment) as bus:
        async with ResultReceiver(bus, me.name, me.hpke, operator=operator,
                                  roster_state=home(args) / ROSTER_STATE_FILE) as rx:
            result = await rx.result(args.job, params, timeout=args.timeout)
    if args.out:
        write_results(result, Path(args.out), args.format)
        print(f"{len(result.labels)} results of {args.job} written to {args.out}")
    else:
        print(json.dumps(result.as_dict(), indent=2))
    return 0


# --- wiring --------------------------------------------------------------------------------


def _exit_codes(command: Callable[[argparse.Namespace], Awaitable[int]]
                ) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """Waiting too long (for a status, a share, the roster, the cloud's reply) → one line and
    exit 3; a job that failed → one line and exit 1 (any other refusal stays exit 2, printed
    by the top-level handler)."""
    @functools.wraps(command)
    async def run(args: argparse.Namespace) -> int:
        from ciphertwin.agents.processing import JobFailedError, ProcessingTimeout

        try:
            return await command(args)
        except (ProcessingTimeout, RequestTimeout) as exc:
            return fail(str(exc), EXIT_TIMEOUT)
        except JobFailedError as exc:
            return fail(str(exc), EXIT_FAILED)
    return run



def register(subparsers: Any) -> None:
    """Top-level ``job`` command."""
    job = subparsers.add_parser("job", help="processing jobs (MPC over the twins' shares)")
    jsub = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    p = jsub.add_parser("submit", help="publish a job on jobs/submit")
    add_common(p)
    p.add_argument("--job", help="job id (default: random)")
    p.add_argument("--function", required=True, help="contact_tracing, sum, mean, …")
    p.add_argument("--params", default="{}", help='JSON (or @file), e.g. {"radius": 80}')
    p.add_argument("--fields", help="JSON {field: {unit, frac, min, max}}, @file.json, or "
                   "@share-mode.toml (the devices' file): the encodings the devices must have "
                   "used (default: the function's DEFAULT_FIELDS)")
    p.add_argument("--epoch-s", type=int, default=DEFAULT_EPOCH_S,
                   help=f"epoch length in seconds, aligned to the clock (default {DEFAULT_EPOCH_S})")
    p.add_argument("--input", action="append", required=True, help="owner:twin:role (repeat)")
    p.add_argument("--points", type=int, required=True,
                   help="most readings any one twin may contribute")
    p.add_argument("--receiver-key", required=True, help="receiver's public.key file")
    p.add_argument("--since", help="window start: ISO-8601 (no zone: UTC) or Unix seconds "
                   "(default: --until minus 24 h)")
    p.add_argument("--until", help="window end, exclusive (default: now)")
    p.add_argument("--wait", action="store_true",
                   help="follow the status until done (exit 0), failed (1) or --timeout (3)")
    p.add_argument("--timeout", type=float, default=600,
                   help="give up (exit 3) after this many seconds without any word of the job")
    p.set_defaults(func=_exit_codes(_job_submit))


def add_owner_commands(osub: Any) -> None:
    p = osub.add_parser("grant-processing", help="let the nodes process share i of a subset (2+)")
    add_common(p)
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
    p.set_defaults(func=_exit_codes(_grant_processing))
    p = osub.add_parser("revoke-processing", help="withdraw a process token (nodes refuse it)")
    add_common(p)
    p.add_argument("--token-id", required=True, help="the id grant-processing printed (hex)")
    p.set_defaults(func=_exit_codes(_revoke_processing))


def add_receiver_commands(rsub: Any) -> None:
    p = rsub.add_parser("results", help="collect, verify, combine and write a job's output "
                        "(also after the job finished: results are retained)")
    add_common(p)
    p.add_argument("--job", required=True)
    p.add_argument("--params", help="parameters (JSON or @file) the job must have run with; "
                                    "the results carry the job's own, signed")
    add_operator_key_option(p)
    p.add_argument("--out", help="file (.json or .csv); default: print JSON")
    p.add_argument("--format", choices=["json", "csv"])
    p.add_argument("--timeout", type=float, default=600,
                   help="give up (exit 3) after this many seconds without any word of the job")
    p.set_defaults(func=_exit_codes(_receiver_results))
