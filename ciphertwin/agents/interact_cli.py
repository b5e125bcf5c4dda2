"""CLI for twin state and interaction (P4, P5).

    ciphertwin owner set-desired --name alice --twin T (--doc JSON | --merge JSON) \
        [--base-version N]
    ciphertwin owner get-state --name alice --twin T [--json]
    ciphertwin owner grant-interact --name alice --to bob --holder-key bob/public.key --twin T \\
        --rights request,desired [--ops a,b] [--days 30] --out bob.interact-token
    ciphertwin owner revoke-interact --name alice ID
    ciphertwin request send --name bob --twin T --op OP --args JSON [--wake] \\
        [--approval FILE …] [--attachment FILE] [--request-id ID] --wait
    ciphertwin request approve --name carol --twin T --op OP --args JSON --request-id ID --out F
    ciphertwin request sign-image --name signer --attachment IMAGE   (hex for args "image_sig")
    ciphertwin request set-desired / get-state …   (a requester, through its token)

Wiring: ``agents.cli`` calls :func:`add_owner_commands` (on its ``owner`` parser) and
:func:`register` (the top-level ``request``). This module imports only the standard library
and :mod:`agents.cli_base` at import time; the agents and the protocol are imported when a
command runs, so building the parser (every ``ciphertwin`` call) stays cheap.

A requester (any principal holding an interact token) names the twin owner's ``public.key``
with ``--owner-key``: requests are sealed for that owner and answers are checked against it —
never against keys the cloud hands out. An owner needs neither a token nor ``--owner-key``.

Exit codes (:mod:`agents.cli_base`): 0 done (request answered ``ok``); 1 the device answered
"no" or the request expired; 2 bad input or a refusal (stale version, refused by the cloud);
3 no (final) answer within ``--timeout``. Always one ``ciphertwin: error`` line, no traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ciphertwin.agents.cli_base import (
    EXIT_FAILED, EXIT_TIMEOUT, add_common, bus_for, fail, home, identity, iso_utc,
    json_object_option, parse_time,
)
from ciphertwin.config.files import read_public_file, write_private_file
from ciphertwin.config.settings import load_deployment
from ciphertwin.errors import ValidationError

TOKEN_FILE = "interact.token"
"""Default token file in a requester's home (``--token`` overrides)."""
MAX_ATTACHMENT_BYTES = 256 * 1024
APPROVAL_FILE_TAG = "ciphertwin-approval"
RIGHTS = ("desired", "request")


# --- shared helpers ------------------------------------------------------------------------
def _exit_codes(command: Callable[[argparse.Namespace], Awaitable[int]]
                ) -> Callable[[argparse.Namespace], Awaitable[int]]:
    """No answer in time → one line and exit 3; anything else we raise on purpose stays exit 2
    (printed by the top-level handler)."""
    @functools.wraps(command)
    async def run(args: argparse.Namespace) -> int:
        from ciphertwin.agents.requester import InteractionTimeout
        from ciphertwin.bus.errors import RequestTimeout

        try:
            return await command(args)
        except (InteractionTimeout, RequestTimeout) as exc:
            return fail(str(exc), EXIT_TIMEOUT)
    return run


