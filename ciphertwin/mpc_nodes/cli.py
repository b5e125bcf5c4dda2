"""``ciphertwin node …``: run a processing node, and the operator's roster commands.

    ciphertwin node init --name node0                   # keys + broker login (role node)
    ciphertwin node entry --name node0 --index 0 --out node0.entry
    ciphertwin node publish-roster --name OPERATOR --entry node0.entry … --version 1
    ciphertwin node --index 0 --name node0 --operator-key operator/public.key [--rtt-ms 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from ciphertwin.agents.cli import _bus_for, _common, _identity, _init
from ciphertwin.agents.identity import load_public, read_private_file, write_private_file
from ciphertwin.config.settings import load_deployment
from ciphertwin.crypto import wire
from ciphertwin.crypto.kpcpre import PrePublicKey
from ciphertwin.errors import ValidationError
from ciphertwin.mpc_nodes.roster import NodeIdentity, RosterEntry

ENTRY_TAG = "node-entry-file"


def _node_identity(args: argparse.Namespace, index: int) -> tuple[Any, NodeIdentity]:
    me = _identity(args)
    return me, NodeIdentity(index, me.name, me.signing, me.hpke.private_key)


def _entry(args: argparse.Namespace) -> int:
    me, node = _node_identity(args, args.index)
    blob = wire.encode(ENTRY_TAG, {"entry": node.entry().to_bytes(),
                                   "pre": me.pre.public.to_bytes()})
    write_private_file(args.out, blob, mode=0o644)
    print(f"roster entry of {me.name} (index {args.index}) written to {args.out}")
    return 0


async def _publish_roster(args: argparse.Namespace) -> int:
    from ciphertwin.protocol.jobs import build_roster

    entries, pres = [], []
    for path in args.entry:
        f = wire.decode(read_private_file(path, 8192), ENTRY_TAG, ("entry", "pre"))
        entries.append(RosterEntry.from_bytes(f.bytes("entry")))
        pres.append(PrePublicKey.from_bytes(f.bytes("pre")))
    order = sorted(range(len(entries)), key=lambda i: entries[i].index)
    operator = _identity(args)
    payload = build_roster(operator.signing, [entries[i] for i in order],
                           [pres[i] for i in order], args.version)
    async with _bus_for(args, load_deployment(args.config)) as bus:
        await bus.publish(bus.topics.config_nodes(), payload, retain=True)
    print(f"roster v{args.version} published: {', '.join(entries[i].node_id for i in order)}")
    return 0


async def _run(args: argparse.Namespace) -> int:
    from ciphertwin.mpc_nodes.service import ProcessingNode

    if args.index is None:
        raise ValidationError("give --index (0, 1 or 2) or a sub-command")
    me, node_id = _node_identity(args, args.index)
    operator = load_public(args.operator_key).verify_key if args.operator_key else None
    workers = args.workers or max(1, (os.cpu_count() or 1) - 1)
    with ProcessPoolExecutor(workers) as pool:
        async with _bus_for(args, load_deployment(args.config)) as bus:
            async with ProcessingNode(bus, node_id, me.pre, operator=operator, executor=pool,
                                      latency_s=args.rtt_ms / 2000,
                                      mpc_timeout_s=args.mpc_timeout):
                await asyncio.Event().wait()
    return 0


def register(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="processing node (MPC) and node roster")
    _common(node, name_required=False)
    node.add_argument("--index", type=int, choices=[0, 1, 2], help="share index of this node")
    node.add_argument("--operator-key", help="operator public.key that signs the roster")
    node.add_argument("--rtt-ms", type=float, default=0.0,
                      help="impose this round-trip time on node-to-node frames (benchmarks)")
    node.add_argument("--mpc-timeout", type=float, default=30.0)
    node.add_argument("--workers", type=int, help="processes for opening inputs")
    node.set_defaults(func=_run)
    sub = node.add_subparsers(dest="node_command", metavar="ACTION", required=False)
    p = sub.add_parser("init", help="create node keys and broker login")
    _common(p)
    p.add_argument("--broker-password-stdin", action="store_true")
    p.set_defaults(func=lambda a: _init(a, "node"))
    p = sub.add_parser("entry", help="write this node's signed roster entry for the operator")
    _common(p)
    p.add_argument("--index", type=int, choices=[0, 1, 2], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_entry)
    p = sub.add_parser("publish-roster", help="operator: sign and publish the roster (retained)")
    _common(p)
    p.add_argument("--entry", action="append", required=True, help="entry file (three times)")
    p.add_argument("--version", type=int, required=True, help="higher than the current one")
    p.set_defaults(func=_publish_roster)
