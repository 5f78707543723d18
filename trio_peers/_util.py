"""Small helpers shared by the modules of trio-peers."""

from __future__ import annotations

from abc import ABCMeta
from typing import Any, TypeVar

T = TypeVar("T")


class NoPublicConstructor(ABCMeta):
    """Metaclass: ``Cls(...)`` raises TypeError; the library builds with ``Cls._create(...)``."""

    def __call__(cls, *args: object, **kwargs: object) -> None:
        raise TypeError(f"{cls.__module__}.{cls.__qualname__} has no public constructor")

    def _create(cls: type[T], *args: Any, **kwargs: Any) -> T:
        return super().__call__(*args, **kwargs)  # type: ignore[misc,no-any-return]


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
