"""Loading settings: the layers, the environment, the checks against the declared keys.

Layers, later wins:

1. the defaults declared in :mod:`config.sections` (written out, with their docs, in
   ``defaults.yaml`` beside this module);
2. an optional user YAML file, deep-merged section by section;
3. environment variables ``AVATAR_<SECTION>__<KEY>`` (values parsed as YAML);
4. ``overrides``: dotted keys such as ``{"server.port": 9000}`` (values used as given).

Every problem raises :class:`ConfigError`, whose message starts with the full dotted key and
says where the offending value came from.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from config.fields import ConfigError, Section, declared_defaults, describe, is_stringy, suggest
from config.sections import SECTION_TYPES, Settings, build_settings

__all__ = ["DEFAULTS_FILE", "ENV_PREFIX", "load_settings"]

DEFAULTS_FILE = Path(__file__).parent / "defaults.yaml"
ENV_PREFIX = "AVATAR_"

_SCHEMA: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in fields(cls)) for name, cls in SECTION_TYPES.items()
}
_EVERY_KEY = {f"{s}.{k}": k for s, keys in _SCHEMA.items() for k in keys}

# Keys whose value is a string: an environment value that YAML would read as something else
# ("007", "off", "1.0") is kept as the literal string for these.
_STRING_KEYS: frozenset[str] = frozenset(
    f"{section}.{name}"
    for section, cls in SECTION_TYPES.items()
    for name, tp in get_type_hints(cls).items()
    if is_stringy(tp)
)


def _raw(value: object) -> object:
    """A declared default as YAML would give it (lists, not tuples)."""
    if isinstance(value, tuple):
        return [_raw(v) for v in value]
    return value


# The defaults layer: plain data, as if read from defaults.yaml (which says the same).
_DEFAULTS: dict[str, dict[str, object]] = {
    name: {k: _raw(v) for k, v in declared_defaults(cls).items()}
    for name, cls in SECTION_TYPES.items()
}


# --------------------------------------------------------------------------- YAML


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml_file(path: Path) -> Mapping[Any, Any]:
    source = f"config file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(None, "file not found", source=source) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(None, f"cannot read: {exc}", source=source) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(None, f"invalid YAML: {exc}", source=source) from None
    if data is None:  # empty file (or only comments)
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            None,
            f"top level must be a mapping of sections, got {type(data).__name__}",
            source=source,
        )
    return data


# --------------------------------------------------------------------------- layering


class _Merged:
    """The merged raw values, section -> key -> value, plus where each value came from."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, object]] = {s: {} for s in _SCHEMA}
        self.sources: dict[str, str] = {}

    def resolve(self, parts: list[str], source: str) -> tuple[str, str | None]:
        """Check a key path against the schema: (section, key or None for a whole section)."""
        dotted = ".".join(parts)
        section = parts[0]
        if section not in _SCHEMA:
            reason = "unknown section" if len(parts) == 1 else "unknown key"
            hint = suggest(section, tuple(_SCHEMA), "", _EVERY_KEY)
            raise ConfigError(dotted, reason + hint, source=source)
        if len(parts) == 1:
            return section, None
        key = parts[1]
        if key not in _SCHEMA[section]:
            raise ConfigError(
                f"{section}.{key}",
                "unknown key" + suggest(key, _SCHEMA[section], f"{section}.", _EVERY_KEY),
                source=source,
            )
        if len(parts) > 2:
            raise ConfigError(
                dotted,
                f"unknown key: {section}.{key} is set as a whole, not by sub-key",
                source=source,
            )
        return section, key

    def set(self, parts: list[str], value: object, source: str) -> None:
        section, key = self.resolve(parts, source)
        if key is not None:
            self.values[section][key] = value
            self.sources[f"{section}.{key}"] = source
            return
        if value is None:  # "server:" with nothing under it
            return
        if not isinstance(value, Mapping):
            raise ConfigError(
                section, f"expected a mapping of keys, got {describe(value)}", source=source
            )
        for k, v in value.items():
            if not isinstance(k, str):
                raise ConfigError(
                    f"{section}.{k!r}", "unknown key (keys must be strings)", source=source
                )
            self.set([section, k], v, source)

    def apply_file(self, data: Mapping[Any, Any], source: str) -> None:
        for k, v in data.items():
            if not isinstance(k, str):
                raise ConfigError(repr(k), "unknown section (keys must be strings)", source=source)
            self.set([k], v, source)


def _env_entries(env: Mapping[str, str]) -> list[tuple[list[str], str, str]]:
    """(key parts, raw value, source) for each config variable in ``env``.

    A variable is a config variable when its name has the prefix and a ``__`` separator.
    Prefixed names without one are left alone (the test harness uses e.g.
    AVATAR_REQUIRE_NETNS), except ones that name a section (AVATAR_SERVER) or look like a
    section with a single underscore (AVATAR_SERVER_PORT): those are reported as errors."""
    entries = []
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        source = f"environment variable {name}"
        if "__" not in rest:
            lowered = rest.lower()
            for section in _SCHEMA:
                if lowered == section:
                    raise ConfigError(
                        section,
                        f"set keys one by one: {ENV_PREFIX}{section.upper()}__<KEY>",
                        source=source,
                    )
                if lowered.startswith(section + "_"):
                    wanted = f"{ENV_PREFIX}{section.upper()}__{rest[len(section) + 1 :]}"
                    raise ConfigError(
                        f"{section}.{lowered[len(section) + 1 :]}",
                        f"malformed variable name; use {wanted} (double underscore between "
                        "section and key)",
                        source=source,
                    )
            continue
        parts = rest.lower().split("__")
        if any(not p for p in parts):
            raise ConfigError(
                ".".join(parts), "malformed variable name (empty key segment)", source=source
            )
        entries.append((parts, env[name], source))
    return entries


def _parse_env_value(dotted: str, raw: str, source: str) -> object:
    try:
        value = yaml.load(raw, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(dotted, f"cannot parse {raw!r} as YAML: {exc}", source=source) from None
    if dotted in _STRING_KEYS and value is not None and not isinstance(value, str):
        return raw  # "007", "off", "1.5" stay strings where a string is expected
    return value


# --------------------------------------------------------------------------- entry point


def load_settings(
    *,
    config_file: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    """Load defaults <- ``config_file`` <- ``AVATAR_*`` environment <- ``overrides``.

    ``env=None`` reads ``os.environ``; pass ``{}`` to ignore the environment.
    ``overrides`` maps dotted keys to already-typed values, e.g. ``{"server.port": 9000}``;
    leave a key out rather than passing None for "not given" (None is a real value).
    Raises :class:`ConfigError` on any problem."""
    merged = _Merged()
    merged.apply_file(_DEFAULTS, f"defaults {DEFAULTS_FILE}")

    if config_file is not None:
        path = Path(config_file)
        merged.apply_file(_read_yaml_file(path), f"config file {path}")

    for parts, raw, source in _env_entries(os.environ if env is None else env):
        section, key = merged.resolve(parts, source)
        dotted = section if key is None else f"{section}.{key}"
        merged.set(parts, _parse_env_value(dotted, raw, source), source)

    for dotted_key, value in (overrides or {}).items():
        if not isinstance(dotted_key, str) or not dotted_key or "" in dotted_key.split("."):
            raise ConfigError(str(dotted_key), "malformed override key", source="overrides")
        merged.set(dotted_key.split("."), value, "overrides")

    return build_settings(
        {name: Section(name, merged.values[name], merged.sources) for name in _SCHEMA}
    )
