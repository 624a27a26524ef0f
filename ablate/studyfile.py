"""Reading a study file: YAML with caps on size, nesting and alias expansion, and ${VAR}
expansion of string values. Nothing here validates the study itself (see ablate.study)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import yaml

from ablate.errors import StudyError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_vars(value: str, env: dict[str, str] | None = None) -> str:
    """Expand `${VAR}` and `${VAR:-default}`; raises KeyError(VAR) for an unset VAR."""
    env = os.environ if env is None else env

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise KeyError(name)

    return _VAR.sub(sub, value)


def _expand_tree(node: Any, path: str, problems: list[tuple[str, str]], keep: set[str]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_tree(v, f"{path}.{k}" if path else str(k), problems, keep)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_tree(v, f"{path}[{i}]", problems, keep) for i, v in enumerate(node)]
    if isinstance(node, str):
        try:
            expanded = expand_vars(node)
        except KeyError as e:
            problems.append((path, f"environment variable {e.args[0]} is not set and has no "
                                   f"default: export {e.args[0]}=... or write "
                                   f"${{{e.args[0]}:-default}}"))
            return node
        # dataset.root stays as written: the driver expands it when the run starts (and hands
        # the absolute path to the trials), so the trial id does not depend on where a
        # machine keeps its data.
        return node if path in keep else expanded
    return node


# ---------------------------------------------------------------- loading and validation

MAX_STUDY_BYTES = 1 << 20  # 1 MiB
MAX_YAML_NODES = 100_000  # after alias expansion: a "billion laughs" file is a few hundred bytes
MAX_YAML_DEPTH = 20


def _check_yaml_shape(f: str, text: str) -> None:
    """Refuse absurd nesting (from the event stream) and alias bombs (the size the document
    would have with its aliases expanded, counted on the composed graph where each alias is
    still one shared node) before anything is built."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise StudyError(f, [("", f"nested deeper than {MAX_YAML_DEPTH} levels; a "
                                          "study file is a few flat sections")])
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) not in sizes:
            if isinstance(node, yaml.SequenceNode):
                sizes[id(node)] = 1 + sum(size(n) for n in node.value)
            elif isinstance(node, yaml.MappingNode):
                sizes[id(node)] = 1 + sum(size(k) + size(v) for k, v in node.value)
            else:
                sizes[id(node)] = 1
        return sizes[id(node)]

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None and size(root) > MAX_YAML_NODES:
        raise StudyError(f, [("", f"expands to {size(root):,} values through YAML aliases "
                                  f"(*ref), over the limit of {MAX_YAML_NODES:,}; write the "
                                  "values out")])


def read_study_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """Read and parse a study file into a mapping; returns it with the file's sha256."""
    p = Path(path)
    f = str(path)
    if not p.exists():
        raise StudyError(f, [("", "file not found: check the path (study files end in .yaml)")])
    if p.is_dir():
        raise StudyError(f, [("", "is a directory: give a study file such as "
                                  "studies/quickstart.yaml")])
    if p.stat().st_size > MAX_STUDY_BYTES:
        raise StudyError(f, [("", f"is {p.stat().st_size:,} bytes, over the "
                                  f"{MAX_STUDY_BYTES:,}-byte limit for a study file; a study "
                                  "lists factors, not data")])
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
        _check_yaml_shape(f, text)
        raw = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise StudyError(f, [("", "is not UTF-8 text: a study file is YAML")]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "python/" in str(e) or "could not determine a constructor" in str(e):
            problem = ("YAML tags that build Python objects are not allowed; "
                       "write plain values")
        raise StudyError(f, [("", f"not valid YAML{where}: {problem}")]) from None
    if raw is None:
        raise StudyError(f, [("", "is empty: a study needs at least `name:` "
                                  "(see studies/quickstart.yaml)")])
    if not isinstance(raw, dict):
        raise StudyError(f, [("", f"must be a YAML mapping of sections, not a "
                                  f"{type(raw).__name__}")])
    return raw, hashlib.sha256(data).hexdigest()
