"""`ciphertwin cloud`: run the cloud twin service for a deployment.

The operator key node rosters must be signed with is mandatory (``[processing] operator_key``
or ``--operator-key``): the cloud must not choose the nodes it sends shares to.

As a supervisor sees it: SIGINT/SIGTERM stop the cloud cleanly (its worker processes too) with
exit code 0; a store that cannot be opened, or is lost while running, ends it with a one-line
error and a non-zero exit code; its workers never outlive it (`ciphertwin.workers`).
"""

from __future__ import annotations

import argparse
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from ciphertwin.errors import ValidationError

if TYPE_CHECKING:
    from ciphertwin.config.settings import Deployment
    from ciphertwin.crypto.signing import VerifyKey


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("cloud", help="run the cloud twin service")
    p.add_argument("--config", help="deployment TOML (default $CIPHERTWIN_CONFIG)")
    p.add_argument("--name", default="cloud", help="the cloud's principal id")
    p.add_argument("--password-env", default="CIPHERTWIN_CLOUD_PASSWORD",
                   help="environment variable holding the cloud's broker password")
    p.add_argument("--workers", type=int, default=0, help="re-encryption processes (0 = cores)")
    p.add_argument("--operator-key", help="operator public.key node rosters must be signed "
                                          "with (default: [processing] operator_key)")
    p.set_defaults(func=_run)


async def _run(args: argparse.Namespace) -> int:
    import os

    from ciphertwin.agents.operator_cli import pinned_operator
    from ciphertwin.config.settings import load_deployment
    from ciphertwin.lifecycle import run_until_signalled

    deployment = load_deployment(args.config)
    operator = pinned_operator(args.operator_key, deployment)
    password = os.environ.get(args.password_env)
    if not deployment.broker.open and not password:
        raise ValidationError(f"set {args.password_env} to the cloud's broker password")
    return await run_until_signalled(_serve(args, deployment, operator, password), name="cloud")


async def _serve(args: argparse.Namespace, deployment: Deployment, operator: VerifyKey,
                 password: str | None) -> None:
    """Run until cancelled; ends with StoreUnavailable if the store is lost meanwhile."""
    from ciphertwin.bus.client import BusClient
    from ciphertwin.cloud_twin.reencryption import ReencryptionPool
    from ciphertwin.cloud_twin.service import CloudTwin
    from ciphertwin.cloud_twin.store import open_store
    from ciphertwin.cloud_twin.store_watch import watch_store

    store = open_store(deployment.storage)
    async with AsyncExitStack() as stack:
        await store.open()  # first: a store that cannot open fails now, broker or not
        stack.push_async_callback(store.close)
        bus = await stack.enter_async_context(
            BusClient.for_deployment(deployment, username=args.name, password=password))
        await stack.enter_async_context(CloudTwin(
            bus, store, pool=ReencryptionPool(args.workers or None), operator=operator))
        where = (deployment.storage.sqlite_path if deployment.storage.backend == "sqlite"
                 else "postgresql")
        print(f"cloud twin running (store: {where}); Ctrl-C stops", flush=True)
        await watch_store(store)
