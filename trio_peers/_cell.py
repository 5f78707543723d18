"""A latest-value broadcast cell and the receive channels that read it.

Publishing is a sync, O(1) call that never blocks: the election loop never
waits for a consumer. Each :class:`LeadershipChannel` is an independent cursor;
a slow consumer gets the newest state, not a backlog, and ``version`` (and
``term``) tell it what it skipped.
"""

from __future__ import annotations

from typing import final

import attrs
import trio

from ._util import NoPublicConstructor


@final
@attrs.frozen(kw_only=True)
class LeadershipChange:
    """One state of a peer's leadership, as delivered by :meth:`Peer.leadership`.

    .. versionadded:: 0.1
    """

    is_leader: bool
    """Whether the peer leads in this state."""
    term: int | None
    """The tenure's fencing token while leading, else ``None``. Terms of one
    name strictly increase from tenure to tenure: a consumer that sees a new
    term knows it missed a loss, even if it never saw ``is_leader=False``."""
    version: int
    """Local change counter, 0 for the initial state, +1 on every change. A
    jump of more than one means the consumer skipped states."""
    at: float
    """:func:`trio.current_time` when the change was published."""
    name: str
    """The instance name."""
    node: str
    """This peer's node id."""


@final
class LeadershipCell:
    """Holds the latest :class:`LeadershipChange`; wakes readers on change."""

    def __init__(self, name: str, node: str, now: float) -> None:
        self._name = name
        self._node = node
        self._value = LeadershipChange(
            is_leader=False, term=None, version=0, at=now, name=name, node=node
        )
        self._changed = trio.Event()
        self._closed = False

    @property
    def value(self) -> LeadershipChange:
        return self._value

    @property
    def closed(self) -> bool:
        return self._closed

    def set(self, is_leader: bool, term: int | None, now: float) -> bool:
        """Publish a state; returns True if it differs from the current one."""
        if self._closed:
            return False
        if not is_leader:
            term = None
        if (is_leader, term) == (self._value.is_leader, self._value.term):
            return False
        self._value = LeadershipChange(
            is_leader=is_leader,
            term=term,
            version=self._value.version + 1,
            at=now,
            name=self._name,
            node=self._node,
        )
        self._wake()
        return True

    def close(self) -> None:
        """No more values: readers drain the latest one they have not seen, then end."""
        if not self._closed:
            self._closed = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_newer(self, version: int) -> LeadershipChange | None:
        """Wait until the value's version exceeds ``version``; ``None`` once closed.

        Does not checkpoint when there is news already: its callers checkpoint.
        """
        while self._value.version <= version:
            if self._closed:
                return None  # noqa: ASYNC910
            await self._changed.wait()
        return self._value  # noqa: ASYNC910

    def open_channel(self) -> LeadershipChannel:
        return LeadershipChannel._create(self)


@final
class LeadershipChannel(trio.abc.ReceiveChannel[LeadershipChange], metaclass=NoPublicConstructor):
    """An independent cursor over a peer's leadership states.

    Returned by :meth:`Peer.leadership`. The first :meth:`receive` returns the
    current state at once; each later one waits for a change and returns the
    *latest* state. When the peer closes, a leader's channels deliver a final
    ``is_leader=False`` state, then :meth:`receive` raises :exc:`trio.EndOfChannel`
    (so ``async for`` ends). Every call checkpoints.

    .. versionadded:: 0.1
    """

    def __init__(self, cell: LeadershipCell) -> None:
        self._cell = cell
        self._seen: int | None = None
        self._closed = False
        self._waiting: set[trio.CancelScope] = set()  # receive() calls blocked in a wait

    async def receive(self) -> LeadershipChange:
        """Return the next state to see, or raise :exc:`trio.EndOfChannel` when the peer closed.

        Raises:
          trio.ClosedResourceError: if this channel was closed with :meth:`aclose`.
        """
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise trio.ClosedResourceError("this leadership channel was closed")
        if self._seen is None:
            value = self._cell.value
        else:
            got = None
            with trio.CancelScope() as waiting:  # aclose() cancels it
                self._waiting.add(waiting)
                try:
                    got = await self._cell.wait_newer(self._seen)
                finally:
                    self._waiting.discard(waiting)
            if self._closed:
                raise trio.ClosedResourceError("this leadership channel was closed")
            if got is None:
                raise trio.EndOfChannel
            value = got
        self._seen = value.version
        return value

    def receive_nowait(self) -> LeadershipChange:
        """Return a state not yet seen by this channel, without waiting.

        Raises:
          trio.WouldBlock: if there is no newer state.
          trio.EndOfChannel: if the peer closed and every state was seen.
        """
        if self._closed:
            raise trio.ClosedResourceError("this leadership channel was closed")
        value = self._cell.value
        if self._seen is not None and value.version <= self._seen:
            if self._cell.closed:
                raise trio.EndOfChannel
            raise trio.WouldBlock
        self._seen = value.version
        return value

    async def aclose(self) -> None:
        """Close this channel (others are unaffected): a :meth:`receive` waiting on it, in
        any task, raises :exc:`trio.ClosedResourceError`. Idempotent; checkpoints."""
        self._closed = True
        for waiting in self._waiting:
            waiting.cancel()
        await trio.lowlevel.checkpoint()
