"""`ciphertwin broker` (run the embedded broker or emit Mosquitto files) and `ciphertwin clients`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from ciphertwin.broker.embedded import EmbeddedBroker
from ciphertwin.broker.mosquitto import emit_mosquitto
from ciphertwin.config.passwords import generate_password
from ciphertwin.config.principals import Principal, Role
from ciphertwin.config.settings import load_deployment
from ciphertwin.errors import ValidationError
from ciphertwin.lifecycle import run_until_signalled


def register(subparsers: Any) -> None:
    """Add the `broker` and `clients` sub-commands."""
    p = subparsers.add_parser("broker", help="run the embedded MQTT broker (or emit Mosquitto files)")
    p.add_argument("--config", help="deployment TOML (default: $CIPHERTWIN_CONFIG or defaults)")
    p.add_argument("--emit-mosquitto", metavar="DIR",
                   help="write mosquitto.conf, passwd and acl into DIR and exit")
    p.add_argument("--port", type=int, help="override the listener port")
    p.add_argument("--mosquitto-user", metavar="USER",
                   help="with --emit-mosquitto: user Mosquitto runs as (must read passwd)")
    p.set_defaults(func=_broker)

    c = subparsers.add_parser("clients", help="manage broker principals (credentials file)")
    c.add_argument("--config", help="deployment TOML")
    csub = c.add_subparsers(dest="clients_command", metavar="ACTION", required=True)
    add = csub.add_parser("add", help="add a principal; prints a generated password once")
    add.add_argument("id")
    add.add_argument("--role", required=True, choices=[r.value for r in Role])
    add.add_argument("--twin", help="device: its twin")
    add.add_argument("--owner", help="device: its owner")
    add.add_argument("--twins", default="", help="owner: comma-separated twins")
    add.add_argument("--operator", action="store_true", help="owner: may publish the node roster")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from stdin instead of generating one")
    add.add_argument("--replace", action="store_true", help="replace an existing principal")
    add.set_defaults(func=_clients_add)
    rm = csub.add_parser("remove", help="remove a principal")
    rm.add_argument("id")
    rm.set_defaults(func=_clients_remove)
    ls = csub.add_parser("list", help="list principals (no hashes)")
    ls.set_defaults(func=_clients_list)


async def _serve(broker: EmbeddedBroker) -> None:
    """Serve until cancelled (SIGINT/SIGTERM, by :func:`run_until_signalled`)."""
    async with broker:
        print(f"ciphertwin broker listening on {broker.url} "
              f"({'OPEN: no auth' if broker.open else 'auth + ACLs'}); Ctrl-C stops", flush=True)
        await asyncio.Event().wait()


def _broker(args: argparse.Namespace) -> Any:
    deployment = load_deployment(args.config)
    if args.emit_mosquitto:
        files = emit_mosquitto(deployment, args.emit_mosquitto, port=args.port,
                               run_as=args.mosquitto_user)
        print(f"wrote {files.conf}, {files.passwd}, {files.acl}\n"
              f"run: mosquitto -c {files.conf}   (after enrolling: emit again, then kill -HUP)")
        return 0
    if deployment.broker.mode != "embedded":
        raise ValidationError("broker.mode is 'external': use --emit-mosquitto DIR for Mosquitto")
    return run_until_signalled(_serve(EmbeddedBroker(deployment, port=args.port)), name="broker")


def _clients_add(args: argparse.Namespace) -> int:
    deployment = load_deployment(args.config)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else generate_password()
    twins = tuple(t for t in args.twins.split(",") if t)
    principal = Principal.create(
        args.id, args.role, password,
        iterations=deployment.principals.hash_iterations,
        twin=args.twin, owner=args.owner, twins=twins, operator=args.operator,
    )
    deployment.credentials().add(principal, replace=args.replace)
    if not args.password_stdin:
        print(f"{args.id} password (shown once): {password}")
    return 0


def _clients_remove(args: argparse.Namespace) -> int:
    load_deployment(args.config).credentials().remove(args.id)
    return 0


def _clients_list(args: argparse.Namespace) -> int:
    for p in load_deployment(args.config).credentials().load().values():
        extra = f" twin={p.twin} owner={p.owner}" if p.twin else ""
        extra += f" twins={','.join(p.twins)}" if p.twins else ""
        extra += " operator" if p.operator else ""
        print(f"{p.id}\t{p.role.value}{extra}")
    return 0
