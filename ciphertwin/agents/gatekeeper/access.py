"""The access twin: who may change what, when, and with whose approval — decided on the device.

Why here: the cloud only sees metadata (it checks that a requester holds an owner-signed
token), but the operation and its arguments are plaintext only at the device, so rules over
operations, time windows, approvals and firmware images can only be enforced where the
plaintext is.

Rules are tried in order. A rule *applies* to a change when its principals and operations
match. An ``effect = "deny"`` rule that applies (inside its time window, if it has one)
refuses at once. An allow rule that applies allows the change if all its conditions hold
(time window, M-of-N approvals, image signature); if one fails the next rule is tried, and if
none allows, the first failure is the refusal. No applicable rule: ``default``.

Time windows are wall-clock times in the rule's zone (``zoneinfo``), so "09:00-17:00
Europe/Vienna" follows daylight-saving changes. A window may cross midnight ("22:00-06:00");
its ``days`` then name the day the window *starts* (Monday 22:00 to Tuesday 06:00 is
Monday's window).

Approvals: each approver signs ``twin_requests.approval_message`` with Ed25519 (context
``approval``: twin, request id, op, digests of arguments and attachment); M distinct configured
approvers with valid signatures are needed. Firmware: the image signer signs ``sha256(image)``
(``twin_requests.sign_image``) and the signature travels in the request arguments as
``image_sig`` (hex: arguments are JSON).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, time as dtime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ciphertwin.crypto.errors import SignatureInvalid
from ciphertwin.crypto.signing import SigningKey, VerifyKey
from ciphertwin.errors import ValidationError
from ciphertwin.protocol.twin_requests import sign_image, verify_approval, verify_image

__all__ = [
    "OWNER", "ANY", "DESIRED_OP", "AccessRule", "AccessPolicy", "AccessResult", "Change",
    "TimeWindow", "Approvals", "sign_image_hex", "IMAGE_SIG_ARG",
]

OWNER = "owner"
"""Principal name that matches the twin's owner (whatever the owner's own name is)."""
ANY = "*"
DESIRED_OP = "desired"
"""The operation name of a desired-state change (requests carry their own op)."""
IMAGE_SIG_ARG = "image_sig"
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
MAX_RULES = 64
MAX_APPROVALS = 32
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,63}|\*")
_HOURS = re.compile(r"(\d\d):(\d\d)-(\d\d):(\d\d)")


# --- what is judged ----------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    """One incoming change, already opened and authenticated: a desired doc or a request.

    ``principal`` is the author's name (the token's principal, or the owner's name) and
    ``is_owner`` says the owner's key signed it; ``ref`` identifies it in the decision log
    (request id, or ``desired:<version>``)."""

    twin: str
    principal: str
    op: str
    args: Mapping[str, Any]
    is_owner: bool = False
    ref: str = ""
    request_id: str | None = None
    approvals: Sequence[Mapping[str, Any]] = ()
    attachment: bytes | None = None


# --- signatures the access twin checks (defined with the request protocol) -------------------

def sign_image_hex(signer: SigningKey, image: bytes) -> str:
    """The ``image_sig`` argument of a firmware request (JSON arguments carry no bytes)."""
    return sign_image(signer, image).hex()


# --- configuration pieces ---------------------------------------------------------------------

def _names(value: object, what: str, default: Sequence[str] | None = None) -> tuple[str, ...]:
    if value is None and default is not None:
        return tuple(default)
    if not isinstance(value, list) or not 1 <= len(value) <= 256 or not all(
            isinstance(v, str) and _NAME.fullmatch(v) for v in value):
        raise ValidationError(f"{what} must be a list of 1..256 names ([A-Za-z0-9_.:@-], or *)")
    return tuple(value)


def _verify_key(text: object, what: str) -> VerifyKey:
    if not isinstance(text, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise ValidationError(f"{what} must be an Ed25519 public key as 64 hex digits")
    return VerifyKey(bytes.fromhex(text))


def _zone(name: object, what: str) -> ZoneInfo:
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ValidationError(f"{what} must be an IANA time zone name like 'Europe/Vienna'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValidationError(f"{what}: unknown time zone {name!r}") from None


@dataclass(frozen=True)
class TimeWindow:
    """Days and a wall-clock interval in a time zone; ``start == end`` is not allowed."""

    days: frozenset[int] = frozenset(range(7))
    start: dtime | None = None  # None: the whole day
    end: dtime | None = None  # 24:00 is stored as None (end of day)
    tz: ZoneInfo = field(default_factory=lambda: ZoneInfo("UTC"))

    @classmethod
    def from_config(cls, days: object, hours: object, tz: object, what: str) -> TimeWindow:
        day_set = frozenset(range(7))
        if days is not None:
            if not isinstance(days, list) or not 1 <= len(days) <= 7 or not all(
                    isinstance(d, str) and d.lower() in DAYS for d in days):
                raise ValidationError(f"{what}.days must be a list of {', '.join(DAYS)}")
            day_set = frozenset(DAYS.index(d.lower()) for d in days)
        start = end = None
        if hours is not None:
            m = _HOURS.fullmatch(hours) if isinstance(hours, str) else None
            if m is None:
                raise ValidationError(f"{what}.hours must look like '09:00-17:00'")
            h1, m1, h2, m2 = (int(g) for g in m.groups())
            if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
                raise ValidationError(f"{what}.hours: times are 00:00..23:59 (end may be 24:00)")
            start, end = dtime(h1, m1), None if h2 == 24 else dtime(h2, m2)
            if end == start or (end is None and start == dtime(0, 0)):
                if end is not None:
                    raise ValidationError(f"{what}.hours: start and end must differ")
                start = None  # 00:00-24:00 is the whole day
        zone = _zone("UTC" if tz is None else tz, f"{what}.tz")
        return cls(day_set, start, end, zone)

    def contains(self, when: float) -> bool:
        """Is the instant ``when`` (unix time) inside the window, in local wall-clock time?"""
        local = datetime.fromtimestamp(when, self.tz)
        if self.start is None:
            return local.weekday() in self.days
        clock = local.time().replace(tzinfo=None)
        crosses_midnight = self.end is not None and self.end < self.start
        if not crosses_midnight:
            after_start = clock >= self.start
            before_end = self.end is None or clock < self.end
            return after_start and before_end and local.weekday() in self.days
        if clock >= self.start:  # evening part: the window started today
            return local.weekday() in self.days
        if clock < self.end:  # type: ignore[operator]  # morning part: it started yesterday
            return (local.date() - timedelta(days=1)).weekday() in self.days
        return False

    def describe(self) -> str:
        days = ",".join(DAYS[d] for d in sorted(self.days)) if len(self.days) < 7 else "any day"
        if self.start is None:
            return f"{days} ({self.tz.key})"
        end = "24:00" if self.end is None else self.end.strftime("%H:%M")
        return f"{days} {self.start.strftime('%H:%M')}-{end} ({self.tz.key})"


@dataclass(frozen=True)
class Approvals:
    """M of the named approvers must have signed the request."""

    m: int
    approvers: Mapping[str, VerifyKey]

    @classmethod
    def from_config(cls, raw: object, what: str) -> Approvals:
        if not isinstance(raw, Mapping) or set(raw) != {"m", "approvers"}:
            raise ValidationError(f"{what}.approvals must be {{ m = M, approvers = {{ name = "
                                  "'<hex key>', … }} }}")
        approvers = raw["approvers"]
        if not isinstance(approvers, Mapping) or not 1 <= len(approvers) <= MAX_APPROVALS:
            raise ValidationError(f"{what}.approvals.approvers: 1..{MAX_APPROVALS} names")
        keys = {}
        for name, key in approvers.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name) or name == ANY:
                raise ValidationError(f"{what}.approvals: bad approver name {name!r}")
            keys[name] = _verify_key(key, f"{what}.approvals.approvers.{name}")
        m = raw["m"]
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= len(keys):
            raise ValidationError(f"{what}.approvals.m must be 1..{len(keys)}")
        return cls(m, keys)

    def check(self, change: Change) -> str | None:
        """None if M distinct approvers signed this very request, else why not."""
        if change.request_id is None:
            return "approvals are only possible on requests"
        if len(change.approvals) > MAX_APPROVALS:
            return f"more than {MAX_APPROVALS} approvals"
        valid: set[str] = set()
        bad: list[str] = []
        for approval in change.approvals:
            name = approval.get("approver") if isinstance(approval, Mapping) else None
            key = self.approvers.get(name) if isinstance(name, str) else None
            if key is None:
                bad.append(f"{name!s:.64} (not an approver)")
                continue
            try:
                verify_approval(approval, key, change.twin, change.request_id, change.op,
                                change.args, change.attachment)
            except (SignatureInvalid, KeyError):
                bad.append(f"{name} (signature invalid)")
                continue
            valid.add(name)
        if len(valid) >= self.m:
            return None
        extra = f"; ignored: {', '.join(sorted(bad))}" if bad else ""
        return f"needs {self.m} of {len(self.approvers)} approvals, has {len(valid)}{extra}"


def check_image(signer: VerifyKey, change: Change) -> str | None:
    """None if the attachment carries a valid ``image_sig`` by ``signer``, else why not."""
    if not change.attachment:
        return "an image attachment is required"
    sig = change.args.get(IMAGE_SIG_ARG)
    if not isinstance(sig, str) or not re.fullmatch(r"[0-9a-fA-F]{128}", sig):
        return f"argument {IMAGE_SIG_ARG} (hex Ed25519 signature over the image) is missing"
    try:
        verify_image(signer, change.attachment, bytes.fromhex(sig))
    except (SignatureInvalid, ValidationError):
        return "the image signature does not verify"
    return None


# --- rules --------------------------------------------------------------------------------------

_RULE_KEYS = {"name", "effect", "principals", "operations", "days", "hours", "tz", "silent",
              "approvals", "image_signer"}


@dataclass(frozen=True)
class AccessRule:
    name: str
    principals: tuple[str, ...]
    operations: tuple[str, ...]
    allow: bool = True
    window: TimeWindow | None = None
    approvals: Approvals | None = None
    image_signer: VerifyKey | None = None
    silent: bool = False

    @classmethod
    def from_config(cls, raw: object, index: int) -> AccessRule:
        what = f"gatekeeper.access.rule[{index}]"
        if not isinstance(raw, Mapping):
            raise ValidationError(f"{what} must be a table")
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise ValidationError(f"{what}: unknown key(s) {sorted(unknown)}")
        name = raw.get("name", f"rule-{index}")
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == ANY:
            raise ValidationError(f"{what}.name must be a short name")
        effect = raw.get("effect", "allow")
        if effect not in ("allow", "deny"):
            raise ValidationError(f"{what}.effect must be 'allow' or 'deny'")
        silent = raw.get("silent", False)
        if not isinstance(silent, bool):
            raise ValidationError(f"{what}.silent must be true or false")
        window = None
        if any(k in raw for k in ("days", "hours", "tz")):
            window = TimeWindow.from_config(raw.get("days"), raw.get("hours"), raw.get("tz"),
                                            what)
        approvals = (Approvals.from_config(raw["approvals"], what)
                     if "approvals" in raw else None)
        signer = (_verify_key(raw["image_signer"], f"{what}.image_signer")
                  if "image_signer" in raw else None)
        if effect == "deny" and (approvals or signer):
            raise ValidationError(f"{what}: a deny rule takes no approvals or image_signer")
        return cls(name=name, principals=_names(raw.get("principals"), f"{what}.principals",
                                                (ANY,)),
                   operations=_names(raw.get("operations"), f"{what}.operations", (ANY,)),
                   allow=effect == "allow", window=window, approvals=approvals,
                   image_signer=signer, silent=silent)

    def applies(self, change: Change) -> bool:
        # "owner" names the owner's key, never a requester that calls itself "owner"
        named = change.principal != OWNER and change.principal in self.principals
        who = ANY in self.principals or named or (change.is_owner and OWNER in self.principals)
        return who and (ANY in self.operations or change.op in self.operations)

    def failure(self, change: Change, now: float) -> tuple[str, str] | None:
        """(code, reason) of the first condition this change fails, or None."""
        if self.window is not None and not self.window.contains(now):
            return "window", f"outside the time window {self.window.describe()}"
        if self.approvals is not None:
            why = self.approvals.check(change)
            if why:
                return "approvals", why
        if self.image_signer is not None:
            why = check_image(self.image_signer, change)
            if why:
                return "image", why
        return None


@dataclass(frozen=True)
class AccessResult:
    allowed: bool
    rule: str
    code: str
    reason: str
    silent: bool = False


@dataclass(frozen=True)
class AccessPolicy:
    """Ordered rules plus a default; ``allow_all()`` when no [gatekeeper.access] is given."""

    rules: tuple[AccessRule, ...] = ()
    default_allow: bool = True
    default_silent: bool = False

    @classmethod
    def from_config(cls, raw: object) -> AccessPolicy:
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValidationError("[gatekeeper.access] must be a table")
        unknown = set(raw) - {"default", "silent", "rule"}
        if unknown:
            raise ValidationError(f"gatekeeper.access: unknown key(s) {sorted(unknown)}")
        default = raw.get("default", "deny")
        if default not in ("allow", "deny"):
            raise ValidationError("gatekeeper.access.default must be 'allow' or 'deny'")
        silent = raw.get("silent", False)
        if not isinstance(silent, bool):
            raise ValidationError("gatekeeper.access.silent must be true or false")
        rules = raw.get("rule", [])
        if not isinstance(rules, list) or len(rules) > MAX_RULES:
            raise ValidationError(f"gatekeeper.access.rule: at most {MAX_RULES} [[rule]] tables")
        parsed = tuple(AccessRule.from_config(r, i) for i, r in enumerate(rules))
        names = [r.name for r in parsed]
        if len(set(names)) != len(names):
            raise ValidationError("gatekeeper.access: rule names must be unique")
        return cls(parsed, default == "allow", silent)

    def decide(self, change: Change, now: float) -> AccessResult:
        first_failure: tuple[AccessRule, str, str] | None = None
        for rule in self.rules:
            if not rule.applies(change):
                continue
            if not rule.allow:
                if rule.window is None or rule.window.contains(now):
                    return AccessResult(False, rule.name, "denied",
                                        f"rule {rule.name} denies it", rule.silent)
                continue
            failure = rule.failure(change, now)
            if failure is None:
                return AccessResult(True, rule.name, "allowed", f"rule {rule.name} allows it")
            if first_failure is None:
                first_failure = (rule, *failure)
        if first_failure is not None:
            rule, code, why = first_failure
            return AccessResult(False, rule.name, code, f"rule {rule.name}: {why}", rule.silent)
        if self.default_allow:
            return AccessResult(True, "default", "allowed", "no rule applies; default allow")
        return AccessResult(False, "default", "no_rule",
                            f"no rule allows {change.op} by {change.principal}",
                            self.default_silent)
