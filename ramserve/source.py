"""Reading a model without loading it.

A model spec is a local folder or a Hugging Face repo id (``org/name`` or ``org/name@revision``), resolved
through the Hugging Face cache. Tensors are read lazily: ``mx.load`` maps each shard without reading it,
and mlx-lm's own ``sanitize`` runs on those lazy arrays, so a module's bytes are read only when that
module is evaluated. The module map (checkpoint tensors to MLX module paths) is therefore exactly what
mlx-lm sees: stacked MoE experts are one ``switch_mlp`` module, tied embeddings have no ``lm_head``.

The fingerprint identifies a model's exact weights cheaply: SHA-256 over the canonical config.json, and
for every shard (by name) its raw safetensors header plus three 64 KiB samples of its data (start,
middle, end). Headers alone would make a fine-tune collide with its base model; hashing every byte
would cost a minute per 16 GB on every run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pkgutil
import re
import struct
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cache
from .errors import BadModel, ModelNotFound
from .settings import CacheSettings, KindRule, Settings

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
HUB_PATTERNS = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.txt",
    "*.model",
    "*.jinja",
    "*.tiktoken",
]
SAMPLE_BYTES = 65536
# Bytes per element of the float dtypes weights, scales and activations take.


# MLX's dtype names as safetensors headers spell them
ST_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "uint32": "U32",
             "int32": "I32", "uint8": "U8", "int8": "I8", "int64": "I64", "bool": "BOOL"}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    offset: int = 0  # where its bytes start in the shard file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    size: int
    header: bytes
    tensors: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ExpertBytes:
    """Stacked experts (experts, out, in) read from the checkpoint an expert at a time
    (``Source.experts_as_stored``): a layer's stacks need not be resident for a streamed pass or for
    rounding its experts (Qwen3-30B's widths: 302 MB a layer at 32 experts, 1.2 GB at 128). Indexed
    like the tensor, ``astype`` like it too (the conversion is made per expert)."""

    # the dtypes experts are read in, as safetensors spells them: NumPy's type for the bytes, MLX's
    KINDS: ClassVar[dict[str, tuple[type, mx.Dtype]]] = {
        "BF16": (np.uint16, mx.bfloat16), "F16": (np.float16, mx.float16),
        "F32": (np.float32, mx.float32),
    }  # fmt: skip

    code: str  # the stored dtype, as safetensors spells it
    shape: tuple[int, ...]
    places: tuple[tuple[Path, int], ...]  # each expert's shard and where its bytes start
    into: mx.Dtype | None = None  # the dtype each expert is returned in; None: as stored

    @property
    def dtype(self) -> mx.Dtype:
        return self.into or self.KINDS[self.code][1]

    def astype(self, dtype: mx.Dtype) -> ExpertBytes:
        return replace(self, into=dtype)

    @classmethod
    def each(cls, code: str, shape: tuple[int, ...]) -> int:
        """The bytes one expert of a ``shape`` stack stored as ``code`` takes."""
        return math.prod(shape[1:]) * np.dtype(cls.KINDS[code][0]).itemsize

    def __getitem__(self, e: int) -> mx.array:
        kind, stored = self.KINDS[self.code]
        size = self.each(self.code, self.shape)
        path, offset = self.places[e]
        try:
            with open(path, "rb") as f:
                data = os.pread(f.fileno(), size, offset)
        except FileNotFoundError as err:
            raise BadModel(f"missing shard: {path}") from err
        if len(data) != size:
            raise BadModel(f"{path} ends inside a tensor's data (truncated?)")
        out = mx.array(np.frombuffer(data, dtype=kind).reshape(self.shape[1:])).view(stored)
        return out.astype(self.into) if self.into is not None else out


@dataclass(frozen=True)
class ModuleInfo:
    """One quantizable module, as MLX sees it after ``sanitize``."""

    path: str
    kind: str
    block: str
    layer: int | None
    shape: tuple[int, ...]
    group_sizes: tuple[int, ...]  # the candidate group sizes its last dimension divides

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Source:
    """A resolved model: its folder, config, shards and fingerprint; tensors read on demand."""

    spec: str
    path: Path
    config: dict[str, Any]
    shards: list[Shard]
    name: str
    settings: Settings = field(repr=False)  # what classifies its modules, and every later stage's
    _weights: dict[str, mx.array] | None = field(default=None, repr=False)

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    @property
    def quantization(self) -> dict[str, Any] | None:
        q = self.config.get("quantization") or self.config.get("quantization_config")
        return q if isinstance(q, dict) else None

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    @cached_property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for shard in sorted(self.shards, key=lambda s: s.name):
            h.update(shard.name.encode())
            h.update(shard.header)
            h.update(_data_samples(shard))
        return h.hexdigest()[:16]

    @cached_property
    def model(self) -> nn.Module:
        """The mlx-lm module for this config, with lazily initialised (never evaluated) weights."""
        model_class, args_class = model_classes(self.config)
        return model_class(args_class.from_dict(self.config))

    def weights(self) -> dict[str, mx.array]:
        """Every tensor after mlx-lm's ``sanitize``, lazily: nothing is read until evaluated.

        Each call returns a fresh dict, so a caller can pop what it has used and let it be freed.
        """
        raw: dict[str, mx.array] = {}
        for shard in self.shards:
            try:
                loaded = mx.load(str(shard.path))
                assert isinstance(loaded, dict)  # safetensors always loads as a dict
                raw.update(loaded)
            except Exception as e:  # MLX raises plain RuntimeError/ValueError on a bad file
                raise BadModel(f"cannot read shard {shard.path}: {e}") from e
        sanitize = getattr(self.model, "sanitize", None)
        return sanitize(raw) if sanitize else raw

    def experts_as_stored(self, key: str) -> ExpertBytes | None:
        """Stacked experts ``key`` (a name after ``sanitize``), read from the shards an expert at a
        time, where each expert's bytes lie there as mlx-lm computes with them: the stack stored as
        one tensor (mlx-lm's layout), or one tensor per expert that ``sanitize`` stacks unchanged
        (the hub's). None otherwise: the tensor is read whole."""
        shape, code = self.tensor_shapes.get(key), ST_DTYPES.get(self.tensor_dtypes.get(key, ""))
        parts = [self._stored[name] for name in self._made_from.get(key, ())]
        if shape is None or len(shape) != 3 or code not in ExpertBytes.KINDS or not parts:
            return None
        paths = {shard.name: shard.path for shard in self.shards}
        if len(parts) == 1 and (parts[0].shape, parts[0].dtype) == (shape, code):
            size = ExpertBytes.each(code, shape)
            places = [(paths[parts[0].shard], parts[0].offset + e * size) for e in range(shape[0])]
        elif len(parts) == shape[0] and all((t.shape, t.dtype) == (shape[1:], code) for t in parts):
            places = [(paths[t.shard], t.offset) for t in parts]
        else:
            return None
        return ExpertBytes(code, shape, tuple(places))

    @cached_property
    def _stored(self) -> dict[str, TensorInfo]:
        return {t.name: t for shard in self.shards for t in shard.tensors}

    @cached_property
    def _made_from(self) -> dict[str, tuple[str, ...]]:
        """For each 3-D tensor after ``sanitize``, the stored tensors it is made of, in order along
        its first axis, traced by running ``sanitize`` on one-element stand-ins, each holding its
        tensor's tag: one that ``sanitize`` passed through comes out as itself, stacked experts as
        their tags in order. A tag is ``16 i + 11``, a value that arithmetic on it (adding,
        scaling) would not keep. Empty where ``sanitize`` cannot run on stand-ins (one that
        reshapes to real widths): those tensors are then read whole."""
        names = list(self._stored)
        stand_ins = {
            n: mx.full((1,) * len(self._stored[n].shape), 16 * i + 11, mx.int32)
            for i, n in enumerate(names)
        }
        sanitize = getattr(self.model, "sanitize", None)
        try:
            made = sanitize(stand_ins) if sanitize else stand_ins
            traced = {k: np.asarray(v).reshape(-1) for k, v in made.items() if v.ndim == 3}
        except Exception:  # noqa: BLE001 - any failure only means "read whole"
            return {}
        out = {}
        for k, tags in traced.items():
            i = (tags - 11) // 16
            if (tags % 16 == 11).all() and ((i >= 0) & (i < len(names))).all():
                out[k] = tuple(names[int(j)] for j in i)
        return out

    @cached_property
    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes and names after ``sanitize`` (computed on lazy arrays, reads nothing)."""
        return {k: tuple(v.shape) for k, v in self.weights().items()}

    @cached_property
    def tensor_dtypes(self) -> dict[str, str]:
        return {k: str(v.dtype).removeprefix("mlx.core.") for k, v in self.weights().items()}

    @cached_property
    def modules(self) -> list[ModuleInfo]:
        """Quantizable modules (those mlx-lm can turn quantized) in model order."""
        settings = self.settings
        shapes = self.tensor_shapes
        found = []
        for path, module in self.model.named_modules():
            if not hasattr(module, "to_quantized") or f"{path}.weight" not in shapes:
                continue
            shape = shapes[f"{path}.weight"]
            rule = classify(path, settings.kinds)
            groups = tuple(g for g in settings.analysis.group_sizes if shape[-1] % g == 0)
            found.append(ModuleInfo(path, rule.name, rule.block, layer_index(path), shape, groups))
        return sorted(found, key=_module_order)

    @cached_property
    def untied_head(self) -> str | None:
        """The head's module path where it has a weight of its own (a tied head is the embedding)."""
        return next((m.path for m in self.modules if m.kind == "lm_head"), None)

    @property
    def parameter_count(self) -> int:
        return sum(math.prod(s) for s in self.tensor_shapes.values())

    @property
    def float_dtype(self) -> str:
        """The dtype ramserve stores 16-bit tensors, scales and biases in."""
        return "float16" if self.config.get("torch_dtype") == "float16" else "bfloat16"


def _module_order(m: ModuleInfo) -> tuple[int, str]:
    if m.kind == "embedding":
        return (-1, m.path)
    return (m.layer if m.layer is not None else 1 << 30, m.path)


def head_dim_of(config: dict[str, Any]) -> int:
    """The attention heads' width."""
    heads = int(config.get("num_attention_heads") or 1)
    return int(config.get("head_dim") or int(config.get("hidden_size", 0)) // heads)


def layer_index(path: str) -> int | None:
    for part in path.split("."):
        if part.isdigit():
            return int(part)
    return None


def classify(path: str, rules: list[KindRule]) -> KindRule:
    for rule in rules:
        if re.search(rule.pattern, path):
            return rule
    raise ValueError(f"no kind rule matches {path!r}; configs/ needs a catch-all")


def supported_model_types() -> list[str]:
    import mlx_lm.models

    skip = {"base", "cache", "rope_utils", "switch_layers", "activations", "pipeline", "ssm"}
    names = (m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__))
    return sorted(n for n in names if n not in skip and not n.startswith("_"))


def model_classes(config: dict[str, Any]) -> tuple[Any, Any]:
    """mlx-lm's plug-in lookup by ``model_type``, with an error that lists what is supported."""
    from mlx_lm.utils import _get_classes

    try:
        classes: tuple[Any, Any] = _get_classes(config)
        return classes
    except (ValueError, ImportError) as e:
        supported = ", ".join(supported_model_types())
        raise BadModel(
            f"unsupported model_type {config.get('model_type')!r}; supported: {supported}"
        ) from e


def read_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw JSON header of a safetensors file and its parsed form; names the file on any fault."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n <= 1 or 8 + n > size:
                raise ValueError(f"header length {n} does not fit a file of {size} bytes")
            raw = f.read(n)
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except FileNotFoundError as e:
        raise BadModel(f"missing shard: {path}") from e
    except (ValueError, UnicodeDecodeError) as e:
        raise BadModel(f"corrupt safetensors header in {path}: {e}") from e
    return raw, header


def _read_shard(path: Path) -> Shard:
    raw, header = read_header(path)
    tensors = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start = 8 + len(raw) + int(meta["data_offsets"][0])
            tensors.append(TensorInfo(name, meta["dtype"], tuple(meta["shape"]), path.name, start))
        except (KeyError, TypeError) as e:
            raise BadModel(f"corrupt safetensors header in {path}: bad entry {name!r}") from e
    return Shard(path.name, path, path.stat().st_size, raw, tuple(tensors))


def _data_samples(shard: Shard) -> bytes:
    start = 8 + len(shard.header)
    length = shard.size - start
    out = []
    with shard.path.open("rb") as f:
        for offset in (0, max(0, length // 2 - SAMPLE_BYTES // 2), max(0, length - SAMPLE_BYTES)):
            f.seek(start + offset)
            out.append(f.read(SAMPLE_BYTES))
    return b"".join(out)


def shard_paths(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise BadModel(f"corrupt index {index}: {e}") from e
        paths = [folder / name for name in sorted(set(weight_map.values()))]
        for p in paths:
            if not p.is_file():
                raise BadModel(f"missing shard: {p} (listed in {index.name})")
        return paths
    paths = sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    if not paths:
        raise BadModel(f"no safetensors weights in {folder}")
    return paths


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise BadModel(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise BadModel(f"corrupt {path}: {e}") from e
    if "model_type" not in config:
        raise BadModel(f"{path} has no model_type")
    return dict(config)


def resolve_path(spec: str, limits: CacheSettings) -> tuple[Path, str]:
    """The local folder for a spec, and a display name for it."""
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFound(f"{spec} is a file; give the model's folder")
        return local.resolve(), local.resolve().name
    match = REPO_ID.match(spec)
    if not match or spec.startswith((".", "/", "~")):
        raise ModelNotFound(f"no such folder: {spec} (nor a Hugging Face repo id like org/name)")
    repo, rev = match["repo"], match["rev"]
    return hub_snapshot(repo, rev, limits), repo.split("/")[-1]


def hub_snapshot(
    repo: str, revision: str | None, limits: CacheSettings, patterns: list[str] | None = None
) -> Path:
    """The snapshot folder of a hub repo: from the local cache, downloading first when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # huggingface_hub reads its environment once, at import; read it at call time instead.
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    fetch: dict[str, Any] = {"revision": revision, "allow_patterns": patterns or HUB_PATTERNS,
             "cache_dir": os.environ.get("HF_HUB_CACHE")}  # fmt: skip
    if not offline:
        _require_room_for(repo, fetch, limits)
    try:
        with cache.disk_errors(f"the download of {repo}", _hub_cache_dir()):
            path = snapshot_download(repo, local_files_only=offline, **fetch)
    except LocalEntryNotFoundError as e:
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "the hub cannot be reached"
        raise ModelNotFound(f"{repo} is not in the Hugging Face cache and {why}") from e
    except HfHubHTTPError as e:
        raise ModelNotFound(f"cannot fetch {repo} from the Hugging Face hub: {e}") from e
    return Path(path)


def _hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE)


def _require_room_for(repo: str, fetch: dict[str, Any], limits: CacheSettings) -> None:
    """Refuse a download the disk cannot take, before its first byte (sizes from the hub's listing;
    when the hub cannot list them, the download itself reports a full disk)."""
    from huggingface_hub import snapshot_download

    try:
        files = snapshot_download(repo, dry_run=True, **fetch)
    except Exception:  # offline, gated, unknown: the real call says why, with its own message
        return
    needed = sum(f.file_size for f in files if f.will_download) if isinstance(files, list) else 0
    if needed:
        cache.require_free(
            needed, _hub_cache_dir(), f"downloading {repo} ({needed:,} bytes)", limits
        )


def open_source(spec: str, settings: Settings) -> Source:
    """Resolve a model spec and read its config and shard headers (no tensor data)."""
    folder, name = resolve_path(spec, settings.cache)
    config = read_config(folder)
    shards = [_read_shard(p) for p in shard_paths(folder)]
    model_classes(config)  # fail early, with the supported list, on an unknown model_type
    return Source(spec, folder, config, shards, name, settings)


def require_full_precision(source: Source) -> None:
    if source.quantization is not None:
        raise BadModel(
            f"{source.path} is already quantized (config.json has a quantization entry); ramserve "
            "quantizes from the full-precision weights: give it the original model"
        )
