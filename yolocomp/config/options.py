"""The machinery behind the stage configs: one ``option()`` per setting carries its default, help, choices and check.

A config dataclass declared with these options is the single source of a stage's vocabulary: recipe validation,
the generated CLI flags, the API keyword arguments and the ``settings`` written into reports all read it.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from yolocomp.errors import UserError

#: A check returns an error fragment (``"1.5 is outside (0, 1)"``) or None when the value is fine.
Check = Callable[[Any], "str | None"]


def option(default: Any, help: str, *, hint: str, check: Check | None = None, choices: Iterable[Any] | None = None,
           cli: bool = True, metavar: str | None = None) -> Any:
    """A config field: ``hint`` is the fix an error message suggests; ``cli=False`` keeps it out of the flags
    (recipe and API only, e.g. nested mappings)."""
    choices = tuple(choices) if choices is not None else None
    if choices is not None and check is None:
        check = one_of(*choices)
    meta = {"help": help, "hint": hint, "check": check, "choices": choices, "cli": cli, "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# --- checks ---------------------------------------------------------------------------------------------------------
def valid_ratio(v: Any) -> str | None:
    return None if 0 < v < 1 else f"{v} is outside (0, 1)"


def valid_fraction(v: Any) -> str | None:
    return None if 0 < v <= 1 else f"{v} is outside (0, 1]"


def probability(v: Any) -> str | None:
    return None if 0 <= v < 1 else f"{v} is outside [0, 1)"


def positive(v: Any) -> str | None:
    return None if v > 0 else f"{v} must be > 0"


def non_negative(v: Any) -> str | None:
    return None if v >= 0 else f"{v} must be >= 0"


def at_least(n: int) -> Check:
    def check(v: Any) -> str | None:
        return None if v >= n else f"{v} must be >= {n}"

    return check


def valid_bits(v: Any) -> str | None:
    return None if v in (4, 8) else f"{v} is not 4 or 8"


def valid_image_size(v: Any) -> str | None:
    return None if v >= 32 and v % 32 == 0 else f"{v} must be a multiple of 32 and >= 32"


def each(check: Check) -> Check:
    """Apply ``check`` to every item of a list value."""

    def check_items(v: Any) -> str | None:
        for item in v:
            if (problem := check(item)) is not None:
                return problem
        return None

    return check_items


def one_of(*choices: Any) -> Check:
    def check(v: Any) -> str | None:
        return None if v in choices else f"'{v}' is not one of {', '.join(map(str, choices))}"

    return check


# --- reading a config class -----------------------------------------------------------------------------------------
def fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _accepted_types(annotation: Any) -> tuple[type, ...]:
    """Python types a value of this annotation may have (``int | None`` -> (int, NoneType); list[int] -> (list,))."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return tuple(t for arg in typing.get_args(annotation) for t in _accepted_types(arg))
    if origin is not None:
        return (origin,)
    if annotation is Any:
        return (object,)
    return (annotation,)


def _item_type(annotation: Any) -> type | None:
    """The item type of a ``list[X]`` annotation (inside an optional), else None."""
    for arg in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(arg) is list and typing.get_args(arg):
            item = typing.get_args(arg)[0]
            return item if isinstance(item, type) else None
    return None


def annotations(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def defaults(cls: type) -> dict[str, Any]:
    return dataclasses.asdict(cls())


def check_values(cls: type, values: dict, where: str, source: str) -> list[str]:
    """Every problem of ``values`` against ``cls``'s options, one line each, naming the key and the fix."""
    spec, hints, errors = fields(cls), annotations(cls), []
    for key, value in values.items():
        if key not in spec:
            close = difflib.get_close_matches(key, list(spec), n=1) or [k for k in spec if k.startswith(key[:3])]
            hint = f"did you mean {close[0]}?" if close else f"known keys: {', '.join(spec)}"
            errors.append(f"{source}: unknown key {where}{key}; {hint}")
            continue
        meta, types_ = spec[key].metadata, _accepted_types(hints[key])
        if isinstance(value, bool) and bool not in types_:  # bool is an int subclass: refuse True for an int field
            ok = False
        else:
            ok = isinstance(value, types_) or (float in types_ and isinstance(value, int))
        if not ok:
            names = "/".join("null" if t is type(None) else t.__name__ for t in types_)
            errors.append(f"{source}: {where}{key} = {value!r} should be {names}; {meta['hint']}")
        elif meta.get("check") is not None and value is not None and (problem := meta["check"](value)):
            errors.append(f"{source}: {where}{key} = {problem}; {meta['hint']}")
    return errors


def gather_trainer_args(cls: type, values: dict) -> dict:
    """For a training stage, move keys that are Ultralytics train arguments (``warmup_epochs``, ``mosaic``...) and not
    options of ``cls`` into its ``trainer`` mapping, so recipes and API calls can name them directly."""
    spec = fields(cls)
    unknown = [k for k in values if k not in spec]
    if "trainer" not in spec or not unknown:
        return values
    from ultralytics.cfg import DEFAULT_CFG_DICT

    moved = {k: values[k] for k in unknown if k in DEFAULT_CFG_DICT}
    if not moved:
        return values
    kept = {k: v for k, v in values.items() if k not in moved}
    kept["trainer"] = {**(values.get("trainer") or {}), **moved}
    return kept


def build(cls: type, values: dict, where: str = "", source: str = "arguments") -> Any:
    """An instance of ``cls`` from ``values`` (defaults fill the rest); one UserError listing every problem."""
    values = gather_trainer_args(cls, values)
    errors = check_values(cls, values, where, source) or problems(cls, values, where, source)
    if errors:
        raise UserError("\n".join(errors))
    return cls(**values)


def problems(cls: type, values: dict, where: str, source: str) -> list[str]:
    """Problems between options (a config's ``problems(values)`` classmethod), one line each."""
    found = cls.problems(values) if hasattr(cls, "problems") else []
    return [f"{source}: {where.rstrip('.')} {p}" for p in found]


def settings(config: Any) -> dict:
    """Every option of a config instance, as written into reports."""
    return dataclasses.asdict(config)


# --- command-line flags -----------------------------------------------------------------------------------------------
def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | Any, cls: type, skip: Iterable[str] = (),
              defaults_from_config: bool = False) -> None:
    """One flag per option of ``cls``; help text, choices and types come from the option.

    Flags default to None ("not given") so that a recipe's value survives unless the flag is set; with
    ``defaults_from_config`` (commands without a recipe) the config's default becomes the flag's default."""
    hints, skip = annotations(cls), set(skip)
    for name, f in fields(cls).items():
        meta = f.metadata
        if not meta.get("cli", True) or name in skip:
            continue
        default = defaults(cls)[name]
        shown = "" if default is None else f" (default: {_show(default)})"  # unset options say what unset means
        kwargs: dict[str, Any] = {"help": meta["help"] + shown, "dest": name}
        if defaults_from_config:
            kwargs["default"] = default
        types_ = [t for t in _accepted_types(hints[name]) if t is not type(None)]
        if types_ == [bool]:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif types_ == [list]:
            kwargs.update(nargs="+", type=_item_type(hints[name]) or str)
        else:
            kwargs["type"] = float if float in types_ else types_[0] if types_[0] in (int, str) else str
            if meta.get("choices"):
                kwargs["choices"] = list(meta["choices"])
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        parser.add_argument(flag_name(name), **kwargs)


def given_flags(args: argparse.Namespace, cls: type) -> dict:
    """The options of ``cls`` that were set on the command line (None = not given)."""
    return {k: getattr(args, k) for k in fields(cls) if getattr(args, k, None) is not None}


def _show(value: Any) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    return str(value)