def _csv(text: str, what: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValidationError(f"{what}: give at least one value (comma-separated)")
    return values


def _token_path(args: argparse.Namespace) -> Path:
    return Path(args.token) if args.token else home(args) / TOKEN_FILE


def read_token(path: Path) -> Any:
    """An interact token file (public: a signed capability only its holder's key can use)."""
    from ciphertwin.crypto.tokens import InteractToken

    return InteractToken.from_bytes(read_public_file(path, 64 * 1024))


class _Principal:
    """Who a state/request command acts as — the owner itself, or a token holder — checked
    (keys, token, owner key) before any connection is made."""

    def __init__(self, args: argparse.Namespace) -> None:
        from ciphertwin.agents.identity import load_public

        self.args, self.me = args, identity(args)
        self.token: Any = None
        self.owner_key: Any = None
        if self.me.role == "owner" and not args.owner_key:
            return
        if not args.owner_key:
            raise ValidationError("give --owner-key: the twin owner's public.key file")
        self.owner_key = load_public(args.owner_key)
        path = _token_path(args)
        self.token = read_token(path)
        if self.token.holder_key != self.me.signing.verify_key or \
                self.token.principal != self.me.name:
            raise ValidationError(f"interact token {path} was issued to "
                                  f"{self.token.principal!r} with another key, not to "
                                  f"{self.me.name!r}")
        if self.token.issuer != self.owner_key.verify_key:
            raise ValidationError(f"interact token {path} was not issued by the owner of "
                                  f"{args.owner_key}")

    def actor(self, bus: Any, twin: str) -> Any:
        """An OwnerAgent's requester for ``twin`` (the owner), else a token holder's
        Requester; both offer ``send``, ``set_desired``, ``writer`` and ``reader``."""
        from ciphertwin.agents.owner import OwnerAgent
        from ciphertwin.agents.requester import Requester

        if self.token is None:
            return OwnerAgent(self.me, bus, home=home(self.args)).requester(twin)
        return Requester(self.me, bus, self.token, self.owner_key.pre,
                         self.owner_key.verify_key)


def _add_actor_options(p: argparse.ArgumentParser) -> None:
    """Options of commands both an owner and a token holder run."""
    add_common(p)
    p.add_argument("--owner-key", help="the twin owner's public.key (a token holder; an owner "
                                       "acting on its own twins leaves it out)")
    p.add_argument("--token", help=f"interact token file (default <home>/{TOKEN_FILE})")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="give up (exit 3) after this many seconds without an answer")


# --- desired / reported --------------------------------------------------------------------
async def _set_desired(args: argparse.Namespace) -> int:
    doc = json_object_option(args.doc if args.doc is not None else args.merge,
                             "--doc" if args.doc is not None else "--merge")
    if args.base_version is not None and args.base_version < 0:
        raise ValidationError("--base-version must be 0 or more")
    who = _Principal(args)
    async with bus_for(args, load_deployment(args.config)) as bus:
        actor = who.actor(bus, args.twin)
        actor.writer.timeout = args.timeout
        version = await actor.set_desired(args.twin, doc, merge=args.merge is not None,
                                          base_version=args.base_version)
    print(f"twin {args.twin}: desired state is now version {version}")
    return 0


def _doc_line(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(", ", ": "))


def format_state(state: Any) -> str:
    """A twin's state for people: versions, who wrote what when, documents and delta."""
    d, r = state.desired, state.reported
    lines = [f"twin {state.twin}: desired version {state.desired_version}, reported version "
             f"{state.reported_version}, {'in sync' if state.in_sync else 'NOT in sync'}"]
    if d is not None:
        lines.append(f"  desired  (v{d.version} by {d.writer}, {iso_utc(d.time)}): "
                     f"{_doc_line(d.doc)}")
    elif state.desired_version:
        lines.append("  desired:  (not readable by this principal)")
    if r is not None:
        lines.append(f"  reported (v{r.version} by {r.device} for desired v{r.desired_version}, "
                     f"{iso_utc(r.time)}): {_doc_line(r.state)}")
    elif state.reported_version:
        lines.append("  reported: (not readable by this principal)")
    lines.append(f"  delta: {_doc_line(state.delta)}")
    return "\n".join(lines)


async def _get_state(args: argparse.Namespace) -> int:
    who = _Principal(args)
    async with bus_for(args, load_deployment(args.config)) as bus:
        state = await who.actor(bus, args.twin).reader.state(args.twin, timeout=args.timeout)
    print(json.dumps(state.as_json(), sort_keys=True) if args.json else format_state(state))
    return 0


