"""Swapping an attribute of a library for the duration of a call, for the calling thread only.

:func:`swapped` puts a :class:`_Dispatcher` in place of the attribute the first time any thread needs it,
and puts the original back when the last thread leaves. While installed, the dispatcher routes each
use (a call, an attribute read, ``isinstance``, binding as a method) to the replacement of the thread
that is using it, or to the original on every other thread. So two loads on two threads each see their
own hook, and unrelated work sees the library untouched; the lock is held only to install and remove
the dispatcher, never for the duration of the call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

logger = logging.getLogger(__name__)

_install_lock = threading.Lock()
_installed: dict[tuple[Any, str], tuple[_Dispatcher, int]] = {}
_warned: set[str] = set()
_warned_lock = threading.Lock()


class _Dispatcher:
    """Stands where the original attribute stood; behaves as this thread's replacement, or as the original."""

    def __init__(self, original: Any) -> None:
        self._original = original
        self._local = threading.local()

    def current(self) -> Any:
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else self._original

    def push(self, replacement: Any) -> None:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        stack.append(replacement)

    def pop(self) -> None:
        self._local.stack.pop()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.current()(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        # as a class attribute (a method): bind the current target the way Python would have bound it
        target = self.current()
        get = getattr(type(target), "__get__", None)
        return get(target, obj, objtype) if get is not None else target

    def __instancecheck__(self, obj: Any) -> bool:
        return isinstance(obj, self.current())

    def __subclasscheck__(self, cls: type) -> bool:
        return issubclass(cls, self.current())

    def __repr__(self) -> str:
        return f"<LoRA Studio dispatcher for {self.current()!r}>"


def _raw(owner: Any, name: str) -> Any:
    """The attribute as stored (no descriptor binding): a class's own dict entry, or a module's global."""
    if isinstance(owner, type):
        for klass in owner.__mro__:
            if name in vars(klass):
                return vars(klass)[name]
        raise AttributeError(f"{owner.__qualname__} has no attribute {name!r}")
    return getattr(owner, name)


@contextmanager
def swapped(owner: Any, name: str, replacement: Any) -> Iterator[None]:
    """While inside, ``owner.<name>`` used from this thread is ``replacement``; other threads see the original.

    ``owner`` is a module or a class. Nested and concurrent uses are fine; the original is put back when
    the last user leaves. Raises AttributeError (before changing anything) if ``owner`` has no ``name``.
    """
    key = (owner, name)
    with _install_lock:
        entry = _installed.get(key)
        if entry is None or _raw(owner, name) is not entry[0]:  # first user, or someone replaced ours meanwhile
            dispatcher = _Dispatcher(_raw(owner, name))
            setattr(owner, name, dispatcher)
            entry = (dispatcher, 0)
        dispatcher = entry[0]
        _installed[key] = (dispatcher, entry[1] + 1)
    dispatcher.push(replacement)
    try:
        yield
    finally:
        dispatcher.pop()
        with _install_lock:
            current, users = _installed.get(key, (None, 0))
            if current is dispatcher:
                if users <= 1:
                    del _installed[key]
                    if _raw_or_none(owner, name) is dispatcher:
                        _restore(owner, name, dispatcher._original)
                else:
                    _installed[key] = (dispatcher, users - 1)


def _raw_or_none(owner: Any, name: str) -> Any:
    try:
        return _raw(owner, name)
    except AttributeError:
        return None


def _restore(owner: Any, name: str, original: Any) -> None:
    if isinstance(owner, type) and name not in vars(owner):
        return  # not ours to touch: only an own attribute is ever replaced (setattr on the class)
    if isinstance(owner, type) and not _defined_here(owner, name, original):
        delattr(owner, name)  # it was inherited: removing ours shows the base class's again
        return
    setattr(owner, name, original)


def _defined_here(owner: type, name: str, original: Any) -> bool:
    return all(vars(klass).get(name) is not original for klass in owner.__mro__[1:])


def is_swapped_in(owner: Any, name: str) -> bool:
    """Whether a dispatcher of :func:`swapped` currently stands at ``owner.<name>`` (for self-checks and tests)."""
    return isinstance(_raw_or_none(owner, name), _Dispatcher)


def original_of(value: Any) -> Any:
    """``value`` itself, or what a dispatcher found in its place stands for."""
    return value._original if isinstance(value, _Dispatcher) else value


def warn_inactive(hook: str, reason: str) -> None:
    """Log once per hook and process that ``hook`` does not apply and the plain library path is used."""
    with _warned_lock:
        if hook in _warned:
            return
        _warned.add(hook)
    logger.warning("LoRA Studio's %s hook is inactive (%s); using the library's plain path", hook, reason)


def forget_warnings() -> None:
    """Let every hook warn again (for tests)."""
    with _warned_lock:
        _warned.clear()


def import_target(module_name: str) -> tuple[types.ModuleType | None, str]:
    """The module, or None and why it cannot be imported."""
    try:
        return importlib.import_module(module_name), ""
    except Exception as exc:  # noqa: BLE001 - a moved or broken private module: the hook is off, nothing breaks
        return None, f"{module_name} cannot be imported ({type(exc).__name__}: {exc})"


@functools.lru_cache(maxsize=256)
def code_uses_name(code_owner: Any, name: str) -> bool:
    """Whether any function of ``code_owner`` (a module, class or function, nested code included) names ``name``.

    A hook that replaces a name the library no longer looks up would silently do nothing; this finds that.
    Cached: library code does not change while the process runs.
    """
    return any(name in code.co_names for code in _code_objects(code_owner))


def _code_objects(code_owner: Any) -> Iterator[types.CodeType]:
    if inspect.isfunction(code_owner):
        yield from _nested(code_owner.__code__)
        return
    module_name = code_owner.__name__ if inspect.ismodule(code_owner) else code_owner.__module__
    for value in vars(code_owner).values():
        function = getattr(value, "__func__", value)  # staticmethod / classmethod
        if inspect.isfunction(function) and function.__module__ == module_name:
            yield from _nested(function.__code__)
        elif inspect.isclass(value) and value.__module__ == module_name and value is not code_owner:
            yield from _code_objects(value)


def _nested(code: types.CodeType) -> Iterator[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _nested(const)
