"""The base of every options dataclass: a stage's config-file section (``ClipConfig``,
``ConceptsConfig``, ...) and a fitted defence's fit options (``IARFitConfig``, ...).

:meth:`Config.from_dict` builds one from a mapping (a config file's section), rejecting
unknown keys with the valid ones named, checking each value's type and running the
class's own :meth:`Config.validate`. :meth:`Config.override` is the one way the command
line changes a config: the flags a user gave, over the config file's values, checked the
same way. :meth:`Config.replace` is the programmatic copy with changes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping


def type_matches(value, hint) -> bool:
    """Whether a config value (as YAML or JSON gives it) fits a field's annotation: int (not bool),
    float (an int is fine), str, bool, ``list[X]``, ``tuple[X, ...]``, ``dict``, ``X | None``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(type_matches(v, args[0]) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


class _Null:
    """The type of :data:`NULL`."""

    def __repr__(self) -> str:
        return "NULL"


NULL = _Null()
"""A command-line value that sets an option to None (in :meth:`Config.override` a plain None
means "flag not given"), e.g. ``daco retrieve --min-evidence none``."""


class Config:
    """Mixin for an options dataclass (see the module docstring)."""

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "config"):
        """Build from a config section; unknown keys and invalid values name ``where``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{where}: unknown option(s) {unknown}; valid: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if not type_matches(value, hints[name]):
                raise ValueError(f"{where}.{name}: {value!r} is a {type(value).__name__}; expected "
                                 f"{_type_name(hints[name])}")
        cfg = cls(**data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str) -> None:
        """Raise ValueError naming ``where`` and the option when a value is invalid."""

    def checked(self, where: str):
        """This config after the checks of :meth:`from_dict` (for one built directly, not from a file)."""
        return type(self).from_dict(self._values(), where)

    def replace(self, **changes):
        """A validated copy with ``changes`` applied (None sets an option to None)."""
        return type(self).from_dict({**self._values(), **changes}, type(self).__name__)

    def override(self, changes: Mapping, where: str):
        """A validated copy with the command line's ``changes`` (option -> value) applied.

        A None value is a flag not given and changes nothing; :data:`NULL` sets the option
        to None. Unknown names, wrong types and invalid values raise ValueError naming
        ``where`` and the option (e.g. ``command line: clip.batch_size must be >= 1``).
        """
        given = {name: None if value is NULL else value for name, value in changes.items() if value is not None}
        return type(self).from_dict({**self._values(), **given}, where)

    def _values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
