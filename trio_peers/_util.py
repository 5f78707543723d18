"""Small helpers shared by the modules of trio-peers."""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import math
import time
from abc import ABCMeta
from collections.abc import Hashable
from typing import Any, Final, Generic, NoReturn, TypeVar, final

import trio

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)

log: Final = logging.getLogger("trio_peers")

#: An unexpected error (a bug somewhere) is logged with its traceback at most this often.
UNEXPECTED_LOG_PERIOD: Final = 60.0


class NoPublicConstructor(ABCMeta):
    """Metaclass: ``Cls(...)`` raises TypeError; the library builds with ``Cls._create(...)``."""

    def __call__(cls, *args: object, **kwargs: object) -> None:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor")

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]


class SharedLog:
    """Which conditions are worth one log line among the peers that share this object.

    Each peer :meth:`enter` s a condition (a missing table, a kind of fault) when it meets
    it and :meth:`leave` s it when it ends (or the peer closes). A session's names share
    one, so an outage is logged once for all of them rather than once per name; a peer of
    its own has one to itself. Sync.
    """

    def __init__(self, note: str = "") -> None:
        self.note = note  # appended to the lines logged for all of the sharers
        self._counts: collections.Counter[Hashable] = collections.Counter()
        self._next_at: dict[Hashable, float] = {}

    def enter(self, key: Hashable) -> bool:
        """One more peer meets ``key``; True if it is the first (log it)."""
        self._counts[key] += 1
        return self._counts[key] == 1

    def due(self, key: Hashable, now: float, period: float) -> bool:
        """True at most once per ``period`` seconds (of ``now``'s clock) for ``key`` among
        the sharers: a condition that has no end to log, logged now and then."""
        if now < self._next_at.get(key, -math.inf):
            return False
        self._next_at[key] = now + period
        return True

    def leave(self, key: Hashable) -> bool:
        """One peer less meets ``key``; True if it was the last (log the recovery)."""
        left = self._counts[key] - 1
        if left > 0:
            self._counts[key] = left
            return False
        del self._counts[key]
        return True


def fixup_module_metadata(module_name: str, namespace: dict[str, object]) -> None:
    """Make public names report ``module_name`` as their module (as trio does)."""
    for name, obj in namespace.items():
        if name.startswith("_"):
            continue
        mod = getattr(obj, "__module__", None)
        if isinstance(mod, str) and mod.startswith(module_name + "._"):
            try:
                obj.__module__ = module_name
            except (AttributeError, TypeError):  # pragma: no cover - builtins
                continue


def unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception a user should see for ``group`` (trio-websocket's rules).

    A single non-Cancelled exception is returned as itself; all-Cancelled
    returns one Cancelled; a KeyboardInterrupt wins; anything else stays the group.
    Only for groups made by our own nurseries: an exception group raised by a
    user's ``async with`` body is never passed here (it comes out as raised).
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if isinstance(leaf, KeyboardInterrupt):
            return leaf
    real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
    if not real:
        return leaves[0]
    if len(real) == 1:
        return real[0]
    return group


def raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Raise :func:`unwrap` of ``group``, keeping the exception's own context."""
    exc = unwrap(group)
    if exc is group:
        raise group
    context = exc.__context__
    try:
        raise exc
    finally:
        exc.__context__ = context
        del exc, group


def raise_after_body(
    group: BaseExceptionGroup[BaseException], body_error: BaseException | None
) -> NoReturn:
    """Raise what ends a block whose own tasks failed (``group``) after or while its body ran.

    The body's exception as it was raised (the tasks' failure is its ``__context__``), unless
    the body was merely cancelled by that failure: a :exc:`trio.Cancelled` must not leave
    the block whose nursery cancelled it, so the failure is raised instead (as one exception
    if it is one, else the group).
    """
    if body_error is not None and not isinstance(body_error, trio.Cancelled):
        raise body_error
    raise_single(group)


class Deadlines(Generic[K]):
    """One pending deadline per key, earliest first: a session's timer and its watchdog. Sync.

    :meth:`put` replaces the key's earlier deadline. The heap holds ``(when, token)``
    pairs, tuples of a float and an int, which the garbage collector stops tracking: an
    entry waits a second or more, and at 1,000 names entries holding their key would be
    1,000 objects per round surviving into the oldest generation, each full collection
    of the process walking them all (docs/performance.rst).
    """

    __slots__ = ("_heap", "_keys", "_seq", "_tokens")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._keys: dict[int, K] = {}  # live token -> its key
        self._tokens: dict[K, int] = {}  # key -> its live token
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._tokens)

    @property
    def earliest(self) -> float:
        """The earliest entry's deadline (perhaps of a replaced one: a harmless early
        wake-up), or ``inf``."""
        return self._heap[0][0] if self._heap else math.inf

    def put(self, key: K, when: float) -> bool:
        """``key`` is due at ``when`` (its earlier deadline is dropped). True if this is now
        the earliest deadline (a waiter should look again)."""
        token = next(self._seq)
        old = self._tokens.get(key)
        if old is not None:
            del self._keys[old]
        self._tokens[key] = token
        self._keys[token] = key
        heapq.heappush(self._heap, (when, token))
        return self._heap[0][1] == token

    def discard(self, key: K) -> None:
        """Drop ``key``'s deadline, if any."""
        token = self._tokens.pop(key, None)
        if token is not None:
            del self._keys[token]

    def pop_due(self, now: float) -> K | None:
        """Remove and return one key due by ``now``, or None if none is."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, token = heapq.heappop(heap)
            key = self._keys.pop(token, None)
            if key is not None:
                del self._tokens[key]
                return key
        return None


@final
class ErrorLog:
    """Logs unexpected errors at ERROR with a traceback: the first one, then at most one per
    period (counting the ones suppressed), so a bug costs leadership, not the log.

    ``consequence`` ends each line: what the peer does about the error, and what to do.
    """

    def __init__(
        self,
        period: float = UNEXPECTED_LOG_PERIOD,
        *,
        consequence: str = "stepping down and retrying. Please report this as a bug.",
    ) -> None:
        self._period = period
        self._consequence = consequence
        self._next_at = -math.inf
        self._suppressed = 0

    def report(self, who: str, where: str, exc: BaseException) -> None:
        now = time.monotonic()  # paces the log only; decides nothing
        if now < self._next_at:
            self._suppressed += 1
            log.debug("trio-peers %s: unexpected error in %s again", who, where, exc_info=exc)
            return
        suppressed, self._suppressed = self._suppressed, 0
        self._next_at = now + self._period
        log.error(
            "trio-peers %s: unexpected error in %s (%d more since the last report); %s",
            who,
            where,
            suppressed,
            self._consequence,
            exc_info=exc,
        )
