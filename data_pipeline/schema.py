"""Mapping -> typed dataclass, collecting every problem instead of stopping at the first.

Shared by every command's config (`train`, `launch`, `data_pipeline.prepare`). OmegaConf's
structured configs stop at the first error and cannot pick a dataclass by a `kind` field,
so this small converter does both. It lives in data_pipeline, the lowest layer, because
data_pipeline must import nothing of train.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """Every problem found in a config, one per line."""

    def __init__(self, problems: list[str], what: str = "config"):
        self.problems = problems
        super().__init__(f"invalid {what}:\n  - " + "\n  - ".join(problems))


def build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Build dataclass `cls` from a mapping, appending every problem to `problems`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{prefix}={data!r}: expected a mapping of {cls.__name__} settings")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            problems.append(f"{key}: unknown key; known keys here: {', '.join(sorted(names))}")
            continue
        kwargs[k] = convert(v, hints[k], key, problems)
    return cls(**kwargs)


def convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check (and where lossless, coerce) one value against its annotated type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) not in typing.get_args(tp):
                problems.append(f"{key} is null: set a value")
            return None
        if len(args) > 1 and all(dataclasses.is_dataclass(a) for a in args):
            return _build_by_kind(args, value, key, problems)
        return convert(value, args[0], key, problems) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, problems)
    if tp is Any:
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            problems.append(f"{key}={value!r}: use one of {', '.join(map(str, typing.get_args(tp)))}")
        return value
    origin = typing.get_origin(tp) or tp
    if origin in (list, dict):
        if not isinstance(value, origin):
            problems.append(f"{key}={value!r}: expected a {origin.__name__}")
            return origin()
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}={value!r}: expected true or false")
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{key}={value!r}: expected a number")
        return value
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        problems.append(f"{key}={value!r}: expected {tp.__name__}")
    return value


def _build_by_kind(classes: list[type], value: Any, key: str, problems: list[str]) -> Any:
    """A union of config classes (e.g. data=synthetic|webdataset) is chosen by `kind`."""
    kinds = {cls().kind: cls for cls in classes}
    kind = value.get("kind", classes[0]().kind) if isinstance(value, dict) else None
    if kind not in kinds:
        problems.append(f"{key}.kind={kind!r}: use " + " or ".join(f"{key}={k}" for k in kinds))
        return classes[0]()
    return build(kinds[kind], value, key, problems)
