"""``config/defaults.yaml``, written from the declarations in :mod:`config.sections`.

The file is the user-facing reference: every key with its default and its doc as a comment.
``python -m config.reference`` rewrites it; ``--check`` exits 1 when it is out of date (a test
does the same).
"""

from __future__ import annotations

import json
import sys
import textwrap
from dataclasses import fields

from config.fields import spec_of
from config.loader import DEFAULTS_FILE
from config.sections import SECTION_TYPES

HEADER = """\
# Default settings for the avatar server: every key, its default and what it means. Written
# from the declarations in config/sections.py (python -m config.reference): edit those, not this.
#
# Override order (later wins): these defaults <- a user YAML file (deep-merged, same layout)
# <- environment variables AVATAR_<SECTION>__<KEY> (values parsed as YAML, e.g.
# AVATAR_SERVER__PORT=9000) <- command-line overrides (e.g. --port).
# Every key is validated strictly: unknown keys, wrong types and out-of-range values are errors.
"""

_FOLD_AT = 88  # longer strings are written as a folded block (>-), wrapped at this width


def _scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))  # 5, not 5.0: the loader reads either as a float
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        plain = value and not value[0].isdigit() and not any(c in value for c in ' :#"\'[]{},')
        return value if plain else json.dumps(value)
    raise TypeError(f"no YAML form for default {value!r}")


def _value(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, str) and len(value) > _FOLD_AT:
        return ">-\n" + "\n".join("    " + line for line in textwrap.wrap(value, _FOLD_AT))
    return _scalar(value)


def render() -> str:
    """The text of defaults.yaml."""
    out = [HEADER.rstrip("\n")]
    for name, cls in SECTION_TYPES.items():
        out += ["", f"{name}:"]
        for f in fields(cls):
            doc = textwrap.dedent(spec_of(cls, f.name).doc).strip()
            out += [f"  # {line}".rstrip() for line in doc.splitlines()]
            out.append(f"  {f.name}: {_value(f.default)}")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv == ["--check"]:
        if DEFAULTS_FILE.read_text(encoding="utf-8") != text:
            print(f"{DEFAULTS_FILE} is out of date: run python -m config.reference")
            return 1
        return 0
    if argv:
        print("usage: python -m config.reference [--check]", file=sys.stderr)
        return 2
    DEFAULTS_FILE.write_text(text, encoding="utf-8")
    print(f"wrote {DEFAULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
