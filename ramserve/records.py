"""The records the pipeline passes and the cache keeps: a model's profile and a plan.

Each owns its file format: its version string, how it is read (checked, with the reason a file cannot
be used) and written (atomically), and its digest. A profile is stored with a checksum of its body, so
an edited or damaged file is analysed again; a plan is identified by the hash of what it produces (the
source's fingerprint, mlx-lm's quantization object, the quantizer and the rounding), which names its
model folder.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import TypeAdapter, ValidationError

from . import atomic
from .errors import RamserveError

PROFILE_FORMAT = "ramserve-profile/8"  # /6: kv_damage; /7: rounding_ratio; /8: the head's too
PLAN_FORMAT = "ramserve-plan/1"


class RecordError(RamserveError):
    """A profile or plan file that cannot be used, and why."""


T = TypeVar("T")


def _parse(kind: type[T], data: dict[str, Any], fmt: str, where: str) -> T:
    if data.get("format") != fmt:
        raise RecordError(f"{where} is not a {fmt} file (format {data.get('format')!r})")
    try:
        return TypeAdapter(kind).validate_python(data)
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        raise RecordError(f"{where} is damaged: {at}: {first['msg']}") from e


def _read(path: Path) -> dict[str, Any]:
    data = atomic.read_json(path)
    if data is None:
        raise RecordError(f"{path} is missing or not valid JSON" if not path.exists()
                          else f"{path} is not valid JSON")  # fmt: skip
    return data


# -- the profile ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One way to store a module: its bytes, measured error and predicted damage."""

    bits: int
    group_size: int | None
    bytes: int
    rel_mse: float
    sqnr_db: float | None
    rel_fisher: float | None = None  # the relative error weighted by the Fisher (fisher.py)
    damage: float = 0.0  # importance x relative error: set when the profile is assembled
    # compensated rounding's output error under the sampled inputs as a share of nearest's
    # (rounding.compensation_ratios); None where not measured
    rounding_ratio: float | None = None

    def damage_with(self, compensated: bool) -> float:
        """The predicted damage under the rounding a plan gets."""
        if compensated and self.rounding_ratio is not None:
            return self.damage * self.rounding_ratio
        return self.damage


@dataclass
class ModuleRecord:
    """A quantizable module's measurements (analysis checkpoints hold these too)."""

    path: str
    kind: str
    block: str
    layer: int | None
    shape: list[int]
    numel: int
    energy: float
    fisher_energy: float | None  # ½ Σ F̂_ij W_ij²: the predicted KL per token of a 100% error
    options: list[Option]
    seconds: float
    importance: float = 0.0

    def packed_bytes(self, o: Option) -> int:
        """The bytes of a candidate's codes; the rest of its bytes are floats (scales and biases, or
        the 16-bit weight), whose size depends on the runtime's float width."""
        return self.numel * o.bits // 8 if o.bits < 16 else 0

    def option(self, bits: int, group_size: int | None) -> Option | None:
        return next((o for o in self.options if (o.bits, o.group_size) == (bits, group_size)), None)

    def option_index(self, bits: int, group_size: int | None) -> int:
        """Where the candidate (bits, group_size) is in ``options`` (a plan's choice: it is there)."""
        return next(
            j for j, o in enumerate(self.options) if (o.bits, o.group_size) == (bits, group_size)
        )


@dataclass(frozen=True)
class SelfSamples:
    """The token sequences compensated rounding takes its inputs' H from (ramserve/rounding.py), with
    what besides the weights they were drawn with: the analysis draws them and the profile keeps
    them, so that quantizing the model does not draw them again."""

    drawn_with: dict[str, Any]
    tokens: list[list[int]]


def module_records(data: list[dict[str, Any]]) -> list[ModuleRecord]:
    """Module records from their JSON form (an analysis checkpoint's)."""
    return TypeAdapter(list[ModuleRecord]).validate_python(data)


@dataclass
class Profile:
    """For every quantizable module, each candidate's bytes and predicted damage."""

    settings_key: str
    fingerprint: str
    name: str
    model_type: str
    float_dtype: str
    parameters: int
    bf16_bytes: int
    fixed_bytes: int
    quantizer: dict[str, Any]  # the affine options the errors were measured with (affine.py)
    estimator: str
    created: str
    analysis_seconds: float
    fisher_seconds: float | None
    layers: list[dict[str, Any]]  # the per-layer residual account (sensitivity.importances)
    modules: list[ModuleRecord]
    # KL per token that storing the KV cache in "8" or "4" bits costs (fisher.kv_damage); empty when
    # not measured (no self-Fisher, or a head width the quantized cache cannot take)
    kv_damage: dict[str, float] = field(default_factory=dict)
    # the pass measuring compensated rounding's share of the error (rounding.compensation_ratios)
    rounding_seconds: float | None = None
    samples: SelfSamples | None = None  # the sequences that pass took its inputs from
    cache_hit: bool = field(default=False, compare=False)  # how this run got it; not stored

    def to_json(self) -> dict[str, Any]:
        body = {"format": PROFILE_FORMAT, **asdict(self)}
        body.pop("cache_hit")
        return {**body, "checksum": _checksum(body)}

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "the profile") -> Profile:
        if data.get("checksum") != _checksum(data):
            raise RecordError(f"{where} does not match its checksum (edited or damaged)")
        return _parse(cls, data, PROFILE_FORMAT, where)

    @classmethod
    def read(cls, path: Path) -> Profile:
        return cls.from_json(_read(path), str(path))

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())


