"""Stage configs: dataclasses filled from `--config FILE.yaml`, then `--key value` overrides.

The convention of TrlParser / HfArgumentParser, with errors that are one line naming the key or
file (raised as UserError; the CLI turns them into exit code 2).
"""

from __future__ import annotations

import dataclasses
import difflib
import keyword
import math
import operator
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlhf.errors import UserError

T = TypeVar("T")

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}


# Value constraints a field declares; build() checks them all (check_constraints), so a bad value is
# refused with one line before a stage creates, loads or trains anything.
_BOUNDS: dict[str, tuple[str, Any]] = {"min": (">=", operator.ge), "gt": (">", operator.gt),
                                       "max": ("<=", operator.le), "lt": ("<", operator.lt)}


def field(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
          min: float | None = None, max: float | None = None,  # noqa: A002
          gt: float | None = None, lt: float | None = None, finite: bool = True, why: str = "",
          **kw: Any) -> Any:
    """A dataclass field with a help text and value constraints (mutable defaults go through default_factory).

    min/max are inclusive bounds, gt/lt exclusive ones (gt=0: strictly positive); for a list they apply
    to every item. A float is finite (no nan/inf) unless finite=False. `why` is added to the error
    (e.g. where a bound comes from). Choices are `Literal[...]` types, which coerce() checks.
    """
    bounds = {k: v for k, v in (("min", min), ("gt", gt), ("max", max), ("lt", lt)) if v is not None}
    metadata = {"help": help, "bounds": bounds, "finite": finite, "why": why}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


# numpy (HF's set_seed, sklearn, stable-baselines3) takes seeds in [0, 2**32): `field(0, **SEED)`
SEED: dict[str, Any] = {"min": 0, "max": 2**32 - 1, "why": "numpy's seed range"}


def constraint_text(f: dataclasses.Field) -> str:
    """'>= 1', '> 0 and <= 1', ... ('' when the field declares no bounds)."""
    bounds = f.metadata.get("bounds") or {}
    return " and ".join(f"{_BOUNDS[k][0]} {v}" for k, v in bounds.items())


def flag(name: str) -> str:
    """The command-line spelling of a field: `from_` is `--from`."""
    return name[:-1] if name.endswith("_") and keyword.iskeyword(name[:-1]) else name


def field_name(key: str) -> str:
    """A key as written (`--key-name`, `from`) -> the field it fills (`key_name`, `from_`)."""
    name = str(key).replace("-", "_")
    return name + "_" if keyword.iskeyword(name) else name


