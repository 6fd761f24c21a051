"""The data-free profile: for every quantizable module, each candidate's exact bytes and predicted damage.

One module is in memory at a time. For each candidate (bits × group size from configs/, plus 16-bit)
the profile records the bytes MLX stores, the relative reconstruction error of MLX's own affine
quantization (``mx.quantize``/``mx.dequantize``, measured on a stratified row sample: groups run along
rows, so a sampled row is quantized exactly as in the full tensor), the signal-to-quantization-noise
ratio, and the predicted damage = importance × relative error (importance: ramserve/fisher.py, or
ramserve/sensitivity.py's energy flow when even one layer's gradients do not fit in memory).

The profile is cached at ``RAMSERVE_HOME/profiles/<fingerprint>.json``. While analysing, completed
layers are checkpointed to ``<fingerprint>.partial.json`` so that a run stopped by Ctrl-C resumes at the
last completed layer; the final file appears (atomically) only when every module is done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import mlx.core as mx
import numpy as np
from pydantic import TypeAdapter

from . import affine, atomic, cache
from .cache import profile_path
from .device import FLOAT_BYTES
from .fisher import FisherStat, require_streamable, self_fisher
from .process import freed_memory_returned
from .progress import Bar
from .records import (
    PROFILE_FORMAT,
    ModuleRecord,
    Option,
    Profile,
    RecordError,
    SelfSamples,
    module_records,
)
from .relay import Share, alone
from .rounding import Sequences, compensation_ratios, drawn_with
from .sensitivity import EnergyFlow, flow_order, importances
from .settings import RoundingSettings, Settings
from .source import ModuleInfo, Source, require_full_precision

log = logging.getLogger("ramserve.profile")

# Bytes of profile JSON per candidate, with headroom (measured: ~150), for the disk reservation.
BYTES_PER_OPTION = 400
BYTES_PER_TOKEN = 8  # a sampled token kept in the profile (its digits, a comma, a space)
# What the error measurement keeps alive at once (a candidate holds about 16 bytes per element).
IN_FLIGHT_BYTES = 48 << 20


def quantized_bytes(numel: int, last_dim: int, bits: int, group_size: int, float_bytes: int) -> int:
    """Bytes MLX stores for an affine-quantized tensor: packed uint32 words plus a scale and a bias
    per group in the float dtype."""
    rows = numel // last_dim
    words = rows * (last_dim * bits // 32)
    return 4 * words + 2 * float_bytes * (numel // group_size)


def candidates_for(m: ModuleInfo, settings: Settings) -> list[tuple[int, int]]:
    """The (bits, group size) pairs this module can take; 16-bit is always possible besides."""
    floor = settings.restrict.get(m.kind)
    min_bits = floor.min_bits if floor else 0
    return [
        (b, g)
        for b in settings.analysis.bits
        for g in m.group_sizes
        if b >= min_bits and (m.shape[-1] * b) % 32 == 0
    ]


def sample_rows(
    path: str, rows: int, cols: int, budget: int, prob: np.ndarray | None = None
) -> np.ndarray | None:
    """A deterministic sample of row indices, or None to measure the whole tensor: stratified over
    the rows, or, given row probabilities, systematic over their cumulative sum (rows the Fisher
    weighs more are measured more often; the estimates divide by the probability again)."""
    want = max(1, math.ceil(budget / cols))
    if want >= rows:
        return None
    rng = np.random.default_rng(zlib.crc32(path.encode()))
    if prob is not None:
        positions = (np.arange(want) + rng.random()) / want
        return np.minimum(np.searchsorted(np.cumsum(prob), positions, side="right"), rows - 1)
    edges = np.linspace(0, rows, want + 1).astype(np.int64)
    return edges[:-1] + rng.integers(0, np.maximum(1, np.diff(edges)))


def measure_errors(
    w: mx.array,
    cands: list[tuple[int, int]],
    streams: list[mx.Stream],
    weight: np.ndarray | None = None,
    fisher: tuple[np.ndarray, np.ndarray] | None = None,
    quantizer: dict[str, Any] | None = None,
) -> list[tuple[float, float | None]]:
    """Relative squared error of the affine quantization of ``w`` (2-D, float) per candidate, by
    ``quantizer`` (``affine.quantize``'s options; default mx.quantize): its rows weighted by ``weight``
    (default 1), and, given ``fisher`` = (row factors, column factors (rows or 1, in)), weighted by the
    Fisher's rank-1 estimate as well (else None)."""
    ref = w.astype(mx.float32)
    cols = None if fisher is None else mx.array(fisher[1].astype(np.float32))

    def row_sums(sq: mx.array) -> list[mx.array]:
        if cols is None:
            return [sq.sum(-1)]
        # one set of column weights for every row: a matrix-vector product, nothing as large as w
        weighted = sq @ cols[0] if cols.shape[0] == 1 else (sq * cols).sum(-1)
        return [sq.sum(-1), weighted]

    signal = row_sums(mx.square(ref))
    errs: list[list[mx.array]] = []
    # Candidates go round the streams (both cores busy), as many at once as keep about
    # ``IN_FLIGHT_BYTES`` of copies alive: small modules in one evaluation, whose fixed cost dominates.
    at_once = len(streams) * max(1, IN_FLIGHT_BYTES // (len(streams) * 16 * w.size))
    for start in range(0, len(cands), at_once):
        batch = []
        for k, (bits, g) in enumerate(cands[start : start + at_once]):
            with mx.stream(streams[k % len(streams)]):
                d = affine.dequantize(w, g, bits, **(quantizer or {}))
                # float32: in bf16 the rounding of the difference biases the error by a few percent
                batch.append(row_sums(mx.square(d.astype(mx.float32) - ref)))
        mx.eval(batch)
        errs += batch
    # row sums in float32, added up in float64: one float32 sum over millions of elements drifts by
    # about 1% (measured on a 5632 x 2048 tensor); row sums do not
    base = np.ones(w.shape[0]) if weight is None else weight
    weights = [base] if fisher is None else [base, base * fisher[0]]

    def weighted(rows: list[mx.array]) -> list[float]:
        return [
            float(wt @ np.asarray(r, dtype=np.float64)) for wt, r in zip(weights, rows, strict=True)
        ]

    totals = [max(t, 1e-30) for t in weighted(signal)]
    out = []
    for rows in errs:
        rel = [e / t for e, t in zip(weighted(rows), totals, strict=True)]
        out.append((rel[0], rel[1] if fisher else None))
    return out


def _searched(
    errors: list[tuple[float, float | None]],
    sample: mx.array,
    cands: list[tuple[int, int]],
    streams: list[mx.Stream],
    inverse: np.ndarray | None,
    factors: tuple[np.ndarray, np.ndarray] | None,
    quantizer: dict[str, Any],
    elements: int,
) -> list[tuple[float, float | None]]:
    """The errors of the search quantizer: the sample's errors under mx.quantize times the ratio of
    the two quantizers' errors on every k-th sampled row (the same rows for both, so the ratio's own
    sampling noise mostly cancels)."""
    step = max(1, math.ceil(sample.size / elements))
    rows = np.arange(0, sample.shape[0], step)
    sub = sample[mx.array(rows)] if step > 1 else sample
    inv = None if inverse is None else inverse[rows]
    fac = None if factors is None else (factors[0][rows],
                                        factors[1] if len(factors[1]) == 1 else factors[1][rows])  # fmt: skip
    plain = errors if step == 1 else measure_errors(sub, cands, streams, inv, fac)
    searched = measure_errors(sub, cands, streams, inv, fac, quantizer)

    def scaled(full: float, base: float, new: float) -> float:
        return full * new / base if base > 0 else new

    out: list[tuple[float, float | None]] = []
    for (e, ef), (p, pf), (s, sf) in zip(errors, plain, searched, strict=True):
        fisher = None if ef is None or pf is None or sf is None else scaled(ef, pf, sf)
        out.append((scaled(e, p, s), fisher))
    return out


def analyse_module(
    m: ModuleInfo,
    w: mx.array,
    settings: Settings,
    float_dtype: str,
    streams: list[mx.Stream],
    fisher: FisherStat | None = None,
) -> list[Option]:
    fb = FLOAT_BYTES[float_dtype]
    cands = candidates_for(m, settings)
    options = [Option(16, None, m.numel * fb, 0.0, None, 0.0 if fisher else None)]
    if not cands:
        return options
    cols = m.shape[-1]
    flat = w.reshape(-1, cols)
    a = settings.analysis
    smooth = settings.sensitivity.fisher.row_smoothing
    prob = fisher.row_probabilities(smooth) if fisher else None
    budget = max(a.sample_elements, int(m.numel * a.sample_fraction))
    idx = sample_rows(m.path, flat.shape[0], cols, budget, prob)
    sample = flat if idx is None else flat[mx.array(idx)]
    # importance-sampled rows: each counts 1/p (the plain error), times F̂ (the Fisher error)
    inverse = None if idx is None or prob is None else 1 / prob[idx]
    factors = None
    if fisher:
        scale = fisher.row_scale(smooth)
        factors = (scale if idx is None else scale[idx], fisher.column_weights(idx))
    mx.eval(sample)
    errors = measure_errors(sample, cands, streams, inverse, factors)
    quantizer = settings.quantizer.model_dump()
    if quantizer["ranges"]:
        errors = _searched(errors, sample, cands, streams, inverse, factors, quantizer,
                           a.search_sample_elements)  # fmt: skip
    for (bits, g), (rel, rel_fisher) in zip(cands, errors, strict=True):
        sqnr = -10 * math.log10(rel) if rel > 0 else None
        size = quantized_bytes(m.numel, cols, bits, g, fb)
        options.append(Option(bits, g, size, rel, sqnr, rel_fisher))
    return options


def squared_products(w: mx.array, columns: np.ndarray, slab_bytes: int = 16 << 20) -> np.ndarray:
    """Σ_j W_ij² c_jk for every flattened row i of ``w`` and column k of ``columns`` ((experts or 1,
    in, k)), in float64, shape (rows, k). A slab of rows at a time: the float32 square of a whole
    embedding would be twice its size."""
    per_expert = w.reshape(-1, *w.shape[-2:])
    c = mx.array(columns.astype(np.float32))
    step = max(1, slab_bytes // (4 * w.shape[-1]))
    out = []
    for e in range(per_expert.shape[0]):
        for r in range(0, per_expert.shape[1], step):
            part = mx.square(per_expert[e, r : r + step].astype(mx.float32)) @ c[e % c.shape[0]]
            out.append(np.asarray(part, dtype=np.float64))
    return np.concatenate(out)


def module_energies(
    m: ModuleInfo, w: mx.array, flow: EnergyFlow, fisher: FisherStat | None, smooth: float
) -> float | None:
    """One pass over the whole weight for what needs every row: the output energy the energy flow
    records (``flow.observe``), and ½ Σ F̂_ij W_ij², the KL per token if every weight were lost."""
    width = m.shape[-1]
    xin = flow.input_energy(m)
    parts = [np.ones(width) if xin is None else xin]
    if fisher:
        parts.append(fisher.columns())
    experts = max(p.size // width for p in parts)
    columns = np.stack([np.broadcast_to(p.reshape(-1, width), (experts, width)) for p in parts], -1)
    products = squared_products(w, columns)
    flow.observe(m, products[:, 0].reshape(m.shape[:-1]))
    return 0.5 * float(fisher.row_scale(smooth) @ products[:, 1]) if fisher else None


def settings_key(settings: Settings) -> str:
    """What the profile depends on besides the weights; a change invalidates the cache."""
    relevant = {"format": PROFILE_FORMAT, "analysis": settings.analysis.model_dump(),
                "quantizer": settings.quantizer.model_dump(),
                "kinds": [k.model_dump() for k in settings.kinds],
                "restrict": {k: v.model_dump() for k, v in settings.restrict.items()},
                "sensitivity": settings.sensitivity.model_dump(),
                # what the compensation ratios are measured with (not which rounding a plan gets)
                "rounding": {k: v for k, v in settings.rounding.model_dump().items()
                             if k != "method"}}  # fmt: skip
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def analyse_iter(
    source: Source,
    settings: Settings,
    done: dict[str, ModuleRecord],
    fisher: dict[str, FisherStat] | None = None,
    modules: list[ModuleInfo] | None = None,
) -> Iterator[ModuleRecord]:
    """Yield one record per module (of ``modules``, default all) in flow order; modules already in
    ``done`` are yielded as they are (their layer's energies are replayed, not recomputed). A
    module's energies need only its own layer's modules and norms, so each rank of a model split
    over machines analyses its own layers alone."""
    weights = source.weights()
    flow = EnergyFlow(
        settings.sensitivity,
        weights,
        num_experts_per_tok=int(source.config.get("num_experts_per_tok") or 1),
        head_dim=source.config.get("head_dim")
        or source.config["hidden_size"] // source.config["num_attention_heads"],
    )
    streams = [mx.new_stream(mx.cpu) for _ in range(settings.analysis.streams)]
    dtype = getattr(mx, source.float_dtype)
    for m in flow_order(source.modules if modules is None else modules):
        if m.path in done:
            weights.pop(f"{m.path}.weight", None)
            flow.energy[m.path] = done[m.path].energy
            yield done[m.path]
            continue
        start = time.perf_counter()
        w = weights.pop(f"{m.path}.weight").astype(dtype)
        mx.eval(w)
        stat = fisher.get(m.path) if fisher else None
        options = analyse_module(m, w, settings, source.float_dtype, streams, stat)
        energy = module_energies(m, w, flow, stat, settings.sensitivity.fisher.row_smoothing)
        del w
        mx.clear_cache()  # return freed buffers, so resident memory tracks one module
        yield ModuleRecord(m.path, m.kind, m.block, m.layer, list(m.shape), m.numel,
                           flow.energy[m.path], energy, options,
                           time.perf_counter() - start)  # fmt: skip


def fixed_bytes(source: Source) -> int:
    """Bytes of every tensor that is not a quantizable module's weight (norms, biases, …)."""
    quantizable = {f"{m.path}.weight" for m in source.modules}
    fb = FLOAT_BYTES[source.float_dtype]
    return sum(
        math.prod(shape) * fb for k, shape in source.tensor_shapes.items() if k not in quantizable
    )


def load_profile(source: Source) -> Profile | None:
    """The cached profile for this model and its settings, or None (a damaged one is reported)."""
    path = profile_path(source.fingerprint)
    if not path.exists():
        return None
    try:
        profile = Profile.read(path)
    except RecordError as e:
        log.warning("%s; analysing again", e)
        return None
    return profile if profile.settings_key == settings_key(source.settings) else None


def drawn_sequences(source: Source, rounding: dict[str, Any]) -> Sequences | None:
    """The sequences the analysis drew, where a compensated pass with ``rounding``'s settings would
    draw the same (``drawn_with``): quantizing then skips its sampling sweeps, a forward pass over
    every sampled token each. None where the cached profile has none to give."""
    profile = load_profile(source)
    samples = profile.samples if profile else None
    if samples is None or samples.drawn_with != drawn_with(source, RoundingSettings(**rounding)):
        return None
    return Sequences(mx.array(samples.tokens, dtype=mx.int32))


def _resume_state(partial: Path, key: str) -> dict[str, ModuleRecord]:
    data = atomic.read_json(partial)
    if not data or data.get("settings_key") != key:
        return {}
    try:
        return {r.path: r for r in module_records(data.get("modules", []))}
    except ValueError:  # a checkpoint from another version: start over
        return {}


class OtherRanks(Protocol):
    """The ranks that share a model split over machines with this one (rank 0), for its analysis."""

    share: Share  # rank 0's own layers
    fits: bool  # whether the Fisher's streamed pass fits every rank's memory

    def begin(self) -> None:
        """Tell every other rank to analyse its share."""

    def gather(self, own: SharePart) -> list[SharePart]:
        """Every other rank's part, once done (``own``: this rank's)."""


@dataclass
class SharePart:
    """One rank's analysis of its share of the model: its modules' records and compensation
    ratios; rank 0's also the KV cache's damage."""

    records: list[ModuleRecord]
    ratios: dict[str, float] = field(default_factory=dict)
    kv_damage: dict[str, float] = field(default_factory=dict)
    fisher_seconds: float | None = None
    rounding_seconds: float | None = None
    seconds: float = 0.0  # the whole share's analysis, wall clock
    samples: SelfSamples | None = None  # rank 0's: the sequences the ratios' pass drew

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SharePart:
        return TypeAdapter(cls).validate_python(data)


def owns(share: Share, m: ModuleInfo) -> bool:
    """Whether a module is analysed (and quantized) by the rank of ``share``: its layer's modules,
    and for rank 0 those outside the layers (the embedding, the head)."""
    return share.first if m.layer is None else m.layer in share.layers


def analyse_share(
    source: Source,
    share: Share,
    fits: bool | None,
    done: dict[str, ModuleRecord],
    partial: Path | None,
    key: str,
    progress: bool,
) -> SharePart:
    """The analysis of the modules of ``share``: the self-Fisher and the compensation ratios (their
    streamed passes relayed over the ranks, ramserve/relay.py), and each module's candidates, which
    run inside compensation's pass where the rank would wait on the ranks before it."""
    settings = source.settings
    modules = [m for m in source.modules if owns(share, m)]
    start = time.perf_counter()
    # not checkpointed: on a resumed run the seeded pass gives the same statistics again
    fisher = self_fisher(source, settings.sensitivity.fisher, progress, share, fits)
    fisher_s = time.perf_counter() - start if fisher else None
    stats = fisher.stats if fisher else None
    records: list[ModuleRecord] | None = None
    candidates_s = 0.0

    def candidates() -> None:  # needs the Fisher only: run where the rank would wait on others
        nonlocal records, candidates_s
        began = time.perf_counter()
        records = _run_analysis(source, settings, modules, done, stats, partial, key, progress)
        candidates_s = time.perf_counter() - began

    # where the Fisher's streamed pass fits, so does this one (one layer, its inputs)
    ratios_start = time.perf_counter()
    drawn = Sequences()
    ratios = compensation_ratios(
        source, settings.rounding.model_dump(),
        {m.path: candidates_for(m, settings) for m in modules},
        settings.quantizer.model_dump(), progress, share, candidates, drawn,
    ) if fisher else {}  # fmt: skip
    rounding_s = time.perf_counter() - ratios_start - candidates_s if ratios else None
    if records is None:
        candidates()
    assert records is not None
    samples = None
    if share.first and drawn.tokens is not None:
        samples = SelfSamples(
            drawn_with(source, settings.rounding), np.asarray(drawn.tokens).tolist()
        )
    return SharePart(records, ratios, fisher.kv_damage if fisher else {}, fisher_s, rounding_s,
                     time.perf_counter() - start, samples)  # fmt: skip


def merged(source: Source, parts: list[SharePart]) -> SharePart:
    """The ranks' parts as one (rank 0's first): records in flow order; the passes ran side by
    side, so their time is the longest rank's."""
    order = {m.path: i for i, m in enumerate(flow_order(source.modules))}
    records = sorted((r for p in parts for r in p.records), key=lambda r: order[r.path])
    missing = sorted(set(order) - {r.path for r in records})
    if missing:
        raise RecordError(f"the ranks' analyses miss {len(missing)} modules ({missing[0]}, …)")

    def longest(seconds: list[float | None]) -> float | None:
        known = [s for s in seconds if s is not None]
        return max(known) if known else None

    return SharePart(records, {k: v for p in parts for k, v in p.ratios.items()},
                     parts[0].kv_damage, longest([p.fisher_seconds for p in parts]),
                     longest([p.rounding_seconds for p in parts]),
                     max(p.seconds for p in parts), parts[0].samples)  # fmt: skip


def analyze(source: Source, *, force: bool = False, progress: bool = True,
            others: OtherRanks | None = None) -> Profile:  # fmt: skip
    """The profile of a model: from the cache when valid, else computed (resuming a partial run);
    split over machines, rank 0 analyses its share and gathers the ``others``'."""
    require_full_precision(source)
    settings = source.settings
    key = settings_key(settings)
    final = profile_path(source.fingerprint)
    with cache.writing(final):  # a second run for the same model waits, then finds it cached
        if not force and (cached := load_profile(source)):
            cache.touch(final)
            cached.cache_hit = True
            return cached
        require_streamable(source)  # before any work: an unsupported architecture is named
        partial = final.with_suffix(".partial.json")
        # the profile, the checkpoint and the atomic write's temporary copy of each
        needed = 4 * BYTES_PER_OPTION * sum(len(candidates_for(m, settings)) + 1
                                            for m in source.modules)  # fmt: skip
        # the sampled sequences: in the profile and its temporary copy (no checkpoint holds them)
        needed += 2 * BYTES_PER_TOKEN * settings.rounding.sequences * settings.rounding.tokens
        cache.reserve(needed, f"the profile of {source.name}", settings.cache, keep=final)
        done = {} if force else _resume_state(partial, key)
        with cache.disk_errors(f"the profile of {source.name}", final.parent):
            with freed_memory_returned():
                if others is None:
                    own = alone(int(source.config["num_hidden_layers"]))
                    part = analyse_share(source, own, None, done, partial, key, progress)
                else:  # every rank analyses its own layers; their parts come to this one
                    others.begin()
                    part = analyse_share(source, others.share, others.fits, {}, None, key, progress)
                    part = merged(source, [part, *others.gather(part)])
            profile = _assemble(source, settings, part.records, part.fisher_seconds, key,
                                part.ratios)  # fmt: skip
            profile.kv_damage = part.kv_damage
            profile.rounding_seconds = part.rounding_seconds
            profile.samples = part.samples
            profile.analysis_seconds += part.rounding_seconds or 0.0
            profile.write(final)
        partial.unlink(missing_ok=True)
    return profile


def _run_analysis(
    source: Source,
    settings: Settings,
    modules: list[ModuleInfo],
    done: dict[str, ModuleRecord],
    fisher: dict[str, FisherStat] | None,
    partial: Path | None,
    key: str,
    progress: bool,
) -> list[ModuleRecord]:
    total = sum(m.numel * 2 for m in modules)
    bar = Bar(total, "analysing", unit="B", unit_scale=True, show=progress)
    records: list[ModuleRecord] = []
    layer = None
    for rec in analyse_iter(source, settings, done, fisher, modules):
        if partial and rec.layer != layer and records and rec.path not in done:
            atomic.write_json(
                partial, {"settings_key": key, "modules": [asdict(r) for r in records]}
            )
        layer = rec.layer
        records.append(rec)
        bar.update(rec.numel * 2)
        bar.note(f"{len(records)}/{len(modules)} modules")
    bar.close()
    return records


def _assemble(
    source: Source,
    settings: Settings,
    records: list[ModuleRecord],
    fisher_seconds: float | None,
    key: str,
    ratios: dict[str, float],
) -> Profile:
    infos = {m.path: m for m in source.modules}
    ordered = [infos[r.path] for r in records]
    energy = {r.path: r.energy for r in records}
    weight, account = importances(ordered, energy, settings.sensitivity, source.tied_embeddings)
    fisher = fisher_seconds is not None
    modules = []
    for r in records:
        # self-Fisher: damage = ½ Σ F̂ δW² = the predicted KL per token (fisher.py)
        importance = (r.fisher_energy or 0.0) if fisher else weight[r.path]
        ratio = ratios.get(r.path)
        options = [
            replace(
                o,
                damage=importance * ((o.rel_fisher or 0.0) if fisher else o.rel_mse),
                rounding_ratio=ratio if o.bits < 16 else None,
            )  # fmt: skip
            for o in r.options
        ]
        modules.append(replace(r, importance=importance, options=options))
    return Profile(
        settings_key=key,
        fingerprint=source.fingerprint,
        name=source.name,
        model_type=source.model_type,
        float_dtype=source.float_dtype,
        parameters=source.parameter_count,
        bf16_bytes=2 * source.parameter_count,
        fixed_bytes=fixed_bytes(source),
        # the quantizer the errors were measured with, which a plan's weights must be written with
        quantizer=settings.quantizer.model_dump(),
        estimator="self-fisher/2" if fisher else "energy-flow/1",
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        analysis_seconds=sum(r.seconds for r in records) + (fisher_seconds or 0.0),
        fisher_seconds=fisher_seconds,
        layers=account,
        modules=modules,
    )


STAND_OUT = 4.0  # a module stands out when its importance is this many times the median


def standing_out(profile: Profile) -> tuple[float, list[ModuleRecord]]:
    """The median importance, and the modules over STAND_OUT times it, most important first (the
    X-ray of ``analyze --report`` and of the web page)."""
    ranked = sorted(profile.modules, key=lambda m: m.importance)
    median = ranked[len(ranked) // 2].importance if ranked else 0.0
    most = sorted(profile.modules, key=lambda m: -m.importance)  # ties in module order
    return median, [m for m in most if m.importance > STAND_OUT * median]


def render_report(profile: Profile) -> str:
    """The model X-ray: importance and 4-bit error per layer and module kind, and the outliers."""
    from .fmt import table

    modules = profile.modules
    kinds = list(dict.fromkeys(m.kind for m in modules if m.layer is not None))
    by_cell = {(m.layer, m.kind): m for m in modules}
    layers = sorted({m.layer for m in modules if m.layer is not None})
    rows = []
    for layer in layers:
        row: list[object] = [layer]
        for kind in kinds:
            m = by_cell.get((layer, kind))
            o = (m.option(4, 64) or m.option(4, 32)) if m else None
            row.append(
                f"{m.importance:.3g}/{o.sqnr_db:.1f}" if m and o and o.sqnr_db is not None else "-"
            )
        rows.append(row)
    imp = sorted(modules, key=lambda m: m.importance)
    lo, hi = imp[0].importance, imp[-1].importance
    median, stand_out = standing_out(profile)
    lines = [
        f"{profile.name}  fingerprint {profile.fingerprint}  estimator {profile.estimator}",
        "cell: importance / SQNR dB at 4-bit g64 (higher importance = the output cares more; with the"
        " self-Fisher, importance is the KL per token that losing the whole module would cost)",
        "",
        table(["layer", *kinds], rows),
        "",
    ]
    for m in modules:
        if m.layer is None:
            o = m.option(4, 64)
            lines.append(f"{m.path}: importance {m.importance:.3g}"
                         + (f", SQNR {o.sqnr_db:.1f} dB at 4-bit g64" if o and o.sqnr_db is not None else ""))  # fmt: skip
    lines.append(f"span of importance: {lo:.3g} .. {hi:.3g} ({hi / max(lo, 1e-30):.0f}x), "
                 f"median {median:.3g}")  # fmt: skip
    if stand_out:
        lines.append(f"stand out (importance > {STAND_OUT:g}x median): " + ", ".join(
            f"{m.path} ({m.importance / median:.0f}x)" for m in stand_out[:8]))  # fmt: skip
    return "\n".join(lines)


def summary(profile: Profile) -> dict[str, Any]:
    """The short JSON view of a profile (the full one is the cached file)."""
    p = profile
    return {"name": p.name, "fingerprint": p.fingerprint, "estimator": p.estimator,
            "parameters": p.parameters, "bf16_bytes": p.bf16_bytes, "fixed_bytes": p.fixed_bytes,
            "analysis_seconds": p.analysis_seconds, "cache_hit": p.cache_hit,
            "modules": len(p.modules), "candidates": sum(len(m.options) for m in p.modules),
            "path": str(profile_path(p.fingerprint))}  # fmt: skip