def _checksum(body: dict[str, Any]) -> str:
    """The digest a profile is stored with: an edited or damaged file no longer matches it."""
    stored = {k: v for k, v in body.items() if k not in ("checksum", "cache_hit")}
    return hashlib.sha256(json.dumps(stored, sort_keys=True).encode()).hexdigest()


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """What the plan gives one module."""

    kind: str
    layer: int | None
    bits: int
    group_size: int | None
    bytes: int
    damage: float
    params: int

    @property
    def label(self) -> str:
        return "16" if self.bits >= 16 else f"{self.bits}/{self.group_size}"


@dataclass(frozen=True)
class BudgetAsk:
    spec: str  # as the user gave it: 6GB, 4.5bpw, min-safe, auto, a device name
    bytes: int


@dataclass(frozen=True)
class SolverStats:
    lower_bound: float
    gap: float
    gap_relative: float
    seconds: float
    hull_points: int
    modules: int


@dataclass(frozen=True)
class SafetyFloor:
    min_sqnr_db: float
    lifted: bool  # --allow-unsafe


@dataclass(frozen=True)
class Manifest:
    """What a written model folder must still hold (quantize.verify)."""

    seconds: float
    stored_bytes: int
    files: dict[str, int]  # every file's size
    sha256: dict[str, str]  # the small files' digests
    # compensated rounding: its seconds, and the output error under H it kept, as a share of nearest's
    rounding_seconds: float | None = None
    rounding_error_ratio: float | None = None


@dataclass
class Plan:
    """The chosen quantization per module for one budget.

    ``quantization`` is exactly mlx-lm's per-module config object (every quantized module listed; a
    module absent from it stays 16-bit), so a plan can be written into a model's config.json as it is.
    """

    name: str
    fingerprint: str
    profile_key: str
    budget: BudgetAsk
    total_bytes: int
    fixed_bytes: int
    parameters: int
    bits_per_weight: float
    budget_used: float
    predicted_damage: float
    solver: SolverStats
    safety_floor: SafetyFloor
    note: str | None
    quantization: dict[str, Any]
    quantizer: dict[str, Any]
    choices: dict[str, Choice]
    runtime_float_bytes: int  # the bytes per float of the runtime memory_bytes is for
    memory_bytes: int  # the weights' size once loaded by that runtime
    # how codes are rounded (ramserve/rounding.py): {"method": "nearest"}, or compensated with its settings
    rounding: dict[str, Any] = field(default_factory=lambda: {"method": "nearest"})
    written: Manifest | None = None  # set in the copy inside a written model folder

    @property
    def hash(self) -> str:
        """Identifies the weights the plan produces, and names their folder."""
        key = json.dumps(
            [self.fingerprint, self.quantization, self.quantizer, self.rounding], sort_keys=True
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, Any]:
        body = {"format": PLAN_FORMAT, **asdict(self), "hash": self.hash}
        if body["written"] is None:
            body.pop("written")
        return body

    def summary(self) -> dict[str, Any]:
        """The plan in a line: what model cards and cache listings show of it."""
        return {"budget": self.budget.spec, "budget_bytes": self.budget.bytes,
                "weight_bytes": self.total_bytes, "bits_per_weight": self.bits_per_weight,
                "predicted_damage": self.predicted_damage}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "the plan") -> Plan:
        data = {k: v for k, v in data.items() if k != "hash"}
        return _parse(
            cls, {"quantizer": {}, "rounding": {"method": "nearest"}, **data}, PLAN_FORMAT, where
        )

    @classmethod
    def read(cls, path: Path) -> Plan:
        return cls.from_json(_read(path), str(path))

    @classmethod
    def in_folder(cls, folder: Path) -> Plan | None:
        """The plan.json of a folder ramserve quantized, or None (none there, or not usable)."""
        try:
            return cls.read(folder / "plan.json") if (folder / "plan.json").is_file() else None
        except RecordError:
            return None

    def write(self, path: Path) -> None:
        atomic.write_json(path, self.to_json())