def _violation(value: Any, f: dataclasses.Field) -> str:
    """What is wrong with one value of field `f` ('' if nothing)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return ""
    bounds = constraint_text(f)
    if isinstance(value, float) and f.metadata.get("finite", True) and not math.isfinite(value):
        return "must be a finite number" + (f" {bounds}" if bounds else "")
    for key, bound in (f.metadata.get("bounds") or {}).items():
        if not _BOUNDS[key][1](value, bound):
            return f"must be {bounds}"
    return ""


def check_constraints(obj: Any, where: str) -> None:
    """Refuse, in one line naming key, value, rule and a fix, any value outside its field's constraints."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for item in value if isinstance(value, list) else [value]:
            problem = _violation(item, f)
            if not problem:
                continue
            why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
            shown = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            if f.default_factory is not dataclasses.MISSING:
                fix = f"e.g. --{flag(f.name)} {','.join(map(str, f.default_factory()))} (the default)"
            elif f.default is not dataclasses.MISSING and f.default is not None:
                fix = f"e.g. --{flag(f.name)} {f.default} (the default)"
            else:
                number = f"a {'finite ' if isinstance(item, float) else ''}number {constraint_text(f)}".rstrip()
                fix = f"pass {number}" + (" or leave the key out" if f.default is None else "")
            raise UserError(f"{where}: --{flag(f.name)} {shown}: {problem}{why}; {fix}")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from YAML or the command line) to the field type `tp`."""
    tp, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in {"none", "null"}):
        if optional:
            return None
        raise UserError(f"{where}: a value is required (got null)")
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value))
        except ValueError:
            raise UserError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        for c in choices:  # command-line values arrive as strings
            if str(c) == str(value):
                return c
        raise UserError(f"{where}: expected one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is list or origin is dict or tp is dict:
        return _coerce_container(value, tp, where)
    return value


def _coerce_container(value: Any, tp: Any, where: str) -> Any:
    """A list (a comma-separated string on the command line) or a mapping (YAML/JSON text there)."""
    if typing.get_origin(tp) is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, list):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{where}[{i}]") if item_tp is not Any else v for i, v in enumerate(value)]
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"{where}: expected a mapping (YAML/JSON), got {value!r}") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    return value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8 YAML") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); pass a YAML file you can read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of key: value")
    return data


def _unknown(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(sorted(known))}"
    return UserError(f"{where}: unknown key '{key}'{hint}")


def build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Instantiate config dataclass `cls` from a mapping, checking every key and type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = field_name(key)
        if name not in fields:
            raise _unknown(str(key), list(fields), where)
        kwargs[name] = coerce(value, hints[name], f"{where}: key '{name}'")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        key = missing[0]
        raise UserError(f"{where}: missing required key '{key}' (set it in the YAML or pass --{flag(key)} VALUE)")
    obj = cls(**kwargs)
    check_constraints(obj, where)  # each field's own rules first: validate() may rely on them (no zero divisors)
    check = getattr(obj, "validate", None)
    if callable(check):
        check()
    return obj


def split_overrides(argv: list[str], bool_keys: set[str]) -> tuple[str | None, dict[str, str | bool]]:
    """Split `--config F --key value --flag --key=value` into (config path, overrides)."""
    config: str | None = None
    overrides: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            raise UserError(f"unexpected argument {tok!r}: options are written --key value")
        key, eq, val = tok[2:].partition("=")
        key = field_name(key)  # `--key-name` is `--key_name`; `--from` fills the field `from_` (PEP 8's spelling)
        if not eq:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if nxt is None or (nxt.startswith("--") and len(nxt) > 2):
                if key in bool_keys:
                    val = "true"
                else:
                    raise UserError(f"--{flag(key)}: a value is required (write --{flag(key)} VALUE)")
            else:
                val = nxt
                i += 1
        i += 1
        if key == "config":
            config = val
        else:
            overrides[key] = val
    return config, overrides


def parse(cls: type[T], argv: list[str], stage: str) -> T:
    """Build the config of `stage`: YAML first, then command-line overrides win."""
    hints = typing.get_type_hints(cls)
    bool_keys = {n for n, tp in hints.items() if _strip_optional(tp)[0] is bool}
    config_path, overrides = split_overrides(argv, bool_keys)
    values: dict[str, Any] = {}
    if config_path:
        data = load_yaml(config_path)
        # A pipeline YAML may hold a section per stage; a stage run on it picks its own section.
        section = stage.split()[-1]
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if section in data and isinstance(data[section], dict) and section not in known:
            shared = {k: v for k, v in data.items() if not isinstance(v, dict) and k in known}
            data = {**shared, **data[section]}
        values.update(data)
        where = str(config_path)
        for key in values:
            if field_name(key) not in known:
                raise _unknown(str(key), list(known), where)
    for key in overrides:
        if key not in hints:
            raise _unknown(key, list(hints), f"rlhf {stage}")
    values.update(overrides)
    return build(cls, values, f"rlhf {stage}" if not config_path else f"{config_path} (+ command line)")


def help_text(cls: type, stage: str, doc: str) -> str:
    lines = [f"usage: rlhf {stage} [--config FILE.yaml] [--key value ...]", "", doc.strip(), "", "keys:"]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        tp = _strip_optional(hints[f.name])[0]
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        if typing.get_origin(tp) is typing.Literal:  # the choices, not the word "Literal"
            tname = "|".join(map(str, typing.get_args(tp)))
        rule = constraint_text(f)
        lines.append(f"  --{flag(f.name)} {tname} (default: {default!r}{'; ' + rule if rule else ''})")
        if f.metadata.get("help"):
            lines.append(f"      {f.metadata['help']}")
    return "\n".join(lines)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
