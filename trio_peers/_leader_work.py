"""Leader-only work: scopes bound to one tenure, and their supervision, for one peer.

A :class:`LeaderWork` holds the peer's active :class:`LeaderScope` s: it binds each one to
the tenure it runs under (cancelled when that tenure ends, its deadline the trust deadline),
tells whether work of an ended tenure is still winding down (the core holds bids meanwhile),
waits for it at stop, and reports work that ignores cancellation. The peer decides when
tenures begin and end; this module only carries that out for the work.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Final, final

import trio

log: Final = logging.getLogger("trio_peers")

_current_term: contextvars.ContextVar[int] = contextvars.ContextVar("trio_peers_current_term")


def current_term() -> int:
    """The fencing term of the tenure the calling leader-only work runs under.

    Call it from inside :meth:`Peer.run_while_leader` work or a
    :meth:`Peer.leader_scope` block, and pass it to downstream writes so that
    they can reject a stale leader.

    Raises:
      RuntimeError: when not called from leader-only work.

    .. versionadded:: 0.1
    """
    try:
        return _current_term.get()
    except LookupError:
        raise RuntimeError(
            "trio_peers.current_term() called outside leader-only work "
            "(Peer.run_while_leader or Peer.leader_scope)"
        ) from None


@final
class LeaderScope:
    """Leader-only work's handle, from :meth:`Peer.leader_scope`.

    .. versionadded:: 0.1
    """

    def __init__(self, term: int, cancel_scope: trio.CancelScope, owner: str) -> None:
        self.owner: str = owner
        """What runs in the scope (the function's name), for log messages."""
        self.term: int = term
        """The tenure's fencing token."""
        self.cancel_scope: trio.CancelScope = cancel_scope
        """Cancelled when the tenure ends; its deadline tracks local trust. The block may
        cancel it itself to leave early: that ends no tenure (:attr:`lost` stays False)."""
        self.lost: bool = False
        """True once the tenure ended while the block ran."""
        self.ended = False  # the peer cancelled the scope: its tenure ended
        self.done = trio.Event()
        """Set when the block has finished (after any cancellation)."""
        self.watched = False
        self.overrun_logged = False


def _ended(scope: LeaderScope, now: float) -> bool:
    """Whether ``scope``'s tenure has ended: the peer said so, or its trust deadline (the
    scope's deadline, which the peer moves on each renewal) has passed."""
    return scope.ended or now >= scope.cancel_scope.deadline


@final
class LeaderWork:
    """The leader-only work of one peer (``name`` on ``node``)."""

    def __init__(self, name: str, node: str, cleanup_timeout: float) -> None:
        self.scopes: set[LeaderScope] = set()
        """The active scopes (of the current tenure, or of ended ones winding down)."""
        self.nursery: trio.Nursery | None = None
        """Where overrun watchers run (the peer's), once it serves."""
        self._name = name
        self._node = node
        self._cleanup_timeout = cleanup_timeout

    @contextlib.contextmanager
    def tenure_scope(
        self, term: int, owner: str, deadline: float, on_wound_down: Callable[[], None]
    ) -> Iterator[LeaderScope]:
        """Run a block as work of tenure ``term`` until ``deadline`` (moved by :meth:`bind`).

        ``on_wound_down()`` is called when the block ended because its tenure had, and no
        other work of an ended tenure still runs.
        """
        # No checkpoint between the caller learning the term and the scope being bound.
        cancel_scope = trio.CancelScope(deadline=deadline)
        scope = LeaderScope(term, cancel_scope, owner)
        self.scopes.add(scope)
        token = _current_term.set(term)
        try:
            with cancel_scope:
                yield scope
        finally:
            _current_term.reset(token)
            self.scopes.discard(scope)
            # (Not cancel_called: the block may cancel the scope itself, to leave early,
            # while its tenure goes on.)
            scope.lost = _ended(scope, trio.current_time())
            scope.done.set()
            if scope.lost and not self.winding_down():
                on_wound_down()

    def bind(self, term: int | None, deadline: float, *, watch: bool) -> None:
        """The peer leads in ``term`` (``None``: it does not) until ``deadline``: cancel the
        work of any other tenure (and, if ``watch``, report it should it not stop within
        ``cleanup_timeout``), and move the deadline of the current tenure's work."""
        for scope in self.scopes:
            if term != scope.term:
                scope.ended = True
                scope.cancel_scope.cancel()
                if watch:
                    self._watch_overrun_soon(scope)
            else:
                scope.cancel_scope.deadline = deadline

    def winding_down(self) -> bool:
        """Work of an ended tenure is still running (cancelled, not done). Work that left
        its scope early by cancelling it itself is not: its tenure goes on, and holding the
        bids for it would stop the renewals of a healthy leader."""
        if not self.scopes:
            return False  # (each round asks)
        now = trio.current_time()
        return any(_ended(scope, now) for scope in self.scopes)

    async def wait_stopped(self) -> bool:
        """Wait for cancelled work to finish. False if it overran ``cleanup_timeout``."""
        if not self.scopes:
            return True  # noqa: ASYNC910 - on the shutdown hot path; callers await next
        with trio.move_on_after(self._cleanup_timeout, shield=True):
            while self.scopes:
                await next(iter(self.scopes)).done.wait()
            return True  # noqa: ASYNC910
        for scope in self.scopes:
            self._report_overrun(scope)
        return False

    def _watch_overrun_soon(self, scope: LeaderScope) -> None:
        if self.nursery is not None and not scope.watched:
            scope.watched = True  # one watcher per scope
            self.nursery.start_soon(self._watch_overrun, scope)

    async def _watch_overrun(self, scope: LeaderScope) -> None:
        with trio.move_on_after(self._cleanup_timeout):
            await scope.done.wait()
            return
        self._report_overrun(scope)

    def _report_overrun(self, scope: LeaderScope) -> None:
        if scope.overrun_logged:
            return
        scope.overrun_logged = True
        log.error(
            "trio-peers %s: leader-only work %s (term %d) ignored cancellation for %.1fs; "
            "%s neither bids nor releases the lease while it runs: the lease lapses",
            self._name,
            scope.owner,
            scope.term,
            self._cleanup_timeout,
            self._node,
        )
