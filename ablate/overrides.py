"""`--set KEY=VALUE` overrides: applied to the parsed study mapping before validation, so an
override is checked exactly like the file and is part of the resolved config (and trial ids).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import yaml

from ablate.errors import StudyError

# Sections whose keys are themselves dotted paths (`factors: {model.mixer: [...]}`): a
# `--set factors.model.mixer=[...]` sets the key `model.mixer` inside them.
_DOTTED_MAPS = (("factors",), ("search", "space"), ("tune", "space"))


def parse_set(item: str, file: str) -> tuple[list[str], Any]:
    """`KEY=VALUE` -> (path into the study mapping, value parsed as YAML)."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key or any(not p for p in key.split(".")):
        raise StudyError(file, [("--set", f"{item!r} is not KEY=VALUE with a dotted KEY, e.g. "
                                          "--set train.epochs=3 or --set seeds=[0,1,2]")])
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise StudyError(file, [("--set", f"{key}: value {text!r} is not a YAML scalar or "
                                          "list; quote it or write e.g. [a, b]")]) from None
    parts = key.split(".")
    for prefix in _DOTTED_MAPS:
        n = len(prefix)
        if tuple(parts[:n]) == prefix and len(parts) > n:
            return [*prefix, ".".join(parts[n:])], value
    return parts, value


def apply_sets(raw: dict[str, Any], sets: Sequence[str], file: str) -> dict[str, Any]:
    """A copy of the parsed study mapping `raw` with every `KEY=VALUE` of `sets` applied in
    order (a later one wins)."""
    out = copy.deepcopy(raw)
    for item in sets:
        path, value = parse_set(item, file)
        node = out
        for i, part in enumerate(path[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(path[:i + 1])
                raise StudyError(file, [("--set", f"{'.'.join(path)}: {where} is a "
                                                  f"{type(nxt).__name__} in the study, not a "
                                                  "mapping; set it whole instead (e.g. "
                                                  f"--set {where}=[...])")])
            node = nxt
        node[path[-1]] = value
    return out


def label(file: str, sets: Sequence[str]) -> str:
    """How errors name the study: the file, and the overrides that changed it."""
    return f"{file} (with --set {' '.join(sets)})" if sets else file
