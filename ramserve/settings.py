"""Typed settings, with every default in configs/ (defaults.toml, tools.toml).

A user file at ``$RAMSERVE_HOME/config.toml`` overrides any key (merged table by table).
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from .errors import ConfigError

# A link to the repository's configs/: a wheel carries the files themselves (pyproject's package-data).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


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
    search_sample_elements: int = Field(gt=0)


class QuantizerSettings(BaseModel):
    ranges: list[float] = []
    refits: int = Field(default=0, ge=0)


class RoundingSettings(BaseModel):
    method: Literal["nearest", "compensated"] = "compensated"
    damp: float = Field(default=0.1, gt=0)
    block: int = Field(default=128, gt=0)
    sequences: int = Field(default=32, gt=0)
    tokens: int = Field(default=256, gt=1)
    sweeps: int = Field(default=1, ge=0)
    seed: int = 0
    min_expert_tokens: int = Field(default=64, ge=1)
    # 0 where a plan recorded before the descent existed: it gets the weights it got then
    descent_sweeps: int = Field(default=0, ge=0)
    # 0 (all sequences at once) where a plan recorded before pieces existed, for the same reason
    pass_tokens: int = Field(default=0, ge=0)
    # 0 where a plan recorded before scales were re-chosen under H, for the same reason
    scale_rounds: int = Field(default=0, ge=0)

    def record(self) -> dict[str, Any]:
        """What a plan records of its rounding (its hash covers it): the method, and for compensated
        rounding every setting that changes the weights."""
        return {"method": "nearest"} if self.method == "nearest" else self.model_dump()


class AllocateSettings(BaseModel):
    min_sqnr_db: float


class FisherSettings(BaseModel):
    sequences: int = Field(gt=0)
    tokens: int = Field(gt=1)
    sweeps: int = Field(ge=0)
    seed: int
    memory_share: float = Field(gt=0, le=1)
    row_smoothing: float = Field(ge=0)


class SensitivitySettings(BaseModel):
    attn_norm: str
    mlp_norm: str
    final_norm: str
    propagation: dict[str, float]
    fisher: FisherSettings


class BudgetSettings(BaseModel):
    default_context: int = Field(gt=0)
    os_reserve_min_gb: float = Field(ge=0)
    os_reserve_share: float = Field(ge=0, lt=1)
    runtime_fixed_mb: float = Field(ge=0)
    prefill_chunk: int = Field(gt=0)
    prefill_batch: int = Field(gt=0)
    min_prefill_chunk: int = Field(gt=0)
    min_context: int = Field(gt=0)
    shrink_order: list[Literal["prefill_chunk", "prefill_batch", "kv_bits", "parallel", "context"]]
    scratch_fixed_mb: float = Field(ge=0)
    attention_factor: float = Field(ge=0)
    width_factor: float = Field(ge=0)
    memory_gb: float = Field(default=0, ge=0)


class Device(BaseModel):
    memory_gb: float = Field(gt=0)
    working_set_share: float | None = Field(default=None, gt=0, le=1)


class ServerSettings(BaseModel):
    host: str
    port: int = Field(gt=0, lt=65536)
    parallel: int = Field(gt=0)
    queue_size: int = Field(ge=0)
    prompt_cache_entries: int = Field(ge=0)
    max_body_bytes: int = Field(gt=0)
    max_pending_body_mb: int = Field(gt=0)
    max_json_depth: int = Field(gt=0)
    variants: list[str]
    any_budget: bool = False
    swap_timeout_s: float = Field(gt=0)
    swap_waiting: int = Field(ge=0)
    cpu_dense_rows: int = Field(ge=1)
    cpu_workers: int = Field(ge=0)
    cpu_dense_min_gflops: float = Field(ge=0)
    ollama_version: str = Field(min_length=1)


class HostsSettings(BaseModel):
    """Serving from several machines (ramserve/cluster.py)."""

    control_port: int = Field(gt=0, lt=65535)
    backend: Literal["auto", "ring", "jaccl"]
    connect_timeout_s: float = Field(gt=0)
    heartbeat_s: float = Field(gt=0)
    lost_after_s: float = Field(gt=0)
    relay_chunks_per_rank: int = Field(ge=1)


class CacheSettings(BaseModel):
    max_gb: float = Field(gt=0)
    min_free_gb: float = Field(ge=0)


class ToolFormat(BaseModel):
    """How a model family writes a tool call (configs/tools.toml)."""

    open: str = Field(min_length=1)
    close: str = ""
    separator: str = ""
    body: Literal["object"] = "object"
    key_separator: str = ": "
    item_separator: str = ", "


class Settings(BaseModel):
    analysis: AnalysisSettings
    quantizer: QuantizerSettings
    rounding: RoundingSettings = RoundingSettings()
    sensitivity: SensitivitySettings
    kinds: list[KindRule]
    restrict: dict[str, Restriction] = {}
    allocate: AllocateSettings
    budget: BudgetSettings
    devices: dict[str, Device] = {}
    server: ServerSettings
    hosts: HostsSettings
    cache: CacheSettings
    tool_formats: dict[str, ToolFormat] = {}


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
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


@lru_cache(maxsize=8)
def _load(home: str, user_mtime: float | None) -> Settings:
    data: dict[str, Any] = {}
    for path in sorted(CONFIG_DIR.glob("*.toml")):
        data = _merge(data, _read_toml(path))
    user = Path(home) / "config.toml"
    if user.is_file():
        data = _merge(data, _read_toml(user))
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"[{'.'.join(str(p) for p in err['loc'][:-1])}] {err['loc'][-1]}: {err['msg']}"
            if len(err["loc"]) > 1 else f"{err['loc'][0] if err['loc'] else '?'}: {err['msg']}"
            for err in e.errors()
        )  # fmt: skip
        where = user if user.is_file() else CONFIG_DIR
        raise ConfigError(f"bad settings (from {where}): {problems}") from e


def load_settings() -> Settings:
    """The settings in force: configs/*.toml, then the user's overrides."""
    user = ramserve_home() / "config.toml"
    mtime = user.stat().st_mtime if user.is_file() else None  # an edited file takes effect
    return _load(str(ramserve_home()), mtime)
