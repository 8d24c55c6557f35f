"""Finding rewards by name: the decorator registry, ``package.module:function`` paths, and entry points.

Lookup order for a name: this process's registry (built-ins and anything decorated), then a dotted path
(the name contains ``:``), then the ``rlplat.rewards`` entry-point group of installed distributions.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ENTRY_POINT_GROUP = "rlplat.rewards"

# Modules whose import registers the built-in rewards; imported on first lookup so that `import rewards`
# stays cheap (math-verify pulls in sympy).
_BUILTIN_MODULES = ("rewards.math_reward", "rewards.code.reward", "rewards.gar", "rewards.format")


@dataclass(frozen=True)
class RewardDef:
    """A resolved reward: the callable plus how the runner must call it."""

    name: str
    fn: Callable[..., Any]
    group: bool
    is_class: bool

    @property
    def is_async(self) -> bool:
        target = self.fn.__call__ if self.is_class else self.fn
        return inspect.iscoroutinefunction(target)


_REGISTRY: dict[str, RewardDef] = {}
_builtins_loaded = False


def reward(name: str, *, group: bool = False) -> Callable[[Any], Any]:
    """Register a reward under ``name``.

    ``group=False``: ``fn(sample, **args) -> float | RewardResult``.
    ``group=True``: ``fn(samples, **args) -> list[float | RewardResult]``, one call per prompt group.
    A class is instantiated once with the reward's args and then called like a function without them.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def deco(obj: Any) -> Any:
        if not callable(obj):
            raise TypeError(f"@reward({name!r}) must decorate a function or class, got {type(obj).__name__}")
        existing = _REGISTRY.get(name)
        same = existing is not None and (
            existing.fn is obj
            # A module imported twice (reload, two import paths) re-registers its own reward: allow that.
            or (getattr(existing.fn, "__module__", None), getattr(existing.fn, "__qualname__", None))
            == (getattr(obj, "__module__", None), getattr(obj, "__qualname__", None))
        )
        if existing is not None and not same:
            raise ValueError(
                f"reward name {name!r} is already registered by {existing.fn!r}; pick another name"
            )
        obj.__rlplat_group__ = group
        _REGISTRY[name] = RewardDef(name=name, fn=obj, group=group, is_class=inspect.isclass(obj))
        return obj

    return deco


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


def _wrap(name: str, obj: Any, group: bool | None) -> RewardDef:
    if not callable(obj):
        raise TypeError(f"reward {name!r} resolved to a non-callable {type(obj).__name__}")
    is_group = bool(getattr(obj, "__rlplat_group__", False)) if group is None else group
    return RewardDef(name=name, fn=obj, group=is_group, is_class=inspect.isclass(obj))


def resolve(name: str, *, group: bool | None = None) -> RewardDef:
    """Return the reward called ``name``; ``group`` overrides the per-sample/group flag when not None."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            "a reward name must be a non-empty string: a registry name or 'package.module:function'"
        )
    _load_builtins()
    if name in _REGISTRY:
        d = _REGISTRY[name]
        return d if group is None else RewardDef(d.name, d.fn, group, d.is_class)
    if ":" in name:
        mod_name, _, attr = name.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"cannot import module {mod_name!r} for reward {name!r}: {e}") from e
        obj: Any = mod
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"module {mod_name!r} has no attribute {attr!r} (reward {name!r})")
            obj = getattr(obj, part)
        return _wrap(name, obj, group)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return _wrap(name, ep.load(), group)
    raise ValueError(
        f"unknown reward {name!r}; known: {sorted(_REGISTRY)} plus entry points {available_entry_points()}; "
        "or pass 'package.module:function'"
    )


def available_entry_points() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)
