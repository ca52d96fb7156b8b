"""Attention patterns (CONTRACT §1): small, pure, composable rules, one module each.

`Pattern` is the discriminated union on `type` that both the engine and the service's request
schema use; `parse_pattern` accepts the contract's JSON-like dict, a pattern object or None.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Annotated, Any

import torch
from pydantic import Field, TypeAdapter, ValidationError

from .base import MAX_DEPTH, PatternBase
from .dense import Dense
from .fixed import Fixed
from .per_head import MAX_HEAD_PATTERNS, PerHead
from .sliding_window import SlidingWindow
from .strided import Strided
from .union import MAX_LEAVES, MAX_MEMBERS, Union

Pattern = Annotated[
    Dense | SlidingWindow | Strided | Fixed | Union | PerHead,
    Field(discriminator="type"),
]
Union.model_rebuild()
PerHead.model_rebuild()

_ADAPTER: TypeAdapter[PatternBase] = TypeAdapter(Pattern)

PATTERN_CLASSES: tuple[type[PatternBase], ...] = typing.get_args(typing.get_args(Pattern)[0])  # Pattern's members


def catalog_entry(model: type[PatternBase]) -> dict[str, Any]:
    """A pattern type as `GET /patterns` shows it: its name, its parameters as JSON Schema (the
    bounds validation enforces; the members of a list are patterns of any type here) and its rule."""
    schema = model.model_json_schema()
    properties = schema["$defs"][model.__name__]["properties"] if "$defs" in schema else schema["properties"]
    parameters = {}
    for name, spec in properties.items():
        if name != "type":
            parameters[name] = {key: value for key, value in spec.items() if key not in ("title", "items")}
    return {"type": model.model_fields["type"].default, "parameters": parameters, "rule": model.rule}


PATTERN_CATALOG: list[dict[str, Any]] = [catalog_entry(model) for model in PATTERN_CLASSES]
PATTERN_TYPES = frozenset(entry["type"] for entry in PATTERN_CATALOG)


def error_field(loc: Iterable[str | int]) -> str:
    """'pattern.patterns[0].stride' from a pydantic error's location: indices in brackets, and the
    tags its tagged union adds (`union`, `strided`, ...) left out, as no JSON path has them."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in PATTERN_TYPES:
            path += f".{part}" if path else part
    return path


def error_reason(error: dict) -> str:
    """What a pydantic error says was wrong, without pydantic's 'Value error, ' prefix."""
    if error["type"] == "value_error":
        return str(error["ctx"]["error"])
    return error["msg"]


def echo_of_bad_members(error: dict) -> bool:
    """pydantic's "at least 1 item after validation, not 0" for a list whose members all failed:
    their own errors say what is wrong; the list was not too short, so it is no error to report."""
    given = error.get("input")
    return error["type"] == "too_short" and isinstance(given, (list, tuple)) and \
        len(given) != error["ctx"]["actual_length"]


def parse_pattern(pattern: PatternBase | dict | str | None) -> PatternBase:
    """The engine's pattern object for a dict, a JSON string (its JSON types as they are, as the
    service takes them: "3" is no window), an object, or None (dense); a ValueError naming each
    bad field ('pattern.patterns[1].window: ...') otherwise, a TypeError for any other type. A
    valid dict or string is kept by its exact form (`_plain_form`): an in-process caller passes the
    same one at every call (a decode loop's steps), which then skips validation (union(sliding 128,
    strided 128): 6.6 us, its form 2) and gets the same object, which the planner's caches match
    at once."""
    if pattern is None:
        return Dense()
    if isinstance(pattern, PatternBase):
        return pattern
    if not isinstance(pattern, (Mapping, str)):  # a list or a number is no pattern, whatever pydantic makes of it
        raise TypeError(f"pattern: expected a dict, a JSON string, a pattern object or None, got {type(pattern).__name__}")
    form = _plain_form(pattern)
    return _validated(pattern) if form is None else _kept_pattern(form)


def _validated(pattern: Mapping | str) -> PatternBase:
    """`parse_pattern`'s validation of a dict or a JSON string."""
    try:
        if isinstance(pattern, str):
            return _ADAPTER.validate_json(pattern, strict=True)
        return _ADAPTER.validate_python(pattern)
    except ValidationError as e:
        problems = [f"{error_field(['pattern', *error['loc']])}: {error_reason(error)}" for error in e.errors()
                    if not echo_of_bad_members(error)]
        raise ValueError("; ".join(problems)) from None


