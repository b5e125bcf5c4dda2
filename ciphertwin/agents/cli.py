"""Sub-commands of the people-facing agents: `owner …`, `receiver …`, `device …`, `watch`.

Each principal keeps its keys in a home folder (default ``~/.ciphertwin/<name>``): the
identity (secret key file encrypted with a passphrase, except for unattended devices) and
``broker.secret`` with its broker login (0600). The broker address comes from the
deployment file (``--config`` or ``$CIPHERTWIN_CONFIG``).

Secrets never come from argv (world-readable in ``ps``, kept in shell history): passphrases
are read from an environment variable (``$CIPHERTWIN_PASSPHRASE`` for key folders,
``$CIPHERTWIN_BUNDLE_PASSPHRASE`` for enrollment bundles), from stdin (``--…-stdin``) or a
prompt. Enrollment bundles are always passphrase-sealed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from ciphertwin.agents.cli_base import BROKER_SECRET  # noqa: F401 - re-exported
from ciphertwin.agents.cli_base import add_common as _common
from ciphertwin.agents.cli_base import bus_for as _bus_for
from ciphertwin.agents.cli_base import home as _home
from ciphertwin.agents.cli_base import identity as _identity
from ciphertwin.agents.cli_base import init_principal as _init
from ciphertwin.agents.cli_base import iso_utc
from ciphertwin.agents.cli_base import parse_time as _time
from ciphertwin.agents.identity import (
    PASSPHRASE_ENV, default_home, load_public, passphrase_from_env_or_prompt,
)
from ciphertwin.agents.interact_cli import add_owner_commands as add_owner_interact_commands
from ciphertwin.agents.interact_cli import format_state_change
from ciphertwin.agents.interact_cli import register as register_request
from ciphertwin.agents.processing_cli import add_owner_commands, add_receiver_commands
from ciphertwin.bus.client import BusClient
from ciphertwin.config.passwords import generate_password
from ciphertwin.config.principals import Principal, add_client
from ciphertwin.config.settings import load_deployment
from ciphertwin.errors import ValidationError


# -- shared helpers -------------------------------------------------------------------------
def _bundle_passphrase_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passphrase-stdin", action="store_true",
                   help="read the bundle passphrase from stdin (default: "
                        "$CIPHERTWIN_BUNDLE_PASSPHRASE, else a prompt)")


def _bundle_passphrase(args: argparse.Namespace, confirm: bool = False) -> str:
    """The bundle passphrase: first line of stdin with ``--passphrase-stdin``, else
    ``$CIPHERTWIN_BUNDLE_PASSPHRASE``, else a prompt."""
    from ciphertwin.agents.bundle import PASSPHRASE_ENV

    if args.passphrase_stdin:
        value = sys.stdin.readline().rstrip("\r\n")
        if not value:
            raise ValidationError("--passphrase-stdin: stdin gave no passphrase")
        return value
    return passphrase_from_env_or_prompt(PASSPHRASE_ENV, confirm=confirm,
                                         prompt="Bundle passphrase: ")


def _print_items(items: list[Any], as_json: bool) -> None:
    for it in items:
        row = {"twin": it.twin, "device": it.device, "seq": it.seq, **it.reading}
        print(json.dumps(row) if as_json else
              f"{iso_utc(it.reading['time'])} "
              f"{it.device}#{it.seq} {it.reading['type']}: {it.reading['values']}")


# -- owner ----------------------------------------------------------------------------------
async def _owner_register(args: argparse.Namespace) -> int:
    from ciphertwin.agents.owner import OwnerAgent

    async with _bus_for(args, load_deployment(args.config)) as bus:
        await OwnerAgent(_identity(args), bus).register()
    print(f"owner {args.name} registered with the cloud")
    return 0


async def _owner_enroll(args: argparse.Namespace) -> int:
    from ciphertwin.agents.bundle import BrokerConnection, bundle_qr_png, write_bundle
    from ciphertwin.agents.owner import OwnerAgent

    bundle_passphrase = _bundle_passphrase(args, confirm=True)  # before any change is made
    if bundle_passphrase == os.environ.get(PASSPHRASE_ENV):
        raise ValidationError("the bundle passphrase goes to whoever installs the device: "
                              "do not reuse the owner's key passphrase")
    deployment = load_deployment(args.config)
    password = generate_password()
    add_client(deployment.principals.credentials_file,
               Principal.create(args.device, "device", password, twin=args.twin, owner=args.name,
                                iterations=deployment.principals.hash_iterations))
    b = deployment.broker
    source = json.loads(args.source) if args.source else {"kind": "simulated",
                                                            "sensor": args.sensor}
    rules = json.loads(args.rules) if args.rules else []
    async with _bus_for(args, deployment) as bus:
        owner = OwnerAgent(_identity(args), bus, home=_home(args))
        bundle = owner.enroll_device(
            args.twin, args.device, BrokerConnection(b.host, b.port, args.device, password,
                                                     b.prefix, b.tls.enabled),
            epoch_policy=args.epoch, rules=rules, source=source, valid_days=args.days)
        await owner.grant_own_device(args.twin, args.device, bundle.device_pre.public)
    out = Path(args.out or f"{args.device}.bundle")
    write_bundle(out, bundle, bundle_passphrase)
    print(f"enrollment bundle for {args.device} (twin {args.twin}) written to {out} "
          "(0600, passphrase-sealed)")
    if args.qr:
        bundle_qr_png(out.read_bytes(), args.qr)
        print(f"QR code written to {args.qr}")
    return 0


async def _owner_grant(args: argparse.Namespace) -> int:
    from ciphertwin.agents.owner import OwnerAgent

    receiver = load_public(args.receiver_key)
    async with _bus_for(args, load_deployment(args.config)) as bus:
        grant_id = await OwnerAgent(_identity(args), bus).grant(
            receiver.name, receiver.pre, args.twins.split(","), args.policy, args.grant_id)
    print(f"grant {grant_id}: {receiver.name} may read {args.twins} where {args.policy!r} "
          f"(receiver key fingerprint {receiver.fingerprint})")
    return 0


async def _owner_revoke(args: argparse.Namespace) -> int:
    from ciphertwin.agents.owner import OwnerAgent

    async with _bus_for(args, load_deployment(args.config)) as bus:
        await OwnerAgent(_identity(args), bus).revoke(args.grant_id)
    print(f"grant {args.grant_id} revoked")
    return 0


def _reader(args: argparse.Namespace, bus: BusClient) -> Any:
    """A reader that checks write tokens against the twin owner's key: our own key for an
    owner, else the owner's public.key file (never the cloud's word)."""
    from ciphertwin.agents.reader import TwinReader

    identity = _identity(args)
    if args.owner_key:
        owner_key = load_public(args.owner_key).verify_key
    elif identity.role == "owner":
        owner_key = identity.signing.verify_key
    else:
        raise ValidationError("give --owner-key: the twin owner's public.key file")
    return TwinReader(bus, args.name, identity.pre, owner_key)


async def _history(args: argparse.Namespace) -> int:
    async with _bus_for(args, load_deployment(args.config)) as bus:
        items = await _reader(args, bus).history(
            args.twin, _time(args.since, 0.0), _time(args.until, 1e12))
    _print_items(items, args.json)
    return 0


async def _watch(args: argparse.Namespace) -> int:
    from ciphertwin.agents.reader import StateChange

    async with _bus_for(args, load_deployment(args.config)) as bus:
        async for event in _reader(args, bus).watch_all(args.twin):
            if isinstance(event, StateChange):
                print(format_state_change(event, args.json))
            else:
                _print_items([event], args.json)
            sys.stdout.flush()
    return 0


# -- device ---------------------------------------------------------------------------------
def _device_enroll(args: argparse.Namespace) -> int:
    from ciphertwin.agents.bundle import enroll_from_bundle, read_bundle

    bundle = read_bundle(args.bundle, lambda: _bundle_passphrase(args))
    home = Path(args.home) if args.home else default_home(bundle.device)
    enroll_from_bundle(bundle, home, overwrite=args.force)
    print(f"device {bundle.device} of twin {bundle.twin} enrolled in {home}")
    return 0


async def _device_run(args: argparse.Namespace) -> int:
    from ciphertwin.agents.bundle import load_enrolled_device
    from ciphertwin.agents.device import DeviceAgent
    from ciphertwin.agents.device_settings import DEVICE_SETTINGS_FILE, load_device_settings
    from ciphertwin.agents.interaction import DeviceInteraction
    from ciphertwin.agents.outbox import Outbox
    from ciphertwin.agents.sources import make_source
    from ciphertwin.supervise import spawn

    home = Path(args.home) if args.home else default_home(args.name)
    config = load_enrolled_device(home)
    settings = load_device_settings(args.device_config or home / DEVICE_SETTINGS_FILE,
                                    required=args.device_config is not None)
    handler = settings.handler()  # a broken handler entry point fails now, not mid-run
    b = config.broker
    source = make_source(json.loads(args.source) if args.source else config.source)
    async with BusClient(b.host, b.port, username=b.username,
                         password=b.password, prefix=b.prefix, tls_context=b.ssl_context()) as bus, \
            Outbox(home / "outbox.db") as outbox:
        extra: dict[str, Any] = {}
        if args.shares:  # 3+: three additive shares per numeric reading, share:i attributes
            from ciphertwin.agents.share_mode import SHARE_MODE_FILE, load_share_mode

            extra["expand"] = load_share_mode(args.share_config or home / SHARE_MODE_FILE)
        manipulator = settings.gatekeeper.manipulator
        if manipulator.rewrites_outgoing:  # redact / coarsen before anything is sealed
            extra["outgoing"] = manipulator.outgoing
        agent = DeviceAgent(config, bus, outbox, **extra)
        interaction = DeviceInteraction(agent, handler, settings.gatekeeper,
                                        wake_schedule=settings.wake)
        print(f"device {config.device} → twin {config.twin}: {await outbox.count()} item(s) "
              "waiting in the outbox; Ctrl-C stops", flush=True)
        listener = spawn("device:interaction", interaction.run)
        try:
            await agent.run(source)
        finally:
            interaction.stop()
            await asyncio.gather(listener, return_exceptions=True)
    return 0


# -- registration ---------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    owner = subparsers.add_parser("owner", help="owner actions: keys, devices, grants")
    osub = owner.add_subparsers(dest="owner_command", metavar="ACTION", required=True)
    p = osub.add_parser("init", help="create owner keys and broker login")
    _common(p)
    p.add_argument("--broker-password-stdin", action="store_true",
                   help="read an operator-issued broker password instead of creating one")
    p.set_defaults(func=lambda a: _init(a, "owner"))
    p = osub.add_parser("register", help="publish the owner's public keys to the cloud")
    _common(p)
    p.set_defaults(func=_owner_register)
    p = osub.add_parser("enroll-device", help="make a device bundle (keys, write token, login)")
    _common(p)
    p.add_argument("--twin", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--out", help="bundle file (default <device>.bundle)")
    p.add_argument("--qr", help="also write the bundle as a QR code PNG (needs ciphertwin[qr])")
    p.add_argument("--epoch", default="hour", help="key epoch: item, hour, day or <n>s")
    p.add_argument("--sensor", default="temperature", help="simulated sensor kind")
    p.add_argument("--source", help='source spec as JSON, e.g. {"kind": "stdin"}')
    p.add_argument("--rules", help="attribute rules as a JSON list")
    p.add_argument("--days", type=int, default=365, help="write token validity")
    _bundle_passphrase_option(p)
    p.set_defaults(func=_owner_enroll)
    p = osub.add_parser("grant", help="let a receiver read a subset (policy) of twins")
    _common(p)
    p.add_argument("--receiver-key", required=True, help="receiver's public.key file")
    p.add_argument("--twins", required=True, help="comma-separated twin ids")
    p.add_argument("--policy", required=True, help='e.g. "type:temperature AND day:2026-11-22"')
    p.add_argument("--grant-id")
    p.set_defaults(func=_owner_grant)
    p = osub.add_parser("revoke", help="revoke a grant")
    _common(p)
    p.add_argument("grant_id")
    p.set_defaults(func=_owner_revoke)
    add_owner_commands(osub)
    add_owner_interact_commands(osub)
    for verb, fn in (("history", _history), ("watch", _watch)):
        p = osub.add_parser(verb, help=f"{verb} of a twin, decrypted"
                            + (" (items and state changes)" if verb == "watch" else ""))
        _common(p)
        p.add_argument("twin")
        p.add_argument("--json", action="store_true")
        p.add_argument("--owner-key", help="twin owner's public.key (default: our own key)")
        if verb == "history":
            p.add_argument("--since", help="ISO time")
            p.add_argument("--until", help="ISO time")
        p.set_defaults(func=fn)

    receiver = subparsers.add_parser("receiver", help="receiver actions: keys, history")
    rsub = receiver.add_subparsers(dest="receiver_command", metavar="ACTION", required=True)
    p = rsub.add_parser("init", help="create receiver keys and broker login")
    _common(p)
    p.add_argument("--broker-password-stdin", action="store_true")
    p.set_defaults(func=lambda a: _init(a, "receiver"))
    p = rsub.add_parser("history", help="history of a twin through the receiver's grant")
    _common(p)
    p.add_argument("twin")
    p.add_argument("--owner-key", required=True, help="the twin owner's public.key file")
    p.add_argument("--since")
    p.add_argument("--until")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_history)
    add_receiver_commands(rsub)

    device = subparsers.add_parser("device", help="device agent")
    dsub = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    p = dsub.add_parser("enroll", help="install an enrollment bundle")
    p.add_argument("bundle")
    p.add_argument("--home")
    _bundle_passphrase_option(p)
    p.add_argument("--force", action="store_true", help="replace an existing enrollment")
    p.set_defaults(func=_device_enroll)
    p = dsub.add_parser("run", help="read the source, seal, sign, publish (with outbox)")
    p.add_argument("--name", required=True, help="device id")
    p.add_argument("--home")
    p.add_argument("--source", help="override the bundle's source spec (JSON)")
    p.add_argument("--shares", action="store_true",
                   help="upload 3 secret shares per reading (for MPC processing) instead")
    p.add_argument("--share-config", type=Path,
                   help="share-mode TOML: declared field encodings, optional geo origin "
                        "(default <home>/share-mode.toml; docs/processing.md)")
    p.add_argument("--device-config", type=Path,
                   help="gatekeeper and interaction TOML (default <home>/device.toml; see "
                        "config/device-gatekeeper.example.toml)")
    p.set_defaults(func=_device_run)

    watch = subparsers.add_parser("watch", help="show decrypted live items and state changes "
                                                "(desired set, device reported) of a twin")
    _common(watch)
    watch.add_argument("twin")
    watch.add_argument("--json", action="store_true")
    watch.add_argument("--owner-key", help="twin owner's public.key (needed unless an owner)")
    watch.set_defaults(func=_watch)
    register_request(subparsers)
