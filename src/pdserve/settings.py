"""Engine settings defined once: the fields of ``config.py``'s dataclasses make the command-line flags, read
cluster files' ``engine:`` sections and ``LLM``'s keyword arguments, and write the flags a launcher passes on.

Every field of ``ModelConfig``, ``CacheConfig`` and ``SchedulerConfig`` is a setting; its name outside the
code is the field's name (``max_num_seqs`` -> ``--max-num-seqs``) unless the field's metadata says otherwise
(``name``: ``kv_cache_memory`` for ``kv_cache_memory_bytes``, given as a size such as ``1GiB``; ``flag``:
``--no-prefix-caching`` for a switch that turns a default-on setting off). Metadata keys: ``help``,
``name``, ``flag``, ``parse`` (text -> value), ``show`` (value -> text), ``choices``.
"""
from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from pdserve.config import CacheConfig, EngineConfig, KVStoreConfig, ModelConfig, SchedulerConfig

SLICES = (("model", ModelConfig), ("cache", CacheConfig), ("scheduler", SchedulerConfig))


@dataclass(frozen=True)
class Setting:
    """One engine setting: where it lives (``section``, ``field``) and how it is named outside."""

    section: str
    field: dataclasses.Field
    name: str

    @property
    def default(self) -> Any:
        return self.field.default

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.name.replace("_", "-")

    @property
    def is_switch(self) -> bool:
        return isinstance(self.default, bool)

    def parse(self, value: Any) -> Any:
        """A value given as text (a flag) or as YAML (a cluster file) -> the field's value."""
        parse = self.meta.get("parse")
        if parse is not None and value is not None:
            return parse(value)
        return value

    def show(self, value: Any) -> str:
        show = self.meta.get("show")
        return show(value) if show is not None else str(value)


def engine_settings() -> Iterator[Setting]:
    for section, cls in SLICES:
        for f in dataclasses.fields(cls):
            yield Setting(section, f, f.metadata.get("name", f.name))


SETTINGS = {s.name: s for s in engine_settings()}


def add_engine_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add one flag per engine setting (in an ``engine`` group), defaults from the dataclasses."""
    g = parser.add_argument_group("engine")
    for s in SETTINGS.values():
        help_text = s.meta.get("help", "")
        if s.is_switch:
            # A default-on setting is turned off by its flag (``--no-prefix-caching``), and vice versa.
            g.add_argument(s.flag, dest=s.name, action="store_false" if s.default else "store_true", help=help_text)
            continue
        shown = "" if s.default is None else f" (default {s.show(s.default)})"
        g.add_argument(s.flag, dest=s.name, default=s.default, type=s.parse if "parse" in s.meta else _type(s),
                       choices=s.meta.get("choices"), help=help_text + shown)
    return parser


def engine_config_from_args(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig the flags of ``add_engine_flags`` describe, with ``overrides`` (setting names) on top.
    ValueError on bad values."""
    values = {name: getattr(args, name) for name in SETTINGS}
    return engine_config(**{**values, **overrides})


def engine_config(**settings: Any) -> EngineConfig:
    """An EngineConfig from setting names (``max_num_seqs=64, kv_cache_memory="512MiB"``); ValueError names
    an unknown setting."""
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(SETTINGS)}")
    slices: dict[str, dict[str, Any]] = {section: {} for section, _ in SLICES}
    for name, value in settings.items():
        s = SETTINGS[name]
        slices[s.section][s.field.name] = s.parse(value) if isinstance(value, str) else value
    return EngineConfig(**{section: cls(**slices[section]) for section, cls in SLICES})


def engine_argv(config: EngineConfig) -> list[str]:
    """The flags that rebuild ``config`` (settings at their default are left out)."""
    argv: list[str] = []
    for s in SETTINGS.values():
        value = getattr(getattr(config, s.section), s.field.name)
        if value == s.default:
            continue
        if s.is_switch:
            argv.append(s.flag)
        else:
            argv += [s.flag, s.show(value)]
    return argv


def engine_settings_from_mapping(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Validated setting values from a cluster file section; ValueError naming an unknown key."""
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise ValueError(f"{source}: unknown engine setting(s) {unknown}; known: {sorted(SETTINGS)}")
    values = {k: SETTINGS[k].parse(v) if isinstance(v, str) else v for k, v in data.items()}
    engine_config(**values)  # validates every value (the dataclasses' own checks)
    return values


def _type(s: Setting):
    if s.default is None:
        return s.meta.get("type", str)
    return type(s.default)


# -- the KV store's settings: worker flags (`pdserve worker`, `pdserve up`) and cluster files' serving.kv_store --
STORE_SETTINGS = {f.metadata.get("name", f.name): Setting("store", f, f.metadata.get("name", f.name))
                  for f in dataclasses.fields(KVStoreConfig)}


def add_store_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """One flag per KV store setting (``--kv-host-memory``, ``--kv-disk``, ``--kv-remote``, ...)."""
    g = parser.add_argument_group("KV store (docs/kv_store.md)")
    for s in STORE_SETTINGS.values():
        shown = f" (default {s.show(s.default)})" if s.default else ""
        g.add_argument(s.flag, dest=s.name, default=s.default, type=s.parse if "parse" in s.meta else _type(s),
                       help=s.meta.get("help", "") + shown)
    return parser


def store_config(**settings: Any) -> KVStoreConfig:
    """A KVStoreConfig from setting names (``kv_host_memory="4GiB"``); ValueError on unknown names or values."""
    unknown = sorted(set(settings) - set(STORE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown KV store setting(s) {unknown}; known: {sorted(STORE_SETTINGS)}")
    values = {STORE_SETTINGS[k].field.name: STORE_SETTINGS[k].parse(v) if isinstance(v, str) else v
              for k, v in settings.items()}
    return KVStoreConfig(**values)


def store_config_from_args(args: argparse.Namespace, **overrides: Any) -> KVStoreConfig:
    return store_config(**{**{name: getattr(args, name) for name in STORE_SETTINGS}, **overrides})


def store_argv(config: KVStoreConfig) -> list[str]:
    """The flags that rebuild ``config`` (settings at their default are left out)."""
    argv: list[str] = []
    for s in STORE_SETTINGS.values():
        value = getattr(config, s.field.name)
        if value != s.default:
            argv += [s.flag, s.show(value)]
    return argv
