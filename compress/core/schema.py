"""Typed configs: fields with ranges and per-method use, checked when a config is built
(from Python or from YAML), and the safe YAML reader recipes go through.

A config is a dataclass deriving from :class:`Config`. Its fields are made with
:func:`option`, which carries the allowed range and the methods that read the option;
``Config.__post_init__`` checks every field's type, choices and range, then the config's
own cross-field rules (``check``). Parsing plain data (:func:`parse_config`) gives the same
errors, with the YAML key path in front.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

import yaml

from compress.core.errors import RecipeError

# An integer option without its own upper bound takes at most this (a C int, what torch's
# and numpy's consumers of counts and sizes accept).
INT_MAX = 2**31 - 1
# Values a recipe may hold in all (aliases counted each time they are used): a recipe is a
# page of settings; this stops a small file that expands to millions of values.
MAX_RECIPE_VALUES = 100_000
MAX_RECIPE_DEPTH = 32


class FieldError(RecipeError):
    """A config value that is not valid: ``key`` (a path inside the config) and why."""

    def __init__(self, key: str, message: str, owner: str | None = None):
        self.key, self.message, self.owner = key, message, owner
        where = f"{owner}.{key}" if owner else key
        super().__init__(f"{where or '<top>'}: {message}")


def option(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    min: float | None = None,  # noqa: A002 - reads as the YAML docs say it
    max: float | None = None,  # noqa: A002
    methods: tuple[str, ...] | None = None,
    defaults: dict | None = None,
) -> Any:
    """A config field: its default, its allowed range, and which of the config's methods read
    it (None: every method). ``defaults`` are a nested config's own defaults, applied under
    the keys a recipe gives.

    Example:
        >>> group_size: int = option(128, min=8, max=65536, methods=("int4_weight_only",))
    """
    metadata = {"min": min, "max": max, "methods": methods, "defaults": defaults or {}}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclasses.dataclass
class Config:
    """Base of every typed config: checked when constructed.

    Example:
        >>> TrainConfig(epochs=-1)
        Traceback (most recent call last):
        FieldError: TrainConfig.epochs: -1 is out of range (must be >= 0)
    """

    def __post_init__(self) -> None:
        try:
            hints = typing.get_type_hints(type(self))
            for spec in dataclasses.fields(self):
                value = coerce(hints[spec.name], getattr(self, spec.name), spec.name, spec.metadata)
                object.__setattr__(self, spec.name, value)
            method = getattr(self, "method", None)
            if method is not None:
                _check_method_options(self, method)
            self.check()
        except FieldError as error:
            if error.owner is None:
                raise FieldError(error.key, error.message, type(self).__name__) from None
            raise

    def check(self) -> None:
        """Rules across fields; raise :class:`FieldError` naming the key."""


def method_options(config: type, method: str) -> set[str]:
    """The options ``method`` of ``config`` reads (``method`` itself included)."""
    return {
        f.name
        for f in dataclasses.fields(config)
        if f.metadata.get("methods") is None or method in f.metadata["methods"]
    }


def methods_of(config: type) -> tuple[str, ...]:
    """The values a config's ``method`` field takes (its ``Literal``), first the default."""
    return typing.get_args(typing.get_type_hints(config)["method"])


def _check_method_options(config: Config, method: str) -> None:
    """A Python-built config may not set an option its method does not read (a recipe gets
    the same rule for the keys it gives, in :func:`parse_config`)."""
    used = method_options(type(config), method)
    for spec in dataclasses.fields(config):
        if spec.name in used:
            continue
        default = (
            spec.default_factory()
            if spec.default_factory is not dataclasses.MISSING
            else spec.default
        )
        if getattr(config, spec.name) != default:
            raise FieldError(spec.name, _unused(spec.name, method, used))


def _unused(key: str, method: str, used: set[str]) -> str:
    return f"not used by method {method!r} (its options: {', '.join(sorted(used))})"


