"""The grants the cloud holds: which receiver may get which twins' items, under which policy.

The policy is parsed once here so matching an item against every grant is a set test; the
re-key itself stays bytes (it is parsed inside the re-encryption workers).
"""

from __future__ import annotations

from dataclasses import dataclass

from ciphertwin.cloud_twin.store import Grant, TwinStore
from ciphertwin.crypto.policy import Policy


@dataclass(frozen=True, slots=True)
class ActiveGrant:
    grant: Grant
    policy: Policy

    @property
    def grant_id(self) -> str:
        return self.grant.grant_id


class GrantBook:
    """Active grants, indexed by twin; changes apply at once (memory and store together)."""

    def __init__(self, store: TwinStore) -> None:
        self.store = store
        self._by_id: dict[str, ActiveGrant] = {}
        self._by_twin: dict[str, dict[str, ActiveGrant]] = {}
        """twin -> grant id -> grant: per-item lookups cost what the twin has, not what the
        cloud holds (tens of thousands of grants with many users)."""

    async def load(self) -> None:
        for grant in await self.store.active_grants():
            self._add(ActiveGrant(grant, Policy.parse(grant.policy)))

    def _add(self, active: ActiveGrant) -> None:
        self._by_id[active.grant_id] = active
        for twin in active.grant.twins:
            self._by_twin.setdefault(twin, {})[active.grant_id] = active

    def _remove(self, active: ActiveGrant) -> None:
        del self._by_id[active.grant_id]
        for twin in active.grant.twins:
            of_twin = self._by_twin.get(twin, {})
            of_twin.pop(active.grant_id, None)
            if not of_twin:
                self._by_twin.pop(twin, None)

    async def install(self, grant: Grant) -> bool:
        """Install or replace (same owner, same id) a grant; False if the id is another
        owner's. Replacing drops the old grant's cached re-encryptions (old policy)."""
        existing = self._by_id.get(grant.grant_id)
        if existing is not None:
            if existing.grant.owner != grant.owner:
                return False
            await self.revoke(grant.owner, grant.grant_id, grant.created)
        active = ActiveGrant(grant, Policy.parse(grant.policy))
        await self.store.put_grant(grant)
        self._add(active)
        return True

    async def revoke(self, owner: str, grant_id: str, at: float) -> bool:
        found = self._by_id.get(grant_id)
        if found is None or found.grant.owner != owner:
            return False
        self._remove(found)  # memory first: nothing more is re-encrypted from now on
        await self.store.revoke_grant(owner, grant_id, at)
        return True

    def get(self, grant_id: str) -> ActiveGrant | None:
        return self._by_id.get(grant_id)

    def matching(self, twin: str, attributes: tuple[str, ...]) -> list[ActiveGrant]:
        """Grants over ``twin`` whose policy the attributes satisfy."""
        return [g for g in self._by_twin.get(twin, {}).values() if g.policy.allows(attributes)]

    def owned_by(self, owner: str) -> list[ActiveGrant]:
        return [g for g in self._by_id.values() if g.grant.owner == owner]

    def of_twin(self, twin: str) -> list[ActiveGrant]:
        """Every active grant over ``twin`` (whatever its policy)."""
        return list(self._by_twin.get(twin, {}).values())

    def of_receiver(self, receiver: str, twin: str) -> list[ActiveGrant]:
        return [g for g in self._by_twin.get(twin, {}).values() if g.grant.receiver == receiver]