def format_state_change(change: Any, as_json: bool) -> str:
    """One ``state_update`` as ``watch`` prints it."""
    d, r = change.desired, change.reported
    if as_json:
        row: dict[str, Any] = {"twin": change.twin, "state": "desired" if d else "reported",
                               "desired_version": change.desired_version,
                               "reported_version": change.reported_version,
                               "in_sync": change.in_sync}
        if d is not None:
            row.update(writer=d.writer, time=d.time, doc=d.doc)
        else:
            row.update(device=r.device, time=r.time, state_doc=r.state,
                       answers_desired=r.desired_version)
        return json.dumps(row, sort_keys=True)
    sync = "in sync" if change.in_sync else "not in sync"
    if d is not None:
        return f"{iso_utc(d.time)} desired v{d.version} by {d.writer} ({sync}): {_doc_line(d.doc)}"
    return (f"{iso_utc(r.time)} reported v{r.version} by {r.device} for desired "
            f"v{r.desired_version} ({sync}): {_doc_line(r.state)}")


# --- interact tokens -----------------------------------------------------------------------
async def _grant_interact(args: argparse.Namespace) -> int:
    from ciphertwin.agents.identity import load_public
    from ciphertwin.agents.owner import OwnerAgent

    holder = load_public(args.holder_key)
    if holder.name != args.to:
        raise ValidationError(f"--holder-key is the public key of {holder.name!r}, not of "
                              f"{args.to!r}")
    rights = _csv(args.rights, "--rights")
    if bad := sorted(set(rights) - set(RIGHTS)):
        raise ValidationError(f"--rights: unknown {', '.join(bad)} (rights are "
                              f"{', '.join(RIGHTS)})")
    if not 0 < args.days <= 3660:
        raise ValidationError("--days must be within 0..3660")
    out = Path(args.out or f"{args.to}.interact-token")
    async with bus_for(args, load_deployment(args.config)) as bus:
        token = await OwnerAgent(identity(args), bus, home=home(args)).grant_interact(
            args.to, holder.verify_key, _csv(args.twin, "--twin"), rights,
            _csv(args.ops, "--ops"), valid_for_s=int(args.days * 86400))
    write_private_file(out, token.to_bytes(), 0o644)
    print(token.token_id.hex())
    print(f"interact token {token.token_id.hex()} for {args.to} (key fingerprint "
          f"{holder.fingerprint}): {','.join(token.rights)} on {','.join(token.twins)}, "
          f"operations {','.join(token.operations)}, {len(token.devices)} device(s), until "
          f"{iso_utc(token.not_after)}; written to {out}", file=sys.stderr)
    return 0


async def _revoke_interact(args: argparse.Namespace) -> int:
    from ciphertwin.agents.owner import OwnerAgent

    try:
        token_id = bytes.fromhex(args.token_id)
    except ValueError:
        raise ValidationError(f"token id must be hex, got {args.token_id!r:.40}") from None
    async with bus_for(args, load_deployment(args.config)) as bus:
        await OwnerAgent(identity(args), bus, home=home(args)).revoke_interact(token_id)
    print(f"interact token {args.token_id} revoked")
    return 0


# --- requests ------------------------------------------------------------------------------
def _attachment(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_ATTACHMENT_BYTES + 1)
    except OSError as exc:
        raise ValidationError(f"--attachment: cannot read {path!r} ({exc.strerror})") from None
    if len(data) > MAX_ATTACHMENT_BYTES:
        raise ValidationError(f"--attachment: {path!r} is larger than {MAX_ATTACHMENT_BYTES} bytes")
    return data


def _request_id(text: str | None) -> str:
    if text is None:
        return secrets.token_hex(8)
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ValidationError(f"--request-id must be 16 lower-case hex digits, got {text!r:.40}")
    return text


def write_approval(path: Path, approval: dict[str, Any], twin: str, request_id: str,
                   op: str) -> None:
    """An approval file: the approver's signature and what it approves (for a readable
    refusal when it is used for another request; the device checks the signature)."""
    write_private_file(path, json.dumps({
        "tag": APPROVAL_FILE_TAG, "approver": approval["approver"], "sig": approval["sig"].hex(),
        "twin": twin, "request_id": request_id, "op": op}).encode(), 0o644)


