"""Stage configuration: one dataclass per stage, filled in layers, each overriding the last:

    dataclass defaults (the paper's values)  <  a named preset  <  a JSON/TOML file  <  CLI flags

Every field of a stage's config dataclass becomes a `--field-name` flag automatically, so the
dataclass is the single place that shows the real hyperparameters (and their documentation).

A config may nest other configs: a field whose type is a dataclass (the demo's DemoConfig holds its
stages' SFTConfig, PPOConfig, ...). A nested field is named by its dotted path, everywhere:

    flag         --ppo.lr 1e-4, --ppo.batch-size 8     (--PATH, "_" spelled "-"; "." stays)
    JSON file    {"ppo": {"lr": 1e-4, "batch_size": 8}}
    TOML file    [ppo]  lr = 1e-4  (or ppo.lr = 1e-4)
    overrides    {"ppo": {"lr": 1e-4}} or {"ppo.lr": 1e-4}

A nested config that is only partly given keeps the rest of the *outer* field's default (the demo's
PPO settings, not PPOConfig's own defaults). Two optional class attributes of the outer config:

    ALIASES: ClassVar[dict[str, tuple[str, ...]]]   an old flat name -> the path(s) it sets; it works
        as a flag (--ppo-lr) and as a file key; where a source gives both, the path wins
    DERIVED: ClassVar[dict[str, str]]   path -> what __post_init__ computes it from: no flag, and an
        error where a file or override sets it

A file's unknown field, derived field or value of the wrong type is an error naming the file and
the field's path.

Ranges. Each config dataclass states its fields' rules in `__post_init__`, with the `require_*`
functions below (a count >= 1, a ratio in [0, 1], every float finite, ...): a bad value is refused
however the config is made (code, preset, file or flag). Such an error (ConfigError) names the
field; `build_config` then names where the value came from: the flag (--batch-size), the file and
field (c.json: ppo.lr) or the preset. Plain options that are not config fields (--limit, --port)
get the same rules from argparse with the `type=` functions at the end of this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import tomllib
import types
import typing
from pathlib import Path


def _field_type(cls, f: dataclasses.Field):
    t = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(t) in (typing.Union, types.UnionType):  # `int | None` -> int
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _optional(cls, f: dataclasses.Field) -> bool:
    return type(None) in typing.get_args(typing.get_type_hints(cls)[f.name])


def _nested(cls, f: dataclasses.Field):
    """The dataclass type of a nested config field, else None."""
    t = _field_type(cls, f)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _flag(path: str) -> str:
    return "--" + path.replace("_", "-")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


_PARSE = {bool: _parse_bool, int: int, float: float, str: str}  # the flag types; other fields: file only


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """Add --config FILE and one --field-name flag per field of dataclass `cls` (default: unset), and
    one --path.field-name flag per field of each nested config (a group of its own)."""
    parser.add_argument("--config", default=None, help="JSON or TOML file with fields of the config")
    aliases, derived = getattr(cls, "ALIASES", {}), getattr(cls, "DERIVED", {})
    old_name = {paths[0]: old for old, paths in aliases.items() if len(paths) == 1}

    def add_fields(group, owner, prefix: str, defaults) -> None:
        for old, paths in aliases.items():  # an old name that sets several fields: a flag of its own
            if len(paths) > 1 and paths[0].rpartition(".")[0] == prefix[:-1]:
                t = _resolve(cls, paths[0])
                group.add_argument(_flag(old), dest="cfg_" + old, type=_PARSE[t], default=None,
                                   metavar=t.__name__.upper(), help=f"sets {', '.join(paths)}")
        nested = []
        for f in dataclasses.fields(owner):
            path = prefix + f.name
            if path in derived:
                continue  # computed from other fields: no flag
            if _nested(owner, f) is not None:
                nested.append((f, path))
                continue
            t = _field_type(owner, f)
            if t not in _PARSE:
                continue  # structured fields are set from the config file only
            if defaults is None:  # the outer config: its own default
                default = f.default if f.default is not dataclasses.MISSING else "(computed)"
            else:  # a nested config: the outer field's default value
                default = getattr(defaults, f.name)
            names = [_flag(path)] + ([_flag(old_name[path])] if path in old_name else [])
            group.add_argument(*names, dest="cfg_" + path, type=_PARSE[t], default=None, metavar=t.__name__.upper(),
                               help=f"default {default}")
        for f, path in nested:
            sub = _nested(owner, f)
            value = _default(f) if defaults is None else getattr(defaults, f.name)
            made = sorted(p for p in derived if p.startswith(path + "."))
            note = f"; derived, no flag: {', '.join(made)}" if made else ""
            add_fields(parser.add_argument_group(f"{sub.__name__} fields of {path} ({_flag(path)}.FIELD{note})"),
                       sub, path + ".", None if value is dataclasses.MISSING else value)

    add_fields(parser.add_argument_group(f"{cls.__name__} fields (override the preset and --config)"), cls, "", None)


def _resolve(cls, path: str):
    """The type of the field at `path` ("ppo.lr") of cls."""
    *outer, name = path.split(".")
    for part in outer:
        cls = _nested(cls, {f.name: f for f in dataclasses.fields(cls)}[part])
    return _field_type(cls, {f.name: f for f in dataclasses.fields(cls)}[name])


def read_config_file(path) -> dict:
    path = Path(path)
    try:
        if path.suffix == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{path}: invalid {path.suffix[1:].upper() or 'JSON'} ({e})") from None


def build_config(cls, presets: dict, preset: str | None = None, file: str | None = None, overrides=None):
    """The config for a run: preset, then file, then overrides (a dict or parsed CLI args)."""
    values: dict = {}
    given: dict[str, str] = {}  # path -> where its value came from, for an out-of-range error (last source wins)
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(presets)}")
        values.update(dataclasses.asdict(presets[preset]))
    if file is not None:
        tree = _checked(cls, _tree(cls, read_config_file(file)), str(file))
        _merge(values, tree)
        given.update({path: f"{file}: {path}" for path in _leaves(tree)})
    flags: dict[str, str] = {}
    if isinstance(overrides, argparse.Namespace):
        overrides = {k[4:]: v for k, v in vars(overrides).items() if k.startswith("cfg_") and v is not None}
        aliases = getattr(cls, "ALIASES", {})
        for key in sorted(overrides, key=lambda k: k not in aliases):  # as _tree: a path given too wins
            flags.update({path: _flag(key) for path in aliases.get(key, (key,))})
    if overrides:
        tree = _checked(cls, _tree(cls, overrides), "overrides")
        _merge(values, tree)
        given.update({path: flags.get(path, f"overrides: {path}") for path in _leaves(tree)})
    try:
        return _construct(cls, values)
    except ConfigError as e:  # name the source: the first of the fields it names that a file or flag set
        path = next((p for p in e.paths if _source(given, p)), e.paths[0])
        where = _source(given, path) or (f"preset {preset!r}: {path}" if preset is not None else path)
        raise ValueError(f"{where}: {e.problem}") from None


def _leaves(tree: dict, prefix: str = "") -> list[str]:
    """The dotted paths of the values in a nested dict."""
    out = []
    for k, v in tree.items():
        out += _leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [prefix + k]
    return out


def _source(given: dict, path: str) -> str | None:
    """Where the value at `path` came from; for a table field (a dict), where a part of it came from."""
    return given.get(path) or next((w for p, w in given.items() if p.startswith(path + ".")), None)


def _tree(cls, data: dict) -> dict:
    """Flat, dotted, aliased or nested keys -> one nested dict. Aliases first: a path given too wins."""
    aliases = getattr(cls, "ALIASES", {})
    tree: dict = {}
    for key in sorted(data, key=lambda k: k not in aliases):  # stable: aliases, then the rest in order
        for path in aliases.get(key, (key,)):
            *outer, name = path.split(".")
            node = tree
            for part in outer:
                node = node.setdefault(part, {})
                if not isinstance(node, dict):
                    break  # a non-table given for a nested config: _checked says so
            else:
                _merge(node, {name: data[key]})
    return tree


def _merge(into: dict, data: dict) -> None:
    """into |= data, recursively for nested dicts."""
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _checked(cls, tree: dict, where: str, derived=None, prefix: str = "") -> dict:
    """`tree` with ints in float fields as floats; raises on unknown or derived fields and wrong types."""
    derived = getattr(cls, "DERIVED", {}) if derived is None else derived  # the outer config's
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [prefix + k for k in tree if k not in fields]
    if unknown:
        root = cls.__name__ if not prefix else f"{cls.__name__} ({prefix[:-1]})"
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} for {root}")
    out = {}
    for name, v in tree.items():
        f, path = fields[name], prefix + name
        if path in derived:
            raise ValueError(f"{where}: {path} is derived from {derived[path]}; set that instead")
        sub, t = _nested(cls, f), _field_type(cls, f)
        if sub is not None:
            if not isinstance(v, dict):
                raise ValueError(f"{where}: {path}: expected a table of {sub.__name__} fields, got {v!r}")
            out[name] = _checked(sub, v, where, derived, path + ".")
            continue
        ok = (v is None and _optional(cls, f)) or t not in _PARSE or \
            (isinstance(v, t) and not (t is int and isinstance(v, bool))) or \
            (t is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            raise ValueError(f"{where}: {path}: expected {t.__name__}, got {type(v).__name__} {v!r}")
        try:
            out[name] = float(v) if t is float and v is not None else v
        except OverflowError:  # an int too large for a float
            raise ValueError(f"{where}: {path}: expected a finite number, got {v!r}") from None
    return out


def _construct(cls, values: dict, defaults=None):
    """cls(**values), each nested config built from its dict on top of its default value: the field's
    default in `cls`, or in `defaults` (an instance of cls: a nested config's default) when given."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v, sub = values[f.name], _nested(cls, f)
        if sub is not None and isinstance(v, dict):
            base = _default(f) if defaults is None else getattr(defaults, f.name)
            base = base if dataclasses.is_dataclass(base) else None
            full = dataclasses.asdict(base) if base is not None else {}
            _merge(full, v)
            try:
                v = _construct(sub, full, base)
            except ConfigError as e:
                raise ConfigError(tuple(f"{f.name}.{p}" for p in e.paths), e.problem) from None
        kwargs[f.name] = v
    return cls(**kwargs)


# ----------------------------------------------------------------------------- ranges of values

class ConfigError(ValueError):
    """A config field whose value breaks its rule. `paths` names the field (dotted inside a nested
    config); a rule relating several fields names them all, and build_config reports the first of them
    that a file or flag set."""

    def __init__(self, paths: str | tuple[str, ...], problem: str):
        self.paths = (paths,) if isinstance(paths, str) else tuple(paths)
        self.problem = problem
        super().__init__(f"{self.paths[0]}: {problem}")


SEED_MAX = 2**32 - 1  # seeds are in [0, 2**32): every random generator here takes them, with room for seed·N + k


def _rule(integer: bool, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> str:
    """The rule in words: "an integer >= 1", "a number in (0, 1]", "a finite number"."""
    kind = "an integer" if integer else "a number"
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind if integer else "a finite number"


def _problem(value, integer: bool, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False) -> str | None:
    """What is wrong with `value` under the rule (the message after the field's name), or None."""
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float)) and \
        (integer or isinstance(value, int) or math.isfinite(value)) and \
        (lo is None or (value > lo if lo_open else value >= lo)) and \
        (hi is None or (value < hi if hi_open else value <= hi))
    return None if ok else f"expected {_rule(integer, lo, hi, lo_open, hi_open)}, got {value!r}"


