"""Session slots: the call limit, reserved before the first ``await`` of an offer.

A slot is taken synchronously when an offer arrives (so twelve offers at once under a limit
of eight give eight sessions, not twelve), starts *pending* and becomes *live* when its peer
connection connects. Pending slots have their own limits, overall and per client, so offers
that never connect cannot fill the server; ``sessions.connect_timeout_s`` ends them.

=============================  ==================================================  =======
limit                          refusal                                             status
=============================  ==================================================  =======
``sessions.max_concurrent``    ``server_full`` (+ ``Retry-After``)                 503
``sessions.max_pending``       ``server_full``: too many calls connecting          503
``max_pending_per_client``     ``too_many_pending``: this client's offers have     429
                               not connected yet (+ ``Retry-After``)
=============================  ==================================================  =======
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from common.errors import ServerFull

__all__ = ["Slot", "SessionSlots", "TooManyPending"]


class TooManyPending(ServerFull):
    status = 429
    code = "too_many_pending"


@dataclass(eq=False)
class Slot:
    """One reserved session place; ``connected()`` once, ``release()`` when the call ends
    (both idempotent)."""

    owner: SessionSlots
    client: str
    pending: bool = True
    released: bool = False

    def connected(self) -> None:
        self.owner._connected(self)

    def release(self) -> None:
        self.owner._release(self)


@dataclass
class SessionSlots:
    max_live: int
    max_pending: int
    max_pending_per_client: int
    retry_after_s: int = 5
    # called after a slot is taken, connects or is given back (a cluster node republishes)
    on_change: Callable[[], None] | None = None
    _slots: set[Slot] = field(default_factory=set)
    _pending_by_client: Counter[str] = field(default_factory=Counter)

    @property
    def taken(self) -> int:
        return len(self._slots)

    @property
    def pending(self) -> int:
        return sum(self._pending_by_client.values())

    def reserve(self, client: str) -> Slot:
        """A pending slot for ``client``, or :class:`ServerFull` / :class:`TooManyPending`.
        Synchronous: nothing can take the same place between the check and the count."""
        if len(self._slots) >= self.max_live:
            raise ServerFull(f"the server is at its limit of {self.max_live} sessions",
                             retry_after_s=self.retry_after_s)
        if self._pending_by_client[client] >= self.max_pending_per_client:
            raise TooManyPending(
                f"{self.max_pending_per_client} of your calls are still connecting; finish or "
                "end them first (sessions.max_pending_per_client)",
                retry_after_s=self.retry_after_s,
            )
        if self.pending >= self.max_pending:
            raise ServerFull(
                f"{self.max_pending} calls are connecting already; try again shortly "
                "(sessions.max_pending)",
                retry_after_s=self.retry_after_s,
            )
        slot = Slot(self, client)
        self._slots.add(slot)
        self._pending_by_client[client] += 1
        if self.on_change is not None:
            self.on_change()
        return slot

    def _connected(self, slot: Slot) -> None:
        if slot.pending and not slot.released:
            slot.pending = False
            self._uncount_pending(slot.client)
            if self.on_change is not None:
                self.on_change()

    def _release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        self._slots.discard(slot)
        if slot.pending:
            slot.pending = False
            self._uncount_pending(slot.client)
        if self.on_change is not None:
            self.on_change()

    def _uncount_pending(self, client: str) -> None:
        self._pending_by_client[client] -= 1
        if self._pending_by_client[client] <= 0:
            del self._pending_by_client[client]
