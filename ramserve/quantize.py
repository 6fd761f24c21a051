"""Writing the quantized model for a plan: an mlx-lm folder, streamed one tensor at a time, atomically.

The plan fixes every output tensor's name, dtype and shape in advance, so each shard's safetensors
header is written first and the tensors are streamed after it one by one: peak memory is about one
module, whatever the shard size. The folder is assembled under a temporary name beside its final place
(``RAMSERVE_HOME/models/<fingerprint>/<plan-hash>/``) and renamed only when complete, so an interrupted
run leaves nothing a later run would load; a complete folder with the same plan hash is reused as is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import affine, atomic, cache
from .cache import model_dir
from .errors import BadModel
from .process import freed_memory_returned
from .profile import drawn_sequences
from .progress import Bar
from .records import Manifest, Plan, RecordError
from .relay import Share
from .rounding import Gain, Packed, compensated_layers, is_compensated, layer_inputs, pass_position
from .settings import RoundingSettings
from .source import ST_DTYPES, Source, layer_index, require_full_precision

log = logging.getLogger("ramserve.quantize")

SHARD_BYTES = 2_000_000_000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "added_tokens.json")  # fmt: skip


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str  # MLX dtype name
    shape: tuple[int, ...]
    source: str  # the sanitized tensor it comes from
    part: str  # "weight", "scales", "biases" or "copy"
    bits: int = 16
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        dtype = getattr(mx, "bool_" if self.dtype == "bool" else self.dtype)
        return int(dtype.size) * int(np.prod(self.shape, dtype=np.int64))


def _pass_order(name: str, head: str | None) -> tuple[int, str]:
    """Tensors the rounding pass does not produce first, then in the pass's order (layer by layer,
    the head last): compensated rounding produces a layer's weights at once."""
    position = pass_position(name.removesuffix(".weight"), head)
    return (-1 if position is None else position, name)


def holds(share: Share | None, name: str, ends: tuple[str, ...]) -> bool:
    """Whether the part of ``share`` stores tensor ``name``: its layers', and what is outside the
    layers (the norms) but the embedding and the head (``ends``), which rank 0 alone holds."""
    if share is None:
        return True
    layer = layer_index(name)
    if layer is not None:
        return layer in share.layers
    return share.first or not name.startswith(ends)


def model_ends(source: Source) -> tuple[str, ...]:
    """The embedding's and the head's tensor prefixes."""
    return tuple(f"{m.path}." for m in source.modules if m.kind in ("embedding", "lm_head"))