def _is_int(cfg, name: str) -> bool:
    """Whether field `name` of the config is an int field (else a float one)."""
    f = {f.name: f for f in dataclasses.fields(cfg)}[name]
    return _field_type(type(cfg), f) is int


def require_range(cfg, lo, hi, *names: str, lo_open: bool = False, hi_open: bool = False) -> None:
    """Each named field within [lo, hi] (lo or hi None: unbounded; *_open: the bound excluded),
    an integer for an int field, a finite number for a float one. Raises ConfigError."""
    for name in names:
        problem = _problem(getattr(cfg, name), _is_int(cfg, name), lo, hi, lo_open, hi_open)
        if problem:
            raise ConfigError(name, problem)


def require_positive(cfg, *names: str) -> None:
    """Counts and sizes (int fields) >= 1; rates, scales and epsilons (float fields) > 0."""
    for name in names:
        integer = _is_int(cfg, name)
        require_range(cfg, 1 if integer else 0, None, name, lo_open=not integer)


def require_nonnegative(cfg, *names: str) -> None:
    """>= 0: counts where 0 means "off" or "all" (read the field's comment), coefficients, temperatures."""
    require_range(cfg, 0, None, *names)


def require_fraction(cfg, *names: str) -> None:
    """In [0, 1]: probabilities, ratios, fractions."""
    require_range(cfg, 0, 1, *names)


