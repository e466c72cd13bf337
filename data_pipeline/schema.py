"""Mapping -> typed dataclass, collecting every problem instead of stopping at the first.

Shared by every command's config (`train`, `launch`, `train.export`, `data_pipeline.prepare`)
through one entry point, `load(cls, raw, validate)`. OmegaConf's structured configs stop at
the first error and cannot pick a dataclass by a `kind` field, so this small converter does
both. Enumerations are `Literal[...]` fields, checked here. A value of the wrong type is
reported and replaced by the field's default, so cross-field validation always runs on a
well-typed object and its problems are reported too. It lives in data_pipeline, the lowest
layer, because data_pipeline must import nothing of train.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")
_BAD = object()  # convert() result for a value of the wrong type: build() keeps the default


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
    # A field may take its YAML key from metadata (`async` is a Python keyword).
    names = {f.metadata.get("key", f.name): f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            problems.append(f"{key}: unknown key; known keys here: {', '.join(sorted(names))}")
            continue
        value = convert(v, hints[names[k]], key, problems)
        if value is not _BAD:
            kwargs[names[k]] = value
    return cls(**kwargs)


def minimums(prefix: str, **checks: tuple[Any, Any]) -> list[str]:
    """`name=(value, least)` pairs: a problem for each value below its least allowed value."""
    return [f"{prefix}.{name}={value}: must be >= {least}" for name, (value, least) in checks.items()
            if value < least]


def load(cls: type[T], raw: Any, validate: Callable[[T], list[str]] | None = None, prefix: str = "",
         error: type[ConfigError] = ConfigError) -> T:
    """The one way every command turns its composed config into `cls`: build it, run the
    cross-field `validate` (default: `cls.validate` when it has one), and raise `error` listing
    every problem found by both."""
    problems: list[str] = []
    cfg = build(cls, raw, prefix, problems)
    check = validate or getattr(cfg, "validate", None)
    if check is not None:
        problems.extend(check(cfg) if validate else check())
    if problems:
        raise error(problems)
    return cfg


def convert(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check (and where lossless, coerce) one value against its annotated type."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) not in typing.get_args(tp):
                problems.append(f"{key} is null: set a value")
                return _BAD
            return None
        if len(args) > 1 and all(dataclasses.is_dataclass(a) for a in args):
            return _build_by_kind(args, value, key, problems)
        return convert(value, args[0], key, problems) if len(args) == 1 else value
    if typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            names = [str(a) for a in allowed]
            problems.append(f"{key}={value!r}: use " + (", ".join(names[:-1]) + " or " if len(names) > 1 else "")
                            + names[-1])
            return _BAD
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, problems)
    if tp is Any:
        return value
    origin = typing.get_origin(tp) or tp
    if origin in (list, dict):
        if not isinstance(value, origin):
            problems.append(f"{key}={value!r}: expected a {origin.__name__}")
            return _BAD
        item = typing.get_args(tp)[0] if origin is list and typing.get_args(tp) else None
        if item is not None and dataclasses.is_dataclass(item):  # e.g. data.mix: a list of sources
            return [build(item, v, f"{key}[{i}]", problems) for i, v in enumerate(value)]
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{key}={value!r}: expected true or false")
            return _BAD
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        problems.append(f"{key}={value!r}: expected a number")
        return _BAD
    if tp in (int, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        problems.append(f"{key}={value!r}: expected {tp.__name__}")
        return _BAD
    return value


def _build_by_kind(classes: list[type], value: Any, key: str, problems: list[str]) -> Any:
    """A union of config classes (e.g. data=synthetic|webdataset) is chosen by `kind`."""
    kinds = {typing.get_args(typing.get_type_hints(cls)["kind"])[0]: cls for cls in classes}
    kind = value.get("kind", next(iter(kinds))) if isinstance(value, dict) else None
    if kind not in kinds:
        problems.append(f"{key}.kind={kind!r}: use " + " or ".join(f"{key}.kind={k}" for k in kinds))
        return _BAD
    return build(kinds[kind], value, key, problems)
