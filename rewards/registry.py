"""Finding rewards by name: the decorator registry, ``module:function`` and ``file.py:function`` paths, and
entry points.

Lookup order for a name: this process's registry (built-ins and anything decorated), then a path (the name
contains ``:``; the part before it is a dotted module, or a ``.py`` file when it ends in ``.py``), then the
``rlplat.rewards`` entry-point group of installed distributions. ``@reward("name")`` only registers when its
module is imported, and a reward worker imports nothing of the user's by itself, so a module or file that
defines decorated rewards is named in ``rewards.plugins`` (``import_plugin``) or shipped as an entry point;
an entry point may name a function (``pkg.mod:fn``) or a whole module (``pkg.mod``) whose decorators register
its rewards when it is loaded.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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
        # A module imported twice (reload; as a dotted module and as a file path) re-registers its own
        # reward: allow that, it is the same definition.
        same = existing is not None and (existing.fn is obj or _origin(existing.fn) == _origin(obj))
        if existing is not None and not same:
            raise ValueError(
                f"reward name {name!r} is already registered by {existing.fn!r}; pick another name"
            )
        obj.__rlplat_group__ = group
        _REGISTRY[name] = RewardDef(name=name, fn=obj, group=group, is_class=inspect.isclass(obj))
        return obj

    return deco


def _origin(obj: Any) -> tuple[str | None, str | None]:
    """(source file, qualified name): the identity of a definition, whatever name its module was imported as."""
    try:
        source = inspect.getsourcefile(obj)
    except TypeError:  # builtins and C callables have no source file
        source = None
    name = getattr(obj, "__qualname__", None)
    if source is None:
        return getattr(obj, "__module__", None), name
    return str(Path(source).resolve()), name


def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for mod in _BUILTIN_MODULES:
            importlib.import_module(mod)


_FILE_MODULES: dict[Path, ModuleType] = {}


def _import_file(ref: str, what: str) -> ModuleType:
    """Import a ``.py`` file by path, once per process (a second import would register its rewards again)."""
    path = Path(ref).expanduser()
    # A relative path is resolved against the working directory, as a shell would: the driver's, and in a
    # reward worker its own (Ray starts local workers in the driver's directory and `ray job submit` workers
    # in the job's copy of --working-dir, so a path relative to the project root works in both).
    path = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    if not path.is_file():
        raise ValueError(
            f"{what}: no such file {ref!r} (looked for {path}; a relative path is resolved against the "
            f"working directory {Path.cwd()})"
        )
    # A stable, unique module name: two plugin files may share a stem, and classes and dataclasses defined in
    # the file need their module in sys.modules while it runs.
    digest = hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()
    mod_name = f"rlplat_plugin_{path.stem.replace('-', '_')}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{what}: {path} cannot be imported as Python source; give a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ValueError(f"{what}: importing {path} failed with {type(e).__name__}: {e}") from e
    _FILE_MODULES[path] = module
    return module


def import_plugin(ref: str) -> ModuleType:
    """Import a plugin module (``pkg.module``) or file (``path/to/file.py``) so its ``@reward`` names register.

    Idempotent: importing the same module or file again returns it without re-running it.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError(
            f"a reward plugin is a module name or a .py file path, got {ref!r}; e.g. 'my_pkg.rewards' "
            "or 'path/to/my_rewards.py'"
        )
    if ref.endswith(".py"):
        return _import_file(ref, f"reward plugin {ref!r}")
    try:
        return importlib.import_module(ref)
    except ImportError as e:
        raise ValueError(
            f"cannot import reward plugin module {ref!r}: {e}; is its package installed or on PYTHONPATH? "
            "A file can be given as 'path/to/file.py'"
        ) from e


def _wrap(name: str, obj: Any, group: bool | None) -> RewardDef:
    if not callable(obj):
        raise TypeError(f"reward {name!r} resolved to a non-callable {type(obj).__name__}")
    is_group = bool(getattr(obj, "__rlplat_group__", False)) if group is None else group
    return RewardDef(name=name, fn=obj, group=is_group, is_class=inspect.isclass(obj))


def _registered(name: str, group: bool | None) -> RewardDef | None:
    d = _REGISTRY.get(name)
    if d is None or group is None:
        return d
    return RewardDef(d.name, d.fn, group, d.is_class)


def _resolve_path(name: str, group: bool | None) -> RewardDef:
    # rpartition: a function name has no ':', a file path may (a Windows drive).
    where, _, attr = name.rpartition(":")
    if not where or not attr:
        raise ValueError(
            f"reward {name!r} is not of the form 'package.module:function' or 'path/to/file.py:function'"
        )
    if where.endswith(".py"):
        mod = _import_file(where, f"reward {name!r}")
    else:
        try:
            mod = importlib.import_module(where)
        except ImportError as e:
            raise ValueError(
                f"cannot import module {where!r} for reward {name!r}: {e}; is it installed or on "
                "PYTHONPATH? A file can be given as 'path/to/file.py:function'"
            ) from e
    obj: Any = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where!r} has no attribute {attr!r} (reward {name!r})")
        obj = getattr(obj, part)
    return _wrap(name, obj, group)


def resolve(name: str, *, group: bool | None = None) -> RewardDef:
    """Return the reward called ``name``; ``group`` overrides the per-sample/group flag when not None."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(
            "a reward name must be a non-empty string: a registry name, 'package.module:function' or "
            "'path/to/file.py:function'"
        )
    _load_builtins()
    if (d := _registered(name, group)) is not None:
        return d
    if ":" in name:
        return _resolve_path(name, group)
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in entry_points:
        if ep.name == name:
            obj = ep.load()
            if not isinstance(obj, ModuleType):
                return _wrap(name, obj, group)
            # A module entry point registers its rewards by being imported.
            if (d := _registered(name, group)) is not None:
                return d
            raise ValueError(
                f"entry point {name!r} loaded module {obj.__name__!r}, which registers no reward named "
                f"{name!r} (it registers {sorted(_REGISTRY)}); decorate one with @reward({name!r})"
            )
    # Decorated names need not match an entry point's name: a module entry point may register several.
    broken = []
    for ep in entry_points:
        if ep.attr is None:
            try:
                ep.load()
            except Exception as e:  # another package's broken plugin must not hide this one's message
                broken.append(f"{ep.name} ({ep.value}): {type(e).__name__}: {e}")
    if (d := _registered(name, group)) is not None:
        return d
    failed = f" Entry points that failed to load: {broken}." if broken else ""
    raise ValueError(
        f"unknown reward {name!r}; known: {sorted(_REGISTRY)} plus entry points {available_entry_points()}."
        f"{failed} "
        "A reward defined with @reward in your own module or file becomes known when it is imported: list it "
        "in rewards.plugins (e.g. ['path/to/my_rewards.py']), or name it as 'path/to/my_rewards.py:function' "
        "or 'package.module:function'"
    )


def available_entry_points() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def registered() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)