def output_tensors(source: Source, plan: Plan, share: Share | None = None) -> list[OutTensor]:
    """Every tensor the quantized model stores (or its part of ``share``), in a stable order."""
    quant = {k: v for k, v in plan.quantization.items() if isinstance(v, dict)}
    fdt = source.float_dtype
    head = source.untied_head
    ends = model_ends(source)
    out = []
    for name, shape in sorted(source.tensor_shapes.items(), key=lambda t: _pass_order(t[0], head)):
        if not holds(share, name, ends):
            continue
        module = name.removesuffix(".weight")
        q = quant.get(module) if name.endswith(".weight") else None
        if q:
            bits, g = q["bits"], q["group_size"]
            lead, last = shape[:-1], shape[-1]
            out.append(
                OutTensor(name, "uint32", (*lead, last * bits // 32), name, "weight", bits, g)
            )
            for part in ("scales", "biases"):
                out.append(
                    OutTensor(f"{module}.{part}", fdt, (*lead, last // g), name, part, bits, g)
                )
        else:
            dtype = source.tensor_dtypes[name]
            keep = dtype if not dtype.startswith(("float", "bfloat")) else fdt
            out.append(OutTensor(name, keep, shape, name, "copy"))
    return out


def shard_layout(tensors: list[OutTensor], shard_bytes: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(tensors: list[OutTensor]) -> bytes:
    meta: dict[str, Any] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for t in tensors:
        meta[t.name] = {"dtype": ST_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}  # fmt: skip
        offset += t.nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _to_bytes(a: mx.array) -> bytes:
    if a.dtype in (mx.bfloat16, mx.float16):
        a = a.view(mx.uint16)  # numpy has no bfloat16; the bits are what we store
    return np.asarray(a).tobytes()


class _Producer:
    """Computes output tensors from the lazy source weights, one source tensor at a time; with
    compensated rounding, a layer's planned weights come at once from ``rounding``'s pass."""

    def __init__(self, source: Source, plan: Plan, progress: bool, share: Share | None) -> None:
        self.head = source.untied_head
        self.weights = source.weights()
        self.quantizer = plan.quantizer
        self.float_dtype = getattr(mx, source.float_dtype)
        self.name: str | None = None
        self.parts: dict[str, mx.array] = {}
        self.gain = Gain()
        self.layers = None
        if is_compensated(plan.rounding):
            # ranks of a split model draw their own: rank 0's profile holds only its own layers'
            alone = share is None or share.size == 1
            drawn = drawn_sequences(source, plan.rounding) if alone else None
            self.layers = compensated_layers(source, plan.quantization, plan.quantizer,
                                             plan.rounding, self.gain, progress, share, drawn)  # fmt: skip
        self.layer = -1
        self.rounded: dict[str, Packed] = {}

    def _compensated(self, name: str) -> Packed | None:
        module = name.removesuffix(".weight")
        position = pass_position(module, self.head)
        if self.layers is None or position is None:
            return None
        while self.layer < position:
            self.layer, self.rounded = next(self.layers)
        return self.rounded.pop(module, None)

    def get(self, t: OutTensor) -> mx.array:
        if t.source != self.name:
            self.parts.clear()
            mx.clear_cache()
            self.name = t.source
            w = self.weights.pop(t.source)
            if t.part == "copy":
                self.parts["copy"] = w.astype(self.float_dtype) if mx.issubdtype(
                    w.dtype, mx.floating) else w  # fmt: skip
            else:
                packed = self._compensated(t.source) or affine.quantize(
                    w.astype(self.float_dtype), t.group_size, t.bits, **self.quantizer
                )
                self.parts.update(weight=packed[0], scales=packed[1], biases=packed[2])
            mx.eval(*self.parts.values())
        return self.parts[t.part]

    def finish(self) -> None:
        """Runs the rounding pass to its end (its last layers may hold no planned module)."""
        for _ in self.layers or ():
            pass


def write_shards(
    source: Source, plan: Plan, folder: Path, progress: bool, share: Share | None = None
) -> tuple[dict[str, Any], Gain]:
    tensors = output_tensors(source, plan, share)
    shards = shard_layout(tensors, SHARD_BYTES)
    total = sum(t.nbytes for t in tensors)
    bar = Bar(total, "writing", unit="B", unit_scale=True, show=progress)
    producer = _Producer(source, plan, progress, share)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = (
            "model.safetensors"
            if len(shards) == 1
            else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        )
        with (folder / name).open("wb") as f:
            f.write(_header(shard))
            for t in shard:
                a = producer.get(t)
                if tuple(a.shape) != t.shape:
                    raise AssertionError(f"{t.name}: produced {a.shape}, planned {t.shape}")
                f.write(_to_bytes(a))
                weight_map[t.name] = name
                bar.update(t.nbytes)
    bar.close()
    producer.finish()
    return {"metadata": {"total_size": total, "total_parameters": source.parameter_count},
            "weight_map": dict(sorted(weight_map.items()))}, producer.gain  # fmt: skip


def _config(source: Source, plan: Plan) -> dict[str, Any]:
    config = dict(source.config)
    config.pop("_name_or_path", None)
    config["quantization"] = plan.quantization
    config["quantization_config"] = plan.quantization  # as mlx-lm's save_config writes it
    return dict(sorted(config.items()))


def check_plan(source: Source, plan: Plan) -> None:
    require_full_precision(source)
    if plan.fingerprint != source.fingerprint:
        raise BadModel(
            f"the plan was made for model {plan.fingerprint}, not {source.fingerprint} "
            f"({source.path}); make a new plan for this model"
        )


def quantize_to_serve(source: Source, plan: Plan, *, progress: bool = True) -> tuple[Path, bool]:
    """``quantize`` into the cache for a server that will load the folder: held first, so no
    eviction takes it before it is loaded (``cache.release`` lets it go)."""
    cache.hold(model_dir(source.fingerprint, plan.hash))
    return quantize(source, plan, progress=progress)


def part_dir(source: Source, plan: Plan, share: Share) -> Path:
    """Where one rank's part of a plan's model is cached: its layers (rank 0's also the embedding
    and the head), beside the whole model's folder."""
    if share.size == 1:
        return model_dir(source.fingerprint, plan.hash)
    return model_dir(source.fingerprint, f"{plan.hash}.layers-{share.start}-{share.stop - 1}")


def reserve_part(source: Source, plan: Plan, share: Share) -> bool:
    """Before a rank's part is written by the ranks together (``quantize_part``): held, and room
    made for it in the cache unless it is there; whether it must be written. A part that cannot
    be written fails here, before any rank starts the pass the others would wait in."""
    check_plan(source, plan)
    folder = part_dir(source, plan, share)
    cache.hold(folder)
    if verify(folder, plan.hash) is None:
        return False
    needed, what = needed_bytes(source, plan, share), f"{source.name}@{plan.budget.spec}"
    cache.reserve(needed, what, source.settings.cache, keep=folder)
    return True


def quantize_part(source: Source, plan: Plan, share: Share, relay: bool) -> Path:
    """This rank's part of the plan's model (cached), written while every rank writes its own:
    compensated rounding's pass is relayed between them (ramserve/relay.py). A rank whose part is
    cached still relays the pass for the others when ``relay``."""
    folder, cached = quantize(source, plan, part_dir(source, plan, share), progress=False,
                              share=share, in_cache=True)  # fmt: skip
    if cached and relay and is_compensated(plan.rounding):
        r = RoundingSettings(**plan.rounding)
        for _ in layer_inputs(source, r, lambda _: False, "relaying", False, share):
            pass
    return folder


def quantize(
    source: Source,
    plan: Plan,
    output: Path | None = None,
    *,
    progress: bool = True,
    share: Share | None = None,
    in_cache: bool = False,
) -> tuple[Path, bool]:
    """Write (or reuse) the quantized model for ``plan`` (or the part of ``share``); returns its
    folder and whether it was cached.

    A cached folder is checked first (``verify``); one that fails is rebuilt, never loaded. The bytes
    are reserved before the first is written (``cache.reserve``). A caller that will load the folder
    holds it first (``cache.hold``), so that no eviction takes it in between.
    """
    check_plan(source, plan)
    final = output or model_dir(source.fingerprint, plan.hash)
    with cache.writing(final):
        problem = verify(final, plan.hash)
        if problem is None:
            cache.touch(final)
            return final, True
        if final.exists():
            log.warning("%s cannot be trusted (%s); writing it again", final, problem)
        _write(source, plan, final, in_cache or output is None, progress, share)
    return final, False


def needed_bytes(source: Source, plan: Plan, share: Share | None) -> int:
    """The bytes a plan's folder takes: the shards, the tokenizer files, and the index, config and
    plan (sized from the plan)."""
    tensors = output_tensors(source, plan, share)
    extra = [source.path / n for n in TOKENIZER_FILES if (source.path / n).is_file()]
    metadata = (
        2 * len(json.dumps(plan.to_json())) + 100 * len(tensors) + len(json.dumps(source.config))
    )
    return sum(t.nbytes for t in tensors) + sum(p.stat().st_size for p in extra) + metadata


def _write(source: Source, plan: Plan, final: Path, in_cache: bool, progress: bool,
           share: Share | None) -> None:  # fmt: skip
    extra = [source.path / n for n in TOKENIZER_FILES if (source.path / n).is_file()]
    needed = needed_bytes(source, plan, share)
    what = f"{source.name}@{plan.budget.spec}"
    if in_cache:
        cache.reserve(needed, what, source.settings.cache, keep=final)
    else:
        cache.require_free(needed, final.parent, what, source.settings.cache)
    start = time.perf_counter()
    with cache.disk_errors(what, final.parent), atomic.staging_dir(final) as tmp:
        with freed_memory_returned():  # one module's buffers at a time, not the heap's high-water
            index, gain = write_shards(source, plan, tmp, progress, share)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        (tmp / "config.json").write_text(json.dumps(_config(source, plan), indent=1))
        for path in extra:
            shutil.copyfile(path, tmp / path.name)
        files, digests = manifest(tmp)
        seconds = time.perf_counter() - start
        written = Manifest(seconds, index["metadata"]["total_size"], files, digests)
        if gain.modules:
            written = replace(written, rounding_seconds=gain.seconds,
                              rounding_error_ratio=gain.ratio)  # fmt: skip
        (tmp / "plan.json").write_text(
            json.dumps(replace(plan, written=written).to_json(), indent=1)
        )


def rounding_line(folder: Path) -> str | None:
    """What compensated rounding cost and gained for the model in ``folder``, in a line."""
    plan = Plan.in_folder(folder)
    written = plan.written if plan else None
    if plan is None or written is None or written.rounding_error_ratio is None:
        return None
    return (
        f"rounding: compensated in {written.rounding_seconds or 0:.1f} s of the "
        f"{written.seconds:.1f} s written; output error under the sampled inputs "
        f"{written.rounding_error_ratio:.2f}x rounding to nearest's"
    )


def manifest(folder: Path) -> tuple[dict[str, int], dict[str, str]]:
    """What a written folder must still hold: every file's size, and the small files' digests (a
    shard is checked by size alone: hashing gigabytes on every load would cost more than the load)."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    return ({p.name: p.stat().st_size for p in files},
            {p.name: _digest(p) for p in files if p.suffix != ".safetensors"})  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def verify(folder: Path, expected_hash: str, *, digests: bool = True) -> str | None:
    """Why ``folder`` cannot be trusted as the model of plan ``expected_hash``, or None if it can: its
    plan.json must name that plan and hash to it, and every file must be as it was written (by size,
    and the small files by digest unless ``digests`` is false)."""
    if not (folder / "plan.json").is_file():
        return "no plan.json: never completed"
    try:
        plan = Plan.read(folder / "plan.json")
    except RecordError as e:
        return str(e)
    if plan.hash != expected_hash:
        return "plan.json is for another plan, or was edited: it no longer hashes to its name"
    written = plan.written
    if written is None or not written.files:
        return "plan.json has no file manifest (written by an older ramserve)"
    for name, size in written.files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size:,} bytes; {size:,} were written"
    for name, digest in written.sha256.items() if digests else ():
        if _digest(folder / name) != digest:
            return f"{name} was changed after it was written"
    return None


def is_complete(folder: Path, expected_hash: str) -> bool:
    """Whether ``folder`` holds this plan's model, complete, for listings (``/v1/models``, variant
    checks): sizes and the plan hash only; loading it runs ``quantize``, which checks digests too."""
    return verify(folder, expected_hash, digests=False) is None
