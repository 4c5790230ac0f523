"""Read and write microsoft/mup ``.bsh`` base-shape files.

Format (mup 1.0.0 ``save_base_shapes``): YAML after a ``#`` comment header, one key per
parameter (sorted), whose value is the list of base dims with ``null`` for a finite dim.
mupkit writes and reads it without a YAML dependency (block lists, as PyYAML dumps them, or
flow lists ``[64, null]``).
"""

from __future__ import annotations

from .plan import Plan

HEADER = ("# This is a base shape file encoded in yaml\n"
          "# - `null` indicates a dimension is \"finite\", i.e. a non-\"width\" dimension\n"
          "# - a number indicates the base dimension of an \"infinite\" dimension, i.e. some notion of \"width\"\n")


def save_bsh(plan: Plan, path: str) -> None:
    """Write the plan's base shapes in mup's ``.bsh`` format (readable by ``mup.load_base_shapes``)."""
    lines = [HEADER.rstrip("\n")]
    for name in sorted(plan):
        spec = plan[name]
        lines.append(f"{name}:")
        lines.extend(f"- {b if inf else 'null'}" for b, inf in zip(spec.base, spec.infinite))
        if not spec.base:
            lines[-1] += " []"
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def load_bsh(path: str) -> dict[str, list[int | None]]:
    """Parse a ``.bsh`` file into ``{name: [base dim or None per dim]}``."""
    out: dict[str, list[int | None]] = {}
    current = None
    with open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.split("#", 1)[0].rstrip()
            if not line.strip():
                continue
            if line.lstrip().startswith("- "):
                if current is None:
                    raise ValueError(f"{path}:{lineno}: list item before any parameter name")
                out[current].append(_dim(line.lstrip()[2:], path, lineno))
                continue
            key, sep, rest = line.partition(":")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected 'name:' or '- dim', got {raw.strip()!r}")
            current = key.strip().strip("'\"")
            rest = rest.strip()
            out[current] = [] if rest in ("", "[]") else \
                [_dim(x, path, lineno) for x in rest.strip("[]").split(",")]
    return out


def _dim(text: str, path: str, lineno: int) -> int | None:
    text = text.strip()
    if text in ("null", "~", "None"):
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{path}:{lineno}: base dim must be an int or null, got {text!r}") from None