def parse_config(cls: type, raw: Any, path: str = "") -> Any:
    """Plain data (a mapping from YAML) as the config ``cls``; a :class:`FieldError` names
    the key path (``stages[0].quantize.observer``) of anything not valid.

    Example:
        >>> parse_config(TrainConfig, {"epochs": 2, "lr": 0.01}).epochs
        2
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise FieldError(path, f"expected a mapping of keys, got {raw!r}")
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields_by_name:
            raise FieldError(
                join(path, printable(key)),
                f"unknown key {key!r}; {suggest(key, list(fields_by_name))}",
            )
    for name, spec in fields_by_name.items():
        missing = (
            spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING
        )
        if missing and name not in raw:
            raise FieldError(join(path, name), f"required key {name!r} is missing")
    hints = typing.get_type_hints(cls)
    values = {
        name: coerce(hints[name], value, join(path, name), fields_by_name[name].metadata)
        for name, value in raw.items()
    }
    if "method" in fields_by_name:
        method = values.get("method", fields_by_name["method"].default)
        used = method_options(cls, method)
        for key in raw:
            if key not in used:
                raise FieldError(join(path, key), _unused(key, method, used))
    try:
        return cls(**values)
    except FieldError as error:  # a rule across fields: name the key under this path
        raise FieldError(join(path, error.key), error.message) from None


def coerce(hint: Any, value: Any, path: str, limits: dict | Any = None) -> Any:
    """``value`` checked against the type ``hint`` and the field's ``limits`` (its range,
    a nested config's defaults); ints become floats where a float is asked for."""
    limits = limits or {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return coerce(options[0], value, path, limits)
        raise AssertionError(f"unsupported union {hint}")  # schema bug, not user input
    if value is None:
        raise FieldError(path, f"a value is required ({_type_name(hint)}), got null")
    if origin is Literal:
        if value not in args:
            raise FieldError(path, f"{value!r} is not a valid choice; {suggest(value, list(args))}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, dict):
            value = {**limits.get("defaults", {}), **value}
        return parse_config(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise FieldError(path, f"expected a list, got {value!r}")
        return [coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise FieldError(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise FieldError(path, f"expected true or false, got {value!r}")
        return value
    if hint in (int, float):
        ok = isinstance(value, int if hint is int else (int, float)) and not isinstance(value, bool)
        if not ok:
            kind = "an integer" if hint is int else "a number"
            raise FieldError(path, f"expected {kind}, got {value!r}")
        if not math.isfinite(value):
            raise FieldError(path, f"{value!r} is not a finite number")
        low, high = limits.get("min"), limits.get("max")
        if hint is int and high is None:
            high = INT_MAX
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise FieldError(path, f"{value!r} is out of range (must be {bounds})")
        return hint(value)
    if hint is str:
        if not isinstance(value, str):
            raise FieldError(path, f"expected a string, got {value!r}")
        if value.startswith("re:"):  # a module pattern: compiled now, not when a stage runs
            try:
                re.compile(value[3:])
            except re.error as error:
                raise FieldError(path, f"{value!r} is not a valid regex ({error})") from None
        return value
    raise AssertionError(f"unsupported schema type {hint} at {path}")  # schema bug


def suggest(bad: Any, allowed: list) -> str:
    """``did you mean 'x'? (allowed: ...)`` for a value that is not among ``allowed``."""
    close = difflib.get_close_matches(str(bad), [str(a) for a in allowed], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{hint}(allowed: {', '.join(str(a) for a in allowed)})"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def printable(key) -> str:
    """A key as a path names it: as written, or quoted where it holds a line break or other
    unprintable character (an error stays one line)."""
    text = str(key)
    return text if text.isprintable() else repr(text)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


# libyaml's safe loader where PyYAML was built with it (its wheels are): it scans in linear
# time, where the pure-Python scanner's time grows with the square of the nesting (5,000
# nested brackets: 0.002 s against 1.3 s), and it caps nesting at 1,000 levels.
_SAFE_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SAFE_LOADER):  # type: ignore[valid-type,misc]  # chosen at import
    """PyYAML's safe loader, refusing a mapping that gives a key twice (which PyYAML would
    silently resolve to the last value)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str, source: str) -> Any:
    """Plain data from YAML ``text``: a :class:`RecipeError` naming ``source`` and the line
    for anything that is not valid YAML, repeats a key, or nests or expands too far.

    Example:
        >>> read_yaml("train: {epochs: 2}", "<text>")
        {'train': {'epochs': 2}}
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a (C)SafeLoader subclass
    except yaml.YAMLError as error:
        if "maximum nesting depth" in str(error):  # libyaml's cap
            raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}: not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise RecipeError(f"{source}: nested too deeply to be a recipe") from None
    _check_size(data, source)
    return data


def _check_size(data: Any, source: str) -> None:
    budget = [MAX_RECIPE_VALUES]

    def walk(value, depth):
        budget[0] -= 1
        if budget[0] < 0 or depth > MAX_RECIPE_DEPTH:
            raise RecipeError(
                f"{source}: nested too deeply (over {MAX_RECIPE_DEPTH} levels) or too large (over"
                f" {MAX_RECIPE_VALUES} values, aliases counted where used): not a recipe"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                walk(key, depth + 1)
                walk(item, depth + 1)
        elif isinstance(value, list):
            for item in value:
                walk(item, depth + 1)

    walk(data, 0)
