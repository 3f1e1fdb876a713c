"""Stage configuration: one dataclass per stage, filled in three layers, each overriding the last:

    dataclass defaults (the paper's values)  <  a named preset  <  a JSON/TOML file  <  CLI flags

Every field of a stage's config dataclass becomes a `--field-name` flag automatically, so the
dataclass is the single place that shows the real hyperparameters (and their documentation).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path


def _field_type(cls, f: dataclasses.Field):
    t = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(t) in (typing.Union, types.UnionType):  # `int | None` -> int
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_config_args(parser: argparse.ArgumentParser, cls) -> None:
    """Add --config FILE and one --field-name flag per field of dataclass `cls` (default: unset)."""
    parser.add_argument("--config", default=None, help="JSON or TOML file with fields of the config")
    group = parser.add_argument_group(f"{cls.__name__} fields (override the preset and --config)")
    for f in dataclasses.fields(cls):
        t = _field_type(cls, f)
        kind = {bool: _parse_bool, int: int, float: float, str: str}.get(t)
        if kind is None:
            continue  # structured fields are set from the config file only
        default = f.default if f.default is not dataclasses.MISSING else "(computed)"
        group.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, type=kind, default=None,
                           metavar=t.__name__.upper(), help=f"default {default}")


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
    if preset is not None:
        if preset not in presets:
            raise ValueError(f"unknown preset {preset!r}; known: {', '.join(presets)}")
        values.update(dataclasses.asdict(presets[preset]))
    if file is not None:
        known = {f.name for f in dataclasses.fields(cls)}
        data = read_config_file(file)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{file}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
        values.update(data)
    if isinstance(overrides, argparse.Namespace):
        overrides = {k[4:]: v for k, v in vars(overrides).items() if k.startswith("cfg_") and v is not None}
    values.update(overrides or {})
    return cls(**values)
