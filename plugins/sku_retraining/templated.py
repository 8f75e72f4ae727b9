"""Values that reach operators through Jinja templates (``"{{ params.x }}"``).

The DAG renders templates as native objects, but an operator used elsewhere (or a param
rendered as text) can receive ``"True"`` or ``"['a', 'b']"``; these read both forms the same.
"""

from __future__ import annotations

import ast


def as_bool(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def as_list(value: object) -> list:
    """``None``/``""`` → ``[]``; a rendered list literal → the list; any other string → ``[it]``."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            parsed = ast.literal_eval(text)  # literals only: never evaluates code
            if not isinstance(parsed, list):
                raise ValueError(f"expected a list, got {text!r}")
            return parsed
        return [text]
    return list(value)