def require_seed(cfg, *names: str) -> None:
    """An integer in [0, 2**32 - 1]."""
    require_range(cfg, 0, SEED_MAX, *names)


def require_finite(cfg) -> None:
    """Every int field an integer, every float field a finite number (no NaN, no infinity): the rule of
    a field that has no range. Fields that may be None skip None."""
    for f in dataclasses.fields(cfg):
        t, value = _field_type(type(cfg), f), getattr(cfg, f.name)
        if t in (int, float) and not (value is None and _optional(type(cfg), f)):
            problem = _problem(value, t is int)
            if problem:
                raise ConfigError(f.name, problem)


def require_choice(cfg, name: str, choices) -> None:
    """A string field that must be one of `choices`."""
    if getattr(cfg, name) not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {getattr(cfg, name)!r}")


# Plain options (argparse `type=`), the same rules for a command's options that are not config fields.
# A bad value is argparse's error: `minihuatuo CMD: error: argument --limit: expected an integer >= 0, got -1`.

def option_type(integer: bool, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False):
    """An argparse `type=` function: parse the text as an int (or a float) and check the rule."""
    def parse(text: str):
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_rule(integer, lo, hi, lo_open, hi_open)}, "
                                             f"got {text!r}") from None
        problem = _problem(value, integer, lo, hi, lo_open, hi_open)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = "int" if integer else "float"
    return parse


positive_int = option_type(True, lo=1)  # a count or a size
nonnegative_int = option_type(True, lo=0)  # a count where 0 means "all" or "off"
seed_int = option_type(True, lo=0, hi=SEED_MAX)
nonnegative_float = option_type(False, lo=0)  # a temperature, a wait in seconds
fraction = option_type(False, lo=0, hi=1)  # a probability, a threshold
top_p_float = option_type(False, lo=0, hi=1, lo_open=True)  # nucleus mass: (0, 1], 1 = off
port_int = option_type(True, lo=0, hi=65535)  # 0 = any free port
