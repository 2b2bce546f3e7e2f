"""Typed run configuration: the schema (trainer/schema.py) + YAML preset + ``key=value``
overrides.

``load_config(path, overrides)`` merges, in order, the schema's defaults, the YAML file
and the command-line overrides (OmegaConf dotlist syntax: ``train.per_device_batch=2``,
``norm.override.head=null``).  Unknown keys, wrong types, missing required values
(``???``) and out-of-range values fail here, before any model or worker exists, with the
dotted key in the message.  Interpolations (``${train.per_device_batch}``) are resolved
once; the resolved config is what runs, and what gets saved and logged.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import fields, is_dataclass
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from trainer.schema import BatchRenormConfig, Config, ConfigError

__all__ = ["BatchRenormConfig", "Config", "ConfigError", "load_config", "to_yaml", "to_dict"]


def _known_keys(cls, prefix: str = "") -> list[str]:
    keys = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        default = f.default_factory() if callable(f.default_factory) else None
        if is_dataclass(default):
            keys += _known_keys(type(default), key + ".")
        else:
            keys.append(key)
    return keys


def _wrap(exc: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        close = difflib.get_close_matches(key, _known_keys(Config), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return ConfigError(f"unknown config key {key} in {source}{hint}")
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return ConfigError(f"{key}: {msg} (in {source})")


def _check_sections(loaded, source: str) -> None:
    """The file is a mapping of sections, each a mapping: OmegaConf's own errors for a
    list there name no key (``?: Merge error``) or are a TypeError."""
    from omegaconf import DictConfig

    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{source}: the file must be a mapping of sections (run:, data:, train:, ...), "
            f"got a {type(OmegaConf.to_container(loaded)).__name__}"
        )
    if len(loaded) == 0:
        raise ConfigError(
            f"{source} is empty: a config needs at least run.name (see configs/ for presets)"
        )
    for f in fields(Config):
        if f.name in loaded:
            value = loaded[f.name]
            if value is not None and not OmegaConf.is_dict(value):
                shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                raise ConfigError(
                    f"{f.name} in {source} must be a mapping of keys ({f.name}.KEY: value), "
                    f"got {shown!r}"
                )


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Schema defaults <- YAML file <- ``key=value`` overrides, validated and resolved."""
    merged = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"--config {str(path)!r} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file")
        try:
            loaded = OmegaConf.load(path)
            _check_sections(loaded, str(path))
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _wrap(e, str(path)) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{where}: YAML syntax error: {what}") from None
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item.split("=", 1)[0]
        if key in given:
            warnings.warn(
                f"override {key} given twice ({given[key]!r}, then {item!r}): the last wins",
                stacklevel=2,
            )
        given[key] = item
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _wrap(e, f"override {item!r}") from None
    try:
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as e:
        raise _wrap(e, "interpolation") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"missing required config value(s): {', '.join(missing)}")
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        # __post_init__ errors arrive wrapped; surface our own message unchanged.
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _wrap(e, "config") from None
    except ValueError as e:  # the norm policy's own checks, naming norm.policy.KEY
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def to_dict(cfg: Config) -> dict:
    # words, not enum members: a checkpoint's config loads with torch.load(weights_only)
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True)
