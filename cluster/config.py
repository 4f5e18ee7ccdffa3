"""One configuration system for the whole project.

Every job (data pipeline, trainer, benchmarks) describes its settings as nested, typed dataclasses.
This module turns YAML files plus ``key.sub=value`` command-line overrides into those dataclasses,
validating every key and value on the way, and writes the resolved config back out.

    cfg = load_config(TrainConfig, "configs/hstu_ml1m.yaml", ["optim.lr=3e-4", "model.num_blocks=4"])
    save_config(cfg, run_dir / "config.yaml")

Errors are ``ConfigError`` (a ``ValueError``) naming the dotted key, what was given and what is allowed.
Dataclasses may define ``validate(self)`` to check values that a type cannot express; raise
``ConfigError(key, message)`` there.

A file may start from another with ``base: other.yaml`` (relative to the file) and list only the
keys it changes; nested mappings merge key by key, and the overrides apply last.

A section whose keys depend on one of its values (the ``model:`` section: HSTU and TIGER take
different keys) is a ``ConfigChoice``: its ``name`` picks the dataclass that checks the rest, so each
choice has exactly its own keys and a key of another choice is an error that says so.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad key or value in a configuration; the message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key '{key}': {message}")


class ConfigChoice:
    """A config section typed by one of its keys: ``choices[name]`` is the dataclass of the rest.

    Subclass it with ``choices`` (name -> dataclass, the first is the default); each dataclass has a
    ``name: Literal[...]`` field. Calling the subclass builds the chosen dataclass, so it works as a
    ``default_factory`` and as a type for ``load_config``::

        class ModelConfig(ConfigChoice):
            choices = {"hstu": HSTUConfig, "sasrec": SASRecConfig}

        ModelConfig(name="sasrec", num_blocks=3)  # -> SASRecConfig(name="sasrec", num_blocks=3)
    """

    key = "name"
    choices: dict[str, type] = {}

    def __new__(cls, **fields: Any):
        name = fields.get(cls.key, next(iter(cls.choices)))
        if name not in cls.choices:
            raise ConfigError(cls.key, f"got {name!r}, allowed values: {', '.join(map(repr, cls.choices))}")
        return cls.choices[name](**fields)

    @classmethod
    def pick(cls, data: dict[str, Any], prefix: str) -> type:
        """The dataclass that ``data`` (a mapping of this section) names."""
        name = data.get(cls.key, next(iter(cls.choices)))
        if name not in cls.choices:
            key = f"{prefix}.{cls.key}" if prefix else cls.key
            raise ConfigError(key, f"got {name!r}, allowed values: {', '.join(map(repr, cls.choices))}")
        return cls.choices[name]


def _is_choice(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, ConfigChoice)


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is lossless."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(key, f"got {value!r}, expected " + " or ".join(_type_name(a) for a in args))
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans
            for word in ("on", "yes", "true") if value else ("off", "no", "false"):
                if word in allowed:
                    return word
        if value not in allowed:
            raise ConfigError(key, f"got {value!r}, allowed values: {', '.join(repr(a) for a in allowed)}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"got {value!r}, expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        out = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}, expected a mapping")
        _, val_tp = get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if _is_choice(tp) or dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(key, f"got {value!r}, expected a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, f"got {value!r}, expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, f"got {value!r}, expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, f"got {value!r}, expected a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(key, f"got {value!r}, expected a string")
    raise TypeError(f"unsupported annotation {tp!r} for config key '{key}'")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys and bad values."""
    chosen_by = ""
    if _is_choice(cls):
        choice = cls
        cls = choice.pick(data, prefix)
        chosen_by = f" (for {prefix + '.' if prefix else ''}{choice.key}={data.get(choice.key, next(iter(choice.choices)))})"
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(name, f"unknown key{chosen_by}; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    for name, f in fields.items():
        if (
            name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(key, "is required")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (for YAML, JSON and MLflow)."""
    return dataclasses.asdict(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=[x, y]"]`` -> nested dict; values are parsed as YAML scalars or lists."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            problem = str(exc).splitlines()[0]
            raise ConfigError(
                key.strip().lstrip("-"),
                f"value {raw!r} is not valid YAML ({problem}); quote it: {key}='\"...\"'",
            ) from None
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another override of its parent key")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--config", f"file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping at the top level")
    return data


def read_config_file(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file with its ``base:`` chain resolved: the file's keys merged over its base's.

    ``base: hstu_ml1m.yaml`` (a path relative to the file) lets a variant state only what differs.
    """
    path = Path(path)
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError("base", f"in {path}: expected the path of another config file, got {base!r}")
    seen = (*_seen, path.resolve())
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        chain = " -> ".join(str(p) for p in (*seen, base_path))
        raise ConfigError("base", f"in {path}: the base chain loops ({chain}); remove one of the links")
    if not base_path.is_file():
        raise ConfigError("base", f"in {path}: base file {base_path} does not exist")
    return merge(read_config_file(base_path, seen), data)


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """YAML file (optional, with its ``base:`` chain) + overrides -> validated ``cls`` instance."""
    data = read_config_file(path) if path else {}
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(cls, data)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically, so a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
