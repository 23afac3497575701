"""How a setting is declared, and the generic reader that checks a value against it.

A section is a frozen dataclass whose fields are declared with :func:`setting`: the default,
the doc (one comment block of ``defaults.yaml``), bounds, choices, an extra check or a custom
parser. :func:`build_section` reads every field of a section from the merged raw values, by
the field's type (``int``, ``float``, ``bool``, ``str``, ``str | None``, ``tuple[str, ...]``,
a ``Literal``) unless the field names its own parser, then runs the section's cross-field
check and builds the dataclass.

Every problem raises :class:`ConfigError`, whose message starts with the full dotted key and
says where the offending value came from.
"""

from __future__ import annotations

import difflib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = [
    "REDACTED",
    "ConfigError",
    "Section",
    "Spec",
    "build_section",
    "declared_defaults",
    "describe",
    "is_stringy",
    "read_setting",
    "setting",
    "spec_of",
    "suggest",
]

REDACTED = "***"

_T = TypeVar("_T")
_S = TypeVar("_S")


class ConfigError(ValueError):
    """A setting is unknown, mistyped or out of range, or a config file is unusable.

    ``key`` is the full dotted key (``media.fps``) or None for file-level problems;
    ``source`` says where the value came from (a file, an environment variable, overrides).
    """

    def __init__(self, key: str | None, reason: str, *, source: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.source = source
        head = key if key is not None else (source or "config")
        message = f"{head}: {reason}"
        if key is not None and source:
            message += f" (from {source})"
        super().__init__(message)


def describe(value: object) -> str:
    return f"{type(value).__name__} {value!r}"


def suggest(
    name: str, siblings: tuple[str, ...], prefix: str, every: Mapping[str, str] | None = None
) -> str:
    """'; did you mean ...?' for the closest known key: among siblings, else among ``every``
    (dotted key -> key, e.g. every section's keys: ``port`` at top level -> ``server.port``)."""
    match = difflib.get_close_matches(name, siblings, n=1)
    if match:
        return f"; did you mean '{prefix}{match[0]}'?"
    if every is None:
        return ""
    match = difflib.get_close_matches(name, list(every.values()), n=1)
    if match:
        dotted = next(d for d, k in every.items() if k == match[0])
        return f"; did you mean '{dotted}'?"
    return ""


# --------------------------------------------------------------------------- declaring


@dataclass(frozen=True, slots=True)
class Spec:
    """What :func:`setting` records about one key (the field's ``metadata["setting"]``)."""

    doc: str
    min: float | None = None
    max: float | None = None
    above: float | None = None  # exclusive lower bound: "must be > above"
    choices: tuple[object, ...] | None = None  # else a Literal type's values
    check: Callable[[Any], str | None] | None = None  # a reason when the value is wrong
    parse: Callable[[Section, str], object] | None = None  # reads the key instead of its type


def setting(
    default: object,
    *,
    doc: str,
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    choices: tuple[object, ...] | None = None,
    check: Callable[[Any], str | None] | None = None,
    parse: Callable[[Section, str], object] | None = None,
    secret: bool = False,
) -> Any:
    """A section field: its default, doc and bounds, in one place.

    ``min``/``max`` are inclusive, ``above`` exclusive; bounds are shown in messages as given
    (``0..60``, ``0.5..2.0``). ``check(value)`` returns a reason when the value is wrong.
    ``parse(section, key)`` reads the raw value itself (structured or cross-key values).
    ``secret`` keeps the value out of ``repr``. Defaults must be immutable (tuples, not lists).
    """
    spec = Spec(doc, min, max, above, choices, check, parse)
    return field(default=default, repr=not secret, metadata={"setting": spec})


def spec_of(cls: type, name: str) -> Spec:
    return _specs(cls)[name][0]


_SPECS: dict[type, dict[str, tuple[Spec, object]]] = {}


def _specs(cls: type) -> dict[str, tuple[Spec, object]]:
    """name -> (spec, type) of a section's fields, in declaration order."""
    if cls in _SPECS:
        return _SPECS[cls]
    hints = get_type_hints(cls)
    out: dict[str, tuple[Spec, object]] = {}
    for f in fields(cls):
        spec = f.metadata.get("setting")
        if not isinstance(spec, Spec) or f.default is MISSING:
            raise TypeError(f"{cls.__name__}.{f.name} is not declared with setting()")
        out[f.name] = (spec, hints[f.name])
    _SPECS[cls] = out
    return out


def is_stringy(tp: object) -> bool:
    """True for str, a Literal of strs, or a union containing one of those."""
    if tp is str:
        return True
    origin = get_origin(tp)
    if origin is Literal:
        return all(isinstance(a, str) for a in get_args(tp))
    if origin is Union or isinstance(tp, types.UnionType):
        return any(is_stringy(a) for a in get_args(tp))
    return False


# --------------------------------------------------------------------------- reading


class Section:
    """Typed getters over one merged section; errors name the full key and its source."""

    def __init__(
        self, name: str, values: Mapping[str, object], sources: Mapping[str, str]
    ) -> None:
        self.name = name
        self.values = values
        self.sources = sources

    def error(self, key: str, reason: str) -> ConfigError:
        dotted = f"{self.name}.{key}"
        base = f"{self.name}.{key.split('[')[0]}"  # ice_servers[0].urls -> ice_servers
        return ConfigError(dotted, reason, source=self.sources.get(base))

    def raw(self, key: str) -> object:
        if key not in self.values:
            raise self.error(key, "missing (no default declared)")
        return self.values[key]

    def get_int(self, key: str, lo: float | None = None, hi: float | None = None) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"expected int, got {describe(value)}")
        self._check_range(key, value, lo, hi)
        return value

    def get_float(
        self, key: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False
    ) -> float:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"expected float, got {describe(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise self.error(key, f"must be a finite number, got {value!r}")
        if lo_open and lo is not None and number <= lo:
            raise self.error(key, f"must be > {lo}, got {value!r}")
        self._check_range(key, number, lo, hi)
        return number

    def get_bool(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(key, f"expected bool, got {describe(value)}")
        return value

    def get_str(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.error(key, f"expected str, got {describe(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty")
        return value

    def get_optional_str(self, key: str) -> str | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self.error(key, f"expected str or null, got {describe(value)}")
        if not value.strip():
            raise self.error(key, "must not be empty (use null for the default)")
        return value

    def get_str_list(self, key: str) -> tuple[str, ...]:
        """A list of non-empty strings; a single string is taken as a list of one."""
        value = self.raw(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of str, got {type(value).__name__}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                # never echo the value: these lists hold secrets (API keys)
                raise self.error(f"{key}[{i}]", "expected a non-empty str")
        return tuple(value)

    def get_choice(self, key: str, choices: tuple[_T, ...]) -> _T:
        value = self.raw(key)
        for c in choices:
            # type() check: True must not match 1, nor 1.0 match 1.
            if type(value) is type(c) and value == c:
                return c
        allowed = ", ".join(str(c) for c in choices)
        raise self.error(key, f"must be one of {allowed}; got {describe(value)}")

    def _check_range(self, key: str, value: float, lo: float | None, hi: float | None) -> None:
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise self.error(key, f"must be in {lo}..{hi}, got {value!r}")
        if lo is not None and value < lo:
            raise self.error(key, f"must be >= {lo}, got {value!r}")
        if hi is not None and value > hi:
            raise self.error(key, f"must be <= {hi}, got {value!r}")


def read_setting(s: Section, key: str, spec: Spec, tp: object) -> object:
    """One key's value, read and checked as its declaration says."""
    value: object
    if spec.parse is not None:
        value = spec.parse(s, key)
    elif spec.choices is not None:
        value = s.get_choice(key, spec.choices)
    elif get_origin(tp) is Literal:
        value = s.get_choice(key, get_args(tp))
    elif tp is bool:
        value = s.get_bool(key)
    elif tp is int:
        value = s.get_int(key, spec.min, spec.max)
    elif tp is float:
        if spec.above is not None:
            value = s.get_float(key, spec.above, spec.max, lo_open=True)
        else:
            value = s.get_float(key, spec.min, spec.max)
    elif tp is str:
        value = s.get_str(key)
    elif tp == str | None:
        value = s.get_optional_str(key)
    elif tp == tuple[str, ...]:
        value = s.get_str_list(key)
    else:
        raise TypeError(f"{s.name}.{key}: no reader for {tp!r}; declare it with parse=")
    if spec.check is not None and value is not None:
        reason = spec.check(value)
        if reason is not None:
            raise s.error(key, reason)
    return value


def build_section(
    cls: type[_S],
    s: Section,
    cross_check: Callable[[Section, dict[str, Any]], None] | None = None,
) -> _S:
    """The section ``cls`` from the merged values: every field read as declared, then the
    section's ``cross_check(section, values)`` (rules between its keys)."""
    values = {key: read_setting(s, key, spec, tp) for key, (spec, tp) in _specs(cls).items()}
    if cross_check is not None:
        cross_check(s, values)
    return cls(**values)


def declared_defaults(cls: type) -> dict[str, object]:
    """key -> default, in declaration order."""
    return {f.name: f.default for f in fields(cls)}