def read_approval(path: str, twin: str, request_id: str, op: str) -> dict[str, Any]:
    """An approval for exactly this request, as ``build_request`` takes it."""
    try:
        data = json.loads(read_public_file(path, 4096))
        if data.get("tag") != APPROVAL_FILE_TAG:
            raise ValueError("not an approval file")
        approval = {"approver": str(data["approver"]), "sig": bytes.fromhex(data["sig"])}
        made_for = (data["twin"], data["request_id"], data["op"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValidationError(f"--approval {path!r}: {exc}") from None
    if made_for != (twin, request_id, op):
        raise ValidationError(f"--approval {path!r} by {approval['approver']} approves "
                              f"{made_for[2]} on {made_for[0]} as request {made_for[1]}, not "
                              f"{op} on {twin} as request {request_id}")
    return approval


async def _request_send(args: argparse.Namespace) -> int:
    args_doc = json_object_option(args.args, "--args")
    request_id = _request_id(args.request_id)
    approvals = [read_approval(f, args.twin, request_id, args.op) for f in args.approval or []]
    attachment = _attachment(args.attachment)
    deadline = parse_time(args.deadline, time.time() + 3600, "--deadline")
    who = _Principal(args)
    async with bus_for(args, load_deployment(args.config)) as bus:
        outcome = await who.actor(bus, args.twin).send(
            args.twin, args.op, args_doc, wait=args.wait, timeout=args.timeout, wake=args.wake,
            approvals=approvals, attachment=attachment, deadline=deadline,
            request_id=request_id)
    if args.json:
        print(json.dumps(outcome.as_json(), sort_keys=True))
    answer = outcome.answer
    if outcome.state == "answered" and answer is not None:
        if not args.json:
            print(json.dumps(answer.result, sort_keys=True) if answer.ok else "")
        if not answer.ok:
            return fail(f"request {request_id}: {answer.device} refused {args.op}: "
                        f"{answer.reason}", EXIT_FAILED)
        return 0
    if outcome.state == "refused":
        return fail(f"request {request_id}: the cloud refused it: {outcome.reason}", 2)
    if outcome.state == "expired":
        return fail(f"request {request_id}: expired before any device answered "
                    f"({outcome.reason or 'deadline passed'})", EXIT_FAILED)
    if not args.json:  # not waiting: the cloud's first word
        print(f"request {request_id}: {outcome.state}"
              + (f" ({outcome.reason})" if outcome.reason else ""))
    return 0


def _request_approve(args: argparse.Namespace) -> int:
    from ciphertwin.protocol.twin_requests import sign_approval

    args_doc = json_object_option(args.args, "--args")
    request_id = _request_id(args.request_id)
    me = identity(args)
    approval = sign_approval(me.signing, me.name, args.twin, request_id, args.op, args_doc,
                             _attachment(args.attachment))
    out = Path(args.out or f"{me.name}-{request_id}.approval")
    write_approval(out, approval, args.twin, request_id, args.op)
    print(f"{me.name} approves {args.op} on {args.twin} as request {request_id}: {out}")
    return 0


def _request_new_id(args: argparse.Namespace) -> int:
    print(secrets.token_hex(8))
    return 0


def _request_sign_image(args: argparse.Namespace) -> int:
    """The image signer's signature over an attachment, as the firmware rule wants it in the
    request's arguments (``"image_sig": "<hex>"``)."""
    from ciphertwin.protocol.twin_requests import sign_image

    image = _attachment(args.attachment)
    assert image is not None
    print(sign_image(identity(args).signing, image).hex())
    return 0


# --- registration --------------------------------------------------------------------------
def _state_commands(sub: Any) -> None:
    """``set-desired`` and ``get-state`` under ``owner`` and ``request`` (same handlers)."""
    p = sub.add_parser("set-desired", help="set (or merge into) a twin's desired state")
    _add_actor_options(p)
    p.add_argument("--twin", required=True)
    doc = p.add_mutually_exclusive_group(required=True)
    doc.add_argument("--doc", help="the full desired document: JSON object or @file")
    doc.add_argument("--merge", help="a JSON merge patch (RFC 7386) on the current desired "
                                     "state; null removes a key")
    p.add_argument("--base-version", type=int,
                   help="write only if the desired state is still at this version (exit 2 "
                        "if it moved on); default: the current one")
    p.set_defaults(func=_exit_codes(_set_desired))
    p = sub.add_parser("get-state", help="desired, reported, delta and versions of a twin")
    _add_actor_options(p)
    p.add_argument("--twin", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_exit_codes(_get_state))


def add_owner_commands(osub: Any) -> None:
    """The owner's state and interact-token commands."""
    _state_commands(osub)
    p = osub.add_parser("grant-interact",
                        help="let a principal send requests / set desired state (a token)")
    add_common(p)
    p.add_argument("--to", required=True, help="the principal (its id)")
    p.add_argument("--holder-key", required=True, help="the principal's public.key file")
    p.add_argument("--twin", required=True, help="twin id(s), comma-separated")
    p.add_argument("--rights", required=True, help="request,desired (either or both)")
    p.add_argument("--ops", default="*", help="request operations allowed (default *: any)")
    p.add_argument("--days", type=float, default=30.0, help="token validity")
    p.add_argument("--out", help="token file for the principal (default <to>.interact-token)")
    p.set_defaults(func=_grant_interact)
    p = osub.add_parser("revoke-interact", help="revoke an interact token (cloud and devices)")
    add_common(p)
    p.add_argument("token_id", help="the id grant-interact printed (hex)")
    p.set_defaults(func=_revoke_interact)


def register(subparsers: Any) -> None:
    """Top-level ``request``: send, approve, new-id, and desired state through a token."""
    request = subparsers.add_parser("request", help="requests to a twin's devices (P5)")
    rsub = request.add_subparsers(dest="request_command", metavar="ACTION", required=True)
    p = rsub.add_parser("send", help="send a request; --wait for the device's answer")
    _add_actor_options(p)
    p.add_argument("--twin", required=True)
    p.add_argument("--op", required=True, help="operation, e.g. set_target")
    p.add_argument("--args", default="{}", help="arguments: JSON object or @file")
    p.add_argument("--wake", action="store_true", help="wake a sleeping device for it")
    p.add_argument("--approval", action="append", help="an approval file (repeat)")
    p.add_argument("--attachment", help=f"a file sent along (≤ {MAX_ATTACHMENT_BYTES // 1024} "
                                        "KiB, e.g. a firmware image)")
    p.add_argument("--request-id", help="16 hex digits (the one approvers signed; default new)")
    p.add_argument("--deadline", help="drop the request after this time (default: in 1 h)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the answer (exit 0 ok, 1 refused by the device or expired, "
                        "2 refused by the cloud, 3 --timeout)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_exit_codes(_request_send))
    p = rsub.add_parser("approve", help="sign an approval for one request (M-of-N rules)")
    add_common(p)
    p.add_argument("--twin", required=True)
    p.add_argument("--op", required=True)
    p.add_argument("--args", default="{}", help="the request's arguments: JSON object or @file")
    p.add_argument("--attachment", help="the file the request will carry")
    p.add_argument("--request-id", required=True, help="the requester's request id")
    p.add_argument("--out", help="approval file (default <name>-<request id>.approval)")
    p.set_defaults(func=_request_approve)
    p = rsub.add_parser("new-id", help="print a fresh request id (for approvals)")
    p.set_defaults(func=_request_new_id)
    p = rsub.add_parser("sign-image", help='sign a firmware image: prints the hex signature '
                                           'a request carries as args {"image_sig": …}')
    add_common(p)
    p.add_argument("--attachment", required=True, help="the image file")
    p.set_defaults(func=_request_sign_image)
    _state_commands(rsub)
