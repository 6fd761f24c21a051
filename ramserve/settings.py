"""Typed settings, with every default in configs/defaults.toml.

A user file at ``$RAMSERVE_HOME/config.toml`` overrides any key (merged table by table).
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class KindRule(BaseModel):
    name: str
    pattern: str
    block: str


class Restriction(BaseModel):
    min_bits: int = 0


class AnalysisSettings(BaseModel):
    bits: list[int]
    group_sizes: list[int]
    sample_elements: int = Field(gt=0)
    sample_fraction: float = Field(gt=0, le=1)
    streams: int = Field(ge=1)


class AllocateSettings(BaseModel):
    min_sqnr_db: float


class SensitivitySettings(BaseModel):
    attn_norm: str
    mlp_norm: str
    final_norm: str
    propagation: dict[str, float]


class Settings(BaseModel):
    analysis: AnalysisSettings
    sensitivity: SensitivitySettings
    kinds: list[KindRule]
    restrict: dict[str, Restriction] = {}
    allocate: AllocateSettings
    budget: dict[str, Any] = {}
    devices: dict[str, Any] = {}
    server: dict[str, Any] = {}


def ramserve_home() -> Path:
    """The cache root: ``RAMSERVE_HOME`` or ``~/.cache/ramserve``."""
    return Path(os.environ.get("RAMSERVE_HOME", "~/.cache/ramserve")).expanduser()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


@lru_cache(maxsize=8)
def _load(home: str) -> Settings:
    data: dict[str, Any] = {}
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        data = _merge(data, _read_toml(path))
    user = Path(home) / "config.toml"
    if user.is_file():
        data = _merge(data, _read_toml(user))
    return Settings.model_validate(data)


def load_settings() -> Settings:
    """The settings in force: configs/*.toml, then the user's overrides."""
    return _load(str(ramserve_home()))
