"""``ciphertwin node …``: run a processing node, and write its roster entry for the operator.

    ciphertwin node init --name node0                   # keys + broker login (role node)
    ciphertwin node entry --name node0 --index 0 --out node0.entry
    ciphertwin operator publish-roster --name operator --entry node0.entry …   # the operator
    ciphertwin node --index 0 --name node0 [--operator-key operator/public.key] [--rtt-ms 30]

The node follows only rosters signed by the operator key of the deployment
(``[processing] operator_key``, or ``--operator-key``) and keeps its roster history in its
home folder (``roster-history.json``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ciphertwin.agents.cli_base import add_common, bus_for, home, identity, init_principal
from ciphertwin.agents.operator_cli import add_operator_key_option, pinned_operator
from ciphertwin.config.settings import load_deployment
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.roster_trust import ROSTER_STATE_FILE

if TYPE_CHECKING:
    from ciphertwin.mpc_nodes.roster import NodeIdentity

# The MPC modules (numpy) are imported only by the commands that need them: every
# `ciphertwin …` invocation builds this parser.


def _node_identity(args: argparse.Namespace, index: int) -> tuple[Any, NodeIdentity]:
    from ciphertwin.mpc_nodes.roster import NodeIdentity

    me = identity(args)
    return me, NodeIdentity(index, me.name, me.signing, me.hpke.private_key)


def _entry(args: argparse.Namespace) -> int:
    from ciphertwin.mpc_nodes.entry_file import write_entry_file

    me, node = _node_identity(args, args.index)
    written = write_entry_file(args.out, node, me.pre.public)
    print(f"roster entry of {me.name} (index {args.index}, key fingerprint "
          f"{written.fingerprint}) written to {args.out} (public, 0644)")
    return 0


async def _run(args: argparse.Namespace) -> int:
    from ciphertwin.lifecycle import run_until_signalled

    if args.index is None:
        raise ValidationError("give --index (0, 1 or 2) or a sub-command")
    return await run_until_signalled(_serve(args), name="node")


async def _serve(args: argparse.Namespace) -> None:
    """Run until cancelled (SIGINT/SIGTERM): the pool and the ledger are closed on the way out."""
    from ciphertwin.mpc_nodes.ledger import NodeLedger
    from ciphertwin.mpc_nodes.service import ProcessingNode
    from ciphertwin.protocol import share_open
    from ciphertwin.workers import worker_pool

    deployment = load_deployment(args.config)
    operator = pinned_operator(args.operator_key, deployment)
    me, node_id = _node_identity(args, args.index)
    workers = args.workers or max(1, (os.cpu_count() or 1) - 1)
    ledger = NodeLedger(home(args) / "node-ledger.db")  # job ids run, token budgets spent
    with closing(ledger), worker_pool(workers, preload=(share_open.__name__,)) as pool:
        async with bus_for(args, deployment) as bus:
            async with ProcessingNode(bus, node_id, me.pre, operator=operator,
                                      roster_state=home(args) / ROSTER_STATE_FILE, executor=pool,
                                      latency_s=args.rtt_ms / 2000,
                                      mpc_timeout_s=args.mpc_timeout,
                                      ledger=ledger):
                print(f"node {me.name} (index {args.index}) running; Ctrl-C stops", flush=True)
                await asyncio.Event().wait()


def register(subparsers: Any) -> None:
    node = subparsers.add_parser("node", help="processing node (MPC) and node roster")
    add_common(node, name_required=False)
    node.add_argument("--index", type=int, choices=[0, 1, 2], help="share index of this node")
    add_operator_key_option(node)
    node.add_argument("--rtt-ms", type=float, default=0.0,
                      help="impose this round-trip time on node-to-node frames (benchmarks)")
    node.add_argument("--mpc-timeout", type=float, default=30.0)
    node.add_argument("--workers", type=int, help="processes for opening inputs")
    node.set_defaults(func=_run)
    sub = node.add_subparsers(dest="node_command", metavar="ACTION", required=False)
    p = sub.add_parser("init", help="create node keys and broker login")
    add_common(p)
    p.add_argument("--broker-password-stdin", action="store_true")
    p.set_defaults(func=lambda a: init_principal(a, "node"))
    p = sub.add_parser("entry", help="write this node's signed roster entry for the operator")
    add_common(p)
    p.add_argument("--index", type=int, choices=[0, 1, 2], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=_entry)