def _plain_form(value: Any) -> Any:
    """A string, or a dict, list or tuple of strings, ints, floats, bools and None (nested), as a
    hashable form equal only to the same value's: containers and bools and floats are tagged with
    their type (validation tells True, 1 and 1.0 apart, where == does not). None stands for itself
    and for anything else (a custom mapping, an object: validated at every call, as its contents may
    change unseen); a container holding the latter has no form."""
    kind = type(value)
    if kind is str or kind is int or value is None:
        return value
    if kind is bool or kind is float:
        return kind, value
    if kind is dict:
        items = []
        for key, item in value.items():
            form = _plain_form(item)
            if type(key) is not str or form is None and item is not None:
                return None
            items.append((key, form))
        return dict, tuple(items)
    if kind is list or kind is tuple:
        forms = tuple(_plain_form(item) for item in value)
        return None if any(form is None and item is not None for form, item in zip(forms, value)) else (kind, forms)
    return None


def _from_plain_form(form: Any) -> Any:
    """The value a plain form was made from (an equal copy)."""
    if type(form) is not tuple:
        return form
    kind, content = form
    if kind is dict:
        return {key: _from_plain_form(item) for key, item in content}
    if kind is list or kind is tuple:
        return kind(_from_plain_form(item) for item in content)
    return content


@lru_cache(maxsize=256)
def _kept_pattern(form: Any) -> PatternBase:
    """The pattern of a plain form, validated once (an invalid one raises each time, kept by none)."""
    return _validated(_from_plain_form(form))


def head_groups(pattern: PatternBase, heads: int) -> list[tuple[PatternBase, list[int]]]:
    """Heads grouped by the single-head pattern they resolve to, in first-seen order."""
    return [(single, list(group)) for single, group in _head_groups(pattern, heads)]


@lru_cache(maxsize=1024)
def _head_groups(pattern: PatternBase, heads: int) -> tuple[tuple[PatternBase, tuple[int, ...]], ...]:
    """`head_groups`, kept per pattern and head count: every engine call asks, and a union's
    resolve and check walk its members (union(sliding 128, strided 128), 8 heads: 2.8 us, 1.1 us
    kept)."""
    pattern.check_heads(heads)
    if pattern.resolve(0, heads) is pattern:  # no per_head inside: every head alike
        return ((pattern, tuple(range(heads))),)
    groups: dict[PatternBase, list[int]] = {}
    for h in range(heads):
        groups.setdefault(pattern.resolve(h, heads), []).append(h)
    return tuple((single, tuple(group)) for single, group in groups.items())


@lru_cache(maxsize=1024)
def _pairs_per_head(pattern: PatternBase, lq: int, lk: int, causal: bool) -> int:
    rows = torch.arange(lk - lq, lk, dtype=torch.int64)
    return int(pattern.row_counts(rows, lk, causal).sum())


def attended_pairs(pattern: PatternBase, batch: int, heads: int, lq: int, lk: int, causal: bool = True) -> int:
    """(query, key) pairs allowed over all batch items and heads, without an Lq x Lk mask."""
    return batch * sum(len(hs) * _pairs_per_head(p, lq, lk, causal) for p, hs in head_groups(pattern, heads))


def pairs_bound(pattern: PatternBase, lq: int, lk: int, causal: bool = True) -> int:
    """An upper bound of one single-head pattern's attended pairs at O(Lq) cost for any pattern
    (a union's exact count costs O(Lk) and more where strides meet fixed): a union's members
    counted apart, at most the dense count."""
    members = pattern.leaves() if isinstance(pattern, Union) else [pattern]
    dense = _pairs_per_head(Dense(), lq, lk, causal)
    return min(dense, sum(_pairs_per_head(m, lq, lk, causal) for m in members))


def attended_pairs_bound(pattern: PatternBase, batch: int, heads: int, lq: int, lk: int, causal: bool = True) -> int:
    """`pairs_bound` over all batch items and heads: an upper bound of `attended_pairs`."""
    return batch * sum(len(hs) * pairs_bound(single, lq, lk, causal) for single, hs in head_groups(pattern, heads))


__all__ = [
    "MAX_DEPTH",
    "MAX_HEAD_PATTERNS",
    "MAX_LEAVES",
    "MAX_MEMBERS",
    "PATTERN_CATALOG",
    "PATTERN_TYPES",
    "Dense",
    "Fixed",
    "Pattern",
    "PatternBase",
    "PerHead",
    "SlidingWindow",
    "Strided",
    "Union",
    "attended_pairs",
    "attended_pairs_bound",
    "echo_of_bad_members",
    "error_field",
    "error_reason",
    "head_groups",
    "pairs_bound",
    "parse_pattern",
]
