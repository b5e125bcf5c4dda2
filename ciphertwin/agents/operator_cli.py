"""``ciphertwin operator …``: the operator's signing key and the node roster it signs.

    ciphertwin operator init --name operator    # key (encrypted at rest), public.key, broker login
    ciphertwin operator publish-roster --name operator --entry node0.entry --entry … [--version N]

Everyone who follows the roster — owners, nodes, the cloud, receivers — pins the operator's
``public.key``: ``operator_key = "…/public.key"`` under ``[processing]`` in the deployment
file (or ``CIPHERTWIN_PROCESSING__OPERATOR_KEY``), ``--operator-key`` overriding it.
:func:`pinned_operator` resolves it and refuses to go on without one: an unpinned roster
would let the cloud or the broker name the nodes, and so get every share.

``publish-roster`` reads the roster it replaces and refuses, before signing anything, a
version that is not newer or jumps too far, and any node moved to another share index
(the same rules as every follower's ``RosterHistory``, kept in the operator's home).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ciphertwin.agents.cli_base import (
    add_common, bus_for, home, identity, init_principal, iso_utc,
)
from ciphertwin.agents.identity import load_public
from ciphertwin.config.settings import Deployment, load_deployment
from ciphertwin.crypto.signing import VerifyKey
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.roster_trust import ROSTER_STATE_FILE, RosterHistory

NO_KEY_HELP = ("no operator key: set operator_key = \"<path to operator public.key>\" under "
               "[processing] in the deployment file (or CIPHERTWIN_PROCESSING__OPERATOR_KEY), "
               "or pass --operator-key; the operator creates it with `ciphertwin operator init`")


def pinned_operator(flag: str | None, deployment: Deployment) -> VerifyKey:
    """The operator key rosters must be signed with: ``--operator-key``, else the deployment's."""
    path = flag or deployment.processing.operator_key
    if path is None:
        raise ValidationError(NO_KEY_HELP)
    return load_public(path).verify_key


def add_operator_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--operator-key",
                   help="operator public.key rosters must be signed with "
                        "(default: [processing] operator_key of the deployment)")


async def _publish_roster(args: argparse.Namespace) -> int:
    from ciphertwin.agents.processing import ProcessingTimeout, fetch_roster
    from ciphertwin.mpc_nodes.entry_file import read_entry_file
    from ciphertwin.protocol.jobs import build_roster

    me = identity(args)
    if me.role != "operator":
        raise ValidationError(f"{me.name} is a {me.role}, not the operator: rosters are signed "
                              "with the key of `ciphertwin operator init`")
    nodes = sorted((read_entry_file(path) for path in args.entry), key=lambda n: n.entry.index)
    history = RosterHistory(me.signing.verify_key, home(args) / ROSTER_STATE_FILE)
    async with bus_for(args, load_deployment(args.config)) as bus:
        try:  # the roster we replace: the bounds apply against it
            await fetch_roster(bus, history, timeout=args.wait)
        except (ValidationError, ProcessingTimeout):
            pass  # none yet (or only refused ones): the operator's own history still applies
        version = args.version if args.version is not None else (history.version or 0) + 1
        payload = build_roster(me.signing, [n.entry for n in nodes], [n.pre for n in nodes],
                               version)
        history.accept(payload)  # refuses an old version, a jump or a moved node, unsent
        await bus.publish(bus.topics.config_nodes(), payload, retain=True)
    print(f"roster v{version} published: {', '.join(n.entry.node_id for n in nodes)}")
    for n in nodes:
        print(f"  share {n.entry.index}: {n.entry.node_id} (key fingerprint "
              f"{n.fingerprint})")
    print(f"  signed {iso_utc(time.time())}; followers accept it once they pin this operator key")
    return 0


def _init_operator(args: argparse.Namespace) -> int:
    init_principal(args, "operator")
    public = home(args) / "public.key"
    print(f"followers pin it with, in the deployment file:\n[processing]\n"
          f"operator_key = \"{public}\"")
    return 0


def register(subparsers: Any) -> None:
    op = subparsers.add_parser("operator", help="operator: the key that signs the node roster")
    sub = op.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    p = sub.add_parser("init", help="create the operator key (encrypted) and broker login")
    add_common(p)
    p.add_argument("--broker-password-stdin", action="store_true")
    p.set_defaults(func=_init_operator)
    p = sub.add_parser("publish-roster", help="sign and publish the node roster (retained)")
    add_common(p)
    p.add_argument("--entry", action="append", required=True, type=Path,
                   help="node entry file (three times)")
    p.add_argument("--version", type=int, help="default: one above the current roster")
    p.add_argument("--wait", type=float, default=1.5,
                   help="seconds to wait for the current roster")
    p.set_defaults(func=_publish_roster)
