"""Typed parameters: a nested dict (one block of conf/*/parameters_*.yml) -> frozen dataclasses.

Each parameters block has one schema, a frozen dataclass next to the stage that reads it
(`engine.config.TrainingConfig`, `evaluation.config.EvaluationConfig`, ...). A node builds it
once, ``TrainingConfig.from_params(params)``; code below the node takes the typed object.
Defaults live in the YAML and in the schema, nowhere else.

`build` checks the dict against the dataclass's type hints and fails on the first problem
with the key's dotted name and what was expected::

    training.optimizer.lrr: unknown key; known: lr, momentum, name, weight_decay
    training.max_iters: expected int, got 'ten'

Supported hints: int, float (an int is accepted), bool, str, `Any`, `Literal[...]`, unions
with None (``int | None``), ``tuple[X, ...]`` and ``tuple[X, Y]`` (from YAML lists),
``Mapping[K, V]`` (an open mapping: any keys, checked values) and nested schema dataclasses
(a missing or null block takes that schema's defaults). A schema may check more in
``__post_init__`` by raising `ConfigError` with its field name; `build` prefixes the path.
Nothing here imports Kedro or torch.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Self, TypeVar, Union

T = TypeVar("T")
_NONE = type(None)


class ConfigError(ValueError):
    """A parameter is unknown, missing or of the wrong type or value.

    ``path`` is the key's dotted name (``training.optimizer.lr``), ``problem`` what is wrong.
    """

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}")


class Schema:
    """Base of the top-level schemas: ``BLOCK`` names the parameters key they describe."""

    BLOCK: ClassVar[str] = ""

    @classmethod
    def from_params(cls, params: Mapping | None) -> Self:
        """The typed block from the node's parameters dict (``params:<BLOCK>``)."""
        return build(cls, params, cls.BLOCK)

    def as_dict(self) -> dict:
        """Plain dicts, lists and scalars (for libraries that take a mapping, or storage)."""
        return as_dict(self)


def build(cls: type[T], params: Mapping | None, path: str) -> T:
    """An instance of the dataclass ``cls`` from ``params``; ConfigError names the bad key."""
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise ConfigError(path, f"expected a mapping, got {params!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields), key=str)
    if unknown:
        raise ConfigError(_join(path, unknown[0]),
                          f"unknown key; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, spec in fields.items():
        if name in params:
            values[name] = convert(hints[name], params[name], _join(path, name))
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(_join(path, name), "required key missing")
    try:
        return cls(**values)
    except ConfigError as exc:  # raised by __post_init__ with the field name only
        raise ConfigError(_join(path, exc.path), exc.problem) from None


def convert(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked against the type ``hint`` (lists become tuples for tuple hints)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, path)
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise ConfigError(path, f"expected one of {', '.join(map(repr, args))}, got {value!r}")
    if origin is tuple:
        return _convert_tuple(args, value, path)
    if origin in (Mapping, dict):
        return _convert_mapping(args, value, path)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    return _convert_scalar(hint, value, path)


def as_dict(config: Any) -> dict:
    """A schema instance as nested plain dicts (tuples become lists, as YAML writes them)."""
    return _plain(dataclasses.asdict(config))


def describe(hint: Any) -> str:
    """How a type hint reads in an error message: ``int``, ``list of int``, ``int or null``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is _NONE else describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {describe(args[0])}"
        return f"a list of {len(args)} ({', '.join(describe(a) for a in args)})"
    if origin is not None or dataclasses.is_dataclass(hint):
        return "a mapping"
    return getattr(hint, "__name__", str(hint))


# --------------------------------------------------------------------------------- helpers

def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _convert_union(args: tuple, value: Any, path: str) -> Any:
    if value is None and _NONE in args:
        return None
    expected = " or ".join("null" if a is _NONE else describe(a) for a in args)
    options = [a for a in args if a is not _NONE]
    if len(options) == 1 and value is not None:
        try:
            return convert(options[0], value, path)
        except ConfigError as exc:  # a nested key's message is more precise than ours
            if exc.path != path:
                raise
            raise ConfigError(path, f"expected {expected}, got {value!r}") from None
    for option in options:
        try:
            return convert(option, value, path)
        except ConfigError:
            continue
    raise ConfigError(path, f"expected {expected}, got {value!r}")


def _convert_tuple(args: tuple, value: Any, path: str) -> tuple:
    hint = tuple[args]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(path, f"expected {describe(hint)}, got {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(path, f"expected {describe(hint)}, got {value!r}")
    return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))


def _convert_mapping(args: tuple, value: Any, path: str) -> dict:
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"expected a mapping, got {value!r}")
    key_hint, value_hint = args or (Any, Any)
    return {convert(key_hint, k, _join(path, k)): convert(value_hint, v, _join(path, k))
            for k, v in value.items()}


def _convert_scalar(hint: type, value: Any, path: str) -> Any:
    # bool is an int in Python; a YAML `true` where a number belongs is a mistake
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(path, f"expected {describe(hint)}, got {value!r}")


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
