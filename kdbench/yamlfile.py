"""Reading a suite's YAML strictly: `yaml.safe_load` semantics, and every problem one KdbenchError with its line.

On top of safe_load: a key given twice in one mapping is refused (safe_load keeps the last one silently), a
scalar that its tag cannot build (`!!int abc`, the date 2001-02-30) is a YAML error at its line rather than a
ValueError, and an alias that contains itself is refused (no setting needs a cyclic value).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from kdbench.errors import KdbenchError

_MERGE = "tag:yaml.org,2002:merge"


class StrictSafeLoader(yaml.SafeLoader):
    """SafeLoader (no Python tags, no code) that refuses duplicate keys and reports bad scalars at their line."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE:  # `<<: *base`: merged keys may be overridden, as YAML intends
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader reports it below, with its line
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first})", key_node.start_mark)
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, TypeError, OverflowError) as e:  # a tag's constructor refusing its text
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.tag.rsplit(':', 1)[-1]} value: {e}", node.start_mark) from None


def read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """(the document's data, its root node for line lookups) of the YAML file `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KdbenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise KdbenchError(f"{path}: cannot read: {e.strerror or e}") from None
    loader = None
    try:
        loader = StrictSafeLoader(text)  # its reader refuses control characters already
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}:" if mark else ""
        raise KdbenchError(f"{path}:{line} invalid YAML: {_one_line(e.problem or e)}") from None
    except yaml.YAMLError as e:
        raise KdbenchError(f"{path}: invalid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise KdbenchError(f"{path}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    try:
        _expanded_size(data, (), set(), {})
    except RecursionError:
        raise KdbenchError(f"{path}: invalid YAML: nested too deeply") from None
    except _Refused as e:
        raise KdbenchError(f"{path}:{line_of(root, e.loc)}: {dotted(e.loc)}: {e.reason}") from None
    return data, root


def _one_line(x) -> str:
    return " ".join(str(x).split())


def one_line(message: str) -> str:
    """`message` on one line: a line break or other control character that a key or value of the file put in it
    is shown escaped, as Python writes it."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in message)


# Aliases share one object, so a few lines can stand for billions of values ("billion laughs"); validating
# them would never end. No suite comes near this many values once its aliases are expanded.
MAX_VALUES = 100_000


class _Refused(Exception):
    def __init__(self, loc: tuple, reason: str):
        self.loc, self.reason = loc, reason


def _expanded_size(data, loc: tuple, ancestors: set, sizes: dict) -> int:
    """How many values `data` holds with its aliases expanded (memoised per shared object); refuses a value that
    contains itself and a document over MAX_VALUES."""
    if not isinstance(data, (dict, list)):
        return 1
    if id(data) in ancestors:
        raise _Refused(loc, "an alias refers to itself (a cyclic value)")
    if id(data) not in sizes:
        ancestors.add(id(data))
        items = data.items() if isinstance(data, dict) else enumerate(data)
        sizes[id(data)] = 1 + sum(_expanded_size(v, (*loc, k), ancestors, sizes) for k, v in items)
        ancestors.discard(id(data))
        if sizes[id(data)] > MAX_VALUES:
            raise _Refused(loc, f"more than {MAX_VALUES:,} values once its aliases are expanded")
    return sizes[id(data)]


def first_non_finite(value, loc: tuple = ()) -> tuple[tuple, float] | None:
    """(key path, value) of the first NaN or infinite number in `value` (dicts, lists, pydantic models), else
    None. Every numeric setting of a suite must be finite: `.inf` passes `gt=0`."""
    from pydantic import BaseModel

    if isinstance(value, float):
        return None if math.isfinite(value) else (loc, value)
    if isinstance(value, BaseModel):
        value = {k: getattr(value, k) for k in type(value).model_fields} | dict(value.model_extra or {})
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for k, v in items:
        found = first_non_finite(v, (*loc, k))
        if found is not None:
            return found
    return None


def dotted(loc) -> str:
    """A key path as a user writes it: `methods[0].params.temperature`; a key that is not a plain word is quoted,
    `params['odd key']`."""
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and p and all(c.isalnum() or c in "_-" for c in p):
            out += f".{p}" if out else p
        else:
            out += f"[{p!r}]"
    return out or "(top level)"


def line_of(node, loc) -> str:
    """Line number of the deepest YAML node reachable along `loc` (1-based), as ' line N'."""
    best = node
    for part in loc:
        nxt = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == part:
                    nxt, best = v, k  # the key's own line is what a user looks for
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
            nxt = best = node.value[part]
        if nxt is None:
            break
        node = nxt
    return f" line {best.start_mark.line + 1}" if best is not None else ""
