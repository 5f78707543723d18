"""Small helpers shared by the modules of trio-peers."""

from __future__ import annotations

import collections
from abc import ABCMeta
from collections.abc import Hashable
from typing import Any, NoReturn, TypeVar

import trio

T = TypeVar("T")


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

    def enter(self, key: Hashable) -> bool:
        """One more peer meets ``key``; True if it is the first (log it)."""
        self._counts[key] += 1
        return self._counts[key] == 1

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
