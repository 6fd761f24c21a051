"""Compensated rounding (ramserve/compensate.py, ramserve/rounding.py): never worse than rounding to
nearest under the same H, per-expert H for stacked experts, plans that record it, and the stored model
equal to its simulation."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from ramserve import affine
from ramserve import quantize as qz
from ramserve.compensate import compensated, damped, dequantized, descended, row_errors
from ramserve.evaluate import simulate
from ramserve.fisher import Probe, StreamedModel, probe_modules
from ramserve.plan import make_plan
from ramserve.profile import analyze
from ramserve.rounding import (
    AFTER_LAYERS,
    Gain,
    Sequences,
    SharedInputs,
    compensated_layers,
    layer_inputs,
    pass_position,
    round_input,
)
from ramserve.settings import RoundingSettings, load_settings
from ramserve.source import open_source

from .factory import make_model

PROMPT = mx.array([[1, 5, 9, 42, 7, 100, 3, 64, 12, 8]])


def layer_probes(model_dir: Path, layer: int = 1) -> dict[str, Probe]:
    """A layer's linear modules after a call on a few token sequences: each probe holds the real
    inputs it saw (and for stacked experts the expert of each row)."""
    source = open_source(str(model_dir), load_settings())
    run = StreamedModel(source, mx.float32)
    x = mx.array(np.random.default_rng(0).integers(1, 200, (2, 48)), dtype=mx.int32)
    h, args, kwargs = run.first_layer_call(x)
    for i in range(layer):
        run.layers[i].update(run.layer_params(i))
        h = run.layers[i](h, *args, **kwargs)
    run.layers[layer].update(run.layer_params(layer))
    probes, _ = probe_modules(run, layer)
    for path, probe in probes.items():
        run.swap(path, probe)
    run.layers[layer](h, *args, **kwargs)
    return probes


def weight(model_dir: Path, path: str) -> mx.array:
    return open_source(str(model_dir), load_settings()).weights()[f"{path}.weight"]


@pytest.mark.parametrize(("bits", "group"), [(2, 32), (3, 64), (4, 128), (6, 64), (8, 32)])
def test_never_worse_than_nearest_under_the_same_h(dense: Path, bits: int, group: int) -> None:
    """Every module of a real layer, under the H of its real inputs: the compensated error is at
    most rounding to nearest's (same search quantizer), row by row, and clearly less in total."""
    q = load_settings().quantizer
    ratios = []
    for path, probe in layer_probes(dense).items():
        inputs, _ = probe.rows()
        w = weight(dense, path)
        x = np.asarray(inputs.astype(mx.float32))
        h = x.T @ x
        got = compensated(w, h, group, bits, q.ranges, q.refits)
        codes, s, b = affine._fit(w, group, bits, q.ranges, q.refits)
        rows = w.shape[0]
        near = dequantized(np.asarray(codes).reshape(rows, -1), np.asarray(s).reshape(rows, -1),
                           np.asarray(b).reshape(rows, -1), group)  # fmt: skip
        ref = np.asarray(w.astype(mx.float32))
        mine = dequantized(got.codes, got.scales, got.biases, group)
        err_near, err_mine = row_errors(ref - near, h), row_errors(ref - mine, h)
        assert (err_mine <= err_near * (1 + 1e-5) + 1e-12).all(), path
        assert got.error == pytest.approx(err_mine.sum(), rel=1e-4)
        assert got.nearest_error == pytest.approx(err_near.sum(), rel=1e-4)
        # the codes are valid and the stored form holds them
        assert got.codes.min() >= 0 and got.codes.max() <= (1 << bits) - 1
        packed = got.packed(w.dtype)
        back = affine.unpack_affine(packed[0], packed[1].astype(mx.float32),
                                    packed[2].astype(mx.float32), group, bits)  # fmt: skip
        assert np.allclose(np.asarray(back), mine, rtol=1e-2, atol=1e-3)
        ratios.append(err_mine.sum() / err_near.sum())
    assert np.median(ratios) < 0.9, ratios  # correlated inputs: compensation pays


def up_projection(model_dir: Path) -> tuple[mx.array, np.ndarray, np.ndarray]:
    """Layer 1's up projection: its weight in bfloat16, that weight in float32, and its inputs' H."""
    probes = layer_probes(model_dir)
    path = next(p for p in probes if p.endswith("up_proj"))
    inputs, _ = probes[path].rows()
    x = np.asarray(inputs.astype(mx.float32))
    w = weight(model_dir, path).astype(mx.bfloat16)
    return w, np.asarray(w.astype(mx.float32)), x.T @ x


def test_scales_rechosen_under_h_never_raise_the_error(dense: Path) -> None:
    """Each group's scale and bias re-chosen for its codes under the damped H (``refitted``): no
    row's error rises, the total falls, and the scales and biases are what the stored dtype holds;
    with rounds of it after the descent, the rounding ends with less error than without."""
    from ramserve import compensate

    w, ref, h = up_projection(dense)
    q = load_settings().quantizer
    start = compensated(w, h, 64, 3, q.ranges, q.refits, 0.1, descent=2)
    shift = compensate.damping(h, 0.1)
    s, b = compensate.refitted(ref, start.codes, start.scales, start.biases, 64, h, shift,
                               mx.bfloat16)  # fmt: skip
    hd = damped(h, 0.1)
    before = row_errors(ref - dequantized(start.codes, start.scales, start.biases, 64), hd)
    after = row_errors(ref - dequantized(start.codes, s, b, 64), hd)
    assert (after <= before * (1 + 1e-5) + 1e-9).all()
    assert after.sum() < 0.97 * before.sum()
    for a in (s, b):
        assert np.array_equal(np.asarray(mx.array(a).astype(mx.bfloat16).astype(mx.float32)), a)
    rounds = compensated(w, h, 64, 3, q.ranges, q.refits, 0.1, descent=2, scale_rounds=2)
    assert rounds.error < 0.97 * start.error
    assert rounds.error <= rounds.nearest_error


def test_the_gradient_carried_through_descent_and_refit_is_made_afresh(dense: Path) -> None:
    """The rounding makes the damped gradient E = (H + λI) δwᵀ once and each step keeps it current
    (``damped_gradient``): after a sweep of the descent and a refit of the scales, E is what the
    codes, scales and biases they return give afresh; and refitting in blocks of groups chooses what
    refitting one group at a time chooses."""
    from ramserve import compensate

    w, ref, h = up_projection(dense)
    q = load_settings().quantizer
    start = compensated(w, h, 32, 3, q.ranges, q.refits, 0.1)
    shift = compensate.damping(h, 0.1)
    e = compensate.damped_gradient(ref, start.codes, start.scales, start.biases, 32, h, shift)
    codes = descended(ref, start.codes, start.scales, start.biases, 32, 3, h, 1, 128, shift, e)
    assert (codes != start.codes).any()  # the sweep moved codes, so E had to follow them
    s, b = compensate.refitted(ref, codes, start.scales, start.biases, 32, h, shift, mx.bfloat16, e)
    assert (s != start.scales).any()
    fresh = compensate.damped_gradient(ref, codes, s, b, 32, h, shift)
    assert np.abs(e - fresh).max() < 1e-3 * np.abs(fresh).max()
    one = compensate.refitted(ref, codes, start.scales, start.biases, 32, h, shift, mx.bfloat16,
                              block=32)  # fmt: skip
    for mine, theirs in zip((s, b), one, strict=True):
        assert (mine != theirs).mean() < 0.001  # float sums in another order tip a rare near-tie


def test_slabs_of_rows_and_a_shifted_diagonal_round_the_same(
    dense: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What bounds the rounding's memory changes nothing it rounds: a weight taken in slabs of rows
    (and the search in slabs) gets the codes, scales, biases and errors it gets whole, and the
    descent under H with the damping as a diagonal shift chooses what it chooses under a damped copy
    of H."""
    from ramserve import compensate

    probes = layer_probes(dense)
    path = next(p for p in probes if p.endswith("gate_proj"))
    inputs, _ = probes[path].rows()
    x = np.asarray(inputs.astype(mx.float32))
    h = x.T @ x
    w = weight(dense, path)
    q = load_settings().quantizer
    whole = compensated(w, h, 64, 4, q.ranges, q.refits, 0.1, descent=2)
    rows, columns = w.shape
    monkeypatch.setattr(compensate, "ROW_SLAB_ELEMENTS", columns * (rows // 3 + 1))
    monkeypatch.setattr(affine, "SLAB_ELEMENTS", columns * 5)
    slabs = compensated(w, h, 64, 4, q.ranges, q.refits, 0.1, descent=2)
    for k in ("codes", "scales", "biases"):
        assert np.array_equal(getattr(whole, k), getattr(slabs, k)), k
    # and packed a slab of rows at a time (affine.SLAB_ELEMENTS, 5 rows here): MLX's packing of the
    # codes whole
    packed = slabs.packed(mx.bfloat16)[0]
    assert rows > 5 and packed.shape == (rows, columns * 4 // 32)
    assert mx.array_equal(packed, affine.pack_codes(mx.array(whole.codes), 4)).item()
    assert slabs.error == pytest.approx(whole.error, rel=1e-5)
    assert slabs.nearest_error == pytest.approx(whole.nearest_error, rel=1e-5)
    ref = np.asarray(w.astype(mx.float32))
    start = compensated(w, h, 64, 3, q.ranges, q.refits, 0.1)
    given = start.codes.copy()
    copied = descended(ref, start.codes, start.scales, start.biases, 64, 3, damped(h, 0.1), 2, 128)
    shifted = descended(ref, start.codes, start.scales, start.biases, 64, 3, h, 2, 128,
                        compensate.damping(h, 0.1))  # fmt: skip
    hd = damped(h, 0.1)
    error = {
        name: row_errors(ref - dequantized(c, start.scales, start.biases, 64), hd).sum()
        for name, c in (("start", start.codes), ("copied", copied), ("shifted", shifted))
    }
    # float32 sums in another order tip a few near-ties, nothing more
    assert (copied != shifted).mean() < 0.01
    assert error["shifted"] == pytest.approx(error["copied"], rel=1e-3)
    assert error["shifted"] < 0.99 * error["start"]  # and the descent did descend
    assert np.array_equal(start.codes, given)  # from the codes given, which it leaves as they were


def test_descent_never_raises_the_error(dense: Path) -> None:
    """Coordinate descent after the compensated pass: every sweep keeps each row's error under the
    damped H at most what it was, and lowers the total; the codes stay valid."""
    probes = layer_probes(dense)
    path = next(p for p in probes if p.endswith("up_proj"))
    inputs, _ = probes[path].rows()
    x = np.asarray(inputs.astype(mx.float32))
    h = damped(x.T @ x, 0.1)
    w = weight(dense, path)
    ref = np.asarray(w.astype(mx.float32))
    q = load_settings().quantizer
    start = compensated(w, x.T @ x, 64, 3, q.ranges, q.refits, 0.1)
    errors = [row_errors(ref - dequantized(start.codes, start.scales, start.biases, 64), h)]
    codes = start.codes
    for _ in range(2):
        codes = descended(ref, codes, start.scales, start.biases, 64, 3, h, 1, 128)
        assert codes.min() >= 0 and codes.max() <= 7
        errors.append(row_errors(ref - dequantized(codes, start.scales, start.biases, 64), h))
    for before, after in zip(errors[:-1], errors[1:], strict=True):
        assert (after <= before * (1 + 1e-4) + 1e-9).all()
    assert errors[-1].sum() < 0.99 * errors[0].sum()


@pytest.mark.parametrize("projection", ["down_proj", "gate_proj"])
def test_experts_are_rounded_under_their_own_h(tiny_moe_dir: Path, projection: str) -> None:
    """Stacked experts: each expert's weight is rounded under the H of the rows routed to it (equal
    to compensating that expert alone), and one that saw too few rows is rounded to nearest. Both
    ways the rows are kept: H summed per expert (down: each pair's own input), and the tokens' rows
    shared by their experts (gate)."""
    probes = layer_probes(tiny_moe_dir)
    path = next(p for p in probes if p.endswith(f"switch_mlp.{projection}"))
    assert (probes[path].token_rows() is None) == (projection == "down_proj")
    rows, experts = probes[path].rows()
    assert experts is not None
    w = weight(tiny_moe_dir, path).astype(mx.bfloat16)
    routed = np.asarray(experts)
    counts = np.bincount(routed, minlength=w.shape[0])
    assert (counts > 0).sum() >= 2
    # the expert with the fewest (but some) rows falls back; the others compensate
    sparse = int(np.argmin(np.where(counts > 0, counts, counts.max() + 1)))
    r = RoundingSettings(min_expert_tokens=int(counts[sparse]) + 1)
    if (counts >= r.min_expert_tokens).sum() == 0:
        pytest.fail(f"every expert is below the threshold: {counts}")
    q = {"bits": 4, "group_size": 32}
    quantizer = load_settings().quantizer.model_dump()
    gain = Gain()
    shared = SharedInputs(r.damp)
    key = shared.add({path: probes[path]})[path]
    packed = round_input({path: w}, shared, key, {path: q}, quantizer, r, gain)[path]
    x = np.asarray(rows.astype(mx.float32))
    for e in range(w.shape[0]):
        xe = x[routed == e]
        if counts[e] >= r.min_expert_tokens:
            want = compensated(w[e], xe.T @ xe, 32, 4, quantizer["ranges"], quantizer["refits"],
                               r.damp, r.block).packed(w.dtype)  # fmt: skip
        else:
            want = affine.quantize(w[e], 32, 4, **quantizer)
        for k in range(3):
            assert mx.array_equal(packed[k][e], want[k]), (e, k)
    assert gain.experts_nearest == int((counts < r.min_expert_tokens).sum()) >= 1
    assert gain.error <= gain.nearest_error


def test_a_pass_in_pieces_draws_the_same_sequences_and_sums_the_same_h(
    tiny_dir: Path, tiny_moe_dir: Path
) -> None:
    """Each layer run on pieces of the sequences (``pass_tokens``): the sampling sweep draws the
    same tokens as on all of them at once, and each input's H (per expert for stacked experts)
    summed over the pieces is the whole pass's."""
    base = load_settings().rounding.model_dump()
    length = base["tokens"]
    for model_dir in (tiny_dir, tiny_moe_dir):
        source = open_source(str(model_dir), load_settings())
        passes = {}
        for pass_tokens in (0, length):  # at once; one sequence a piece
            r = RoundingSettings(**{**base, "pass_tokens": pass_tokens})
            drawn = Sequences()
            layers = list(layer_inputs(source, r, lambda _: True, "t", False, sequences=drawn))
            passes[pass_tokens] = drawn.tokens, layers
        (tokens, whole), (tokens_p, pieces) = passes[0], passes[length]
        assert tokens is not None and tokens_p is not None and tokens.shape[0] >= 2
        assert mx.array_equal(tokens, tokens_p).item()
        assert len(whole) == len(pieces) and whole
        for (i, keys, a), (j, keys_p, b) in zip(whole, pieces, strict=True):
            assert i == j and keys == keys_p
            for key in set(keys.values()):
                routed = a.experts(key)
                assert (routed is None) == (b.experts(key) is None)
                experts = [-1] if routed is None else sorted(set(routed.tolist()))
                if routed is not None:  # mlx-lm may sort the rows by expert: counts match
                    assert np.array_equal(np.bincount(routed), np.bincount(b.experts(key)))
                for e in experts:
                    sa, sb = a.of(key, e), b.of(key, e)
                    assert sa.count == sb.count > 0
                    scale = np.abs(sa.h).max()
                    assert np.allclose(sa.h, sb.h, rtol=1e-4, atol=1e-5 * scale), (i, key, e)


def test_the_head_is_rounded_under_the_final_norms_output(tmp_path: Path) -> None:
    """An untied head's inputs are the model's final hidden states (the norm of the last layer's
    output), as the full model computes them; a tied head is not rounded by the pass."""
    from mlx_lm.utils import load_model

    src = make_model(tmp_path / "qwen3", "qwen3", layers=2)
    source = open_source(str(src), load_settings())
    run = StreamedModel(source, mx.float32)
    _, last, _, _ = run.hidden_states(PROMPT)
    got = run.head_inputs(PROMPT, last)
    model, _ = load_model(src)
    model.set_dtype(mx.float32)
    want = model.model(PROMPT)  # mlx-lm's decoder returns the final norm's output
    assert got.shape == want.shape
    assert mx.allclose(got, want, rtol=1e-4, atol=1e-4).item()
    assert source.untied_head == "lm_head" and pass_position("lm_head", "lm_head") == AFTER_LAYERS
    tied = open_source(str(make_model(tmp_path / "tied", "qwen3", layers=2, tied=True)),
                       load_settings())  # fmt: skip
    assert tied.untied_head is None


def test_plans_that_differ_only_in_rounding_hash_differently(tiny_dir: Path) -> None:
    settings = load_settings()
    profile = analyze(open_source(str(tiny_dir), settings), progress=False)
    plan = make_plan(profile, "40%", settings=settings)
    assert plan.rounding["method"] == "compensated"  # the default
    nearest = settings.model_copy(
        update={"rounding": settings.rounding.model_copy(update={"method": "nearest"})}
    )
    assert make_plan(profile, "40%", settings=nearest).rounding == {"method": "nearest"}
    other = replace(plan, rounding={"method": "nearest"})
    assert other.hash != plan.hash
    more = replace(plan, rounding={**plan.rounding, "sequences": plan.rounding["sequences"] + 1})
    assert len({plan.hash, other.hash, more.hash}) == 3
    assert type(plan).from_json(plan.to_json()).hash == plan.hash


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe", "llama"])
def test_stock_mlx_lm_loads_it_with_the_simulated_logits(tmp_path: Path, arch: str) -> None:
    """The compensated model folder loads with stock mlx_lm.load; its logits are the simulation's,
    and differ from the same plan rounded to nearest."""
    src = make_model(tmp_path / arch, arch, layers=2)
    settings = load_settings()
    source = open_source(str(src), settings)
    plan = make_plan(analyze(source, progress=False), "40%", settings=settings)
    folder, _ = qz.quantize(source, plan, progress=False)
    written = type(plan).read(folder / "plan.json").written
    assert written is not None and written.rounding_error_ratio is not None
    assert 0 < written.rounding_error_ratio <= 1

    model, _ = load(str(folder))
    model.set_dtype(mx.float32)
    got = model(PROMPT)

    def simulated(rounding: dict) -> mx.array:
        from mlx_lm.utils import load_model

        m, _ = load_model(src)
        simulate(m, plan.quantization, mx.float32, plan.quantizer, rounding, source)
        m.set_dtype(mx.float32)
        return m(PROMPT)

    want, near = simulated(plan.rounding), simulated({"method": "nearest"})
    scale = mx.abs(want).max().item()
    assert mx.abs(got - want).max().item() < 1e-3 * scale
    assert mx.abs(near - want).max().item() > 1e-3 * scale


def test_the_profile_predicts_the_damage_of_compensated_rounding(tiny_dir: Path) -> None:
    """Each quantizable candidate carries the share of its error compensation removes (measured on
    sampled rows, never above 1); a plan under compensated rounding predicts its damage scaled by it."""
    settings = load_settings()
    profile = analyze(open_source(str(tiny_dir), settings), progress=False)
    ratios = {m.path: {o.rounding_ratio for o in m.options if o.bits < 16} for m in profile.modules}
    measured = {p: r.pop() for p, r in ratios.items() if r and None not in r and len(r) == 1}
    # every linear module of the layers and the untied head is measured (the embedding rounds
    # to nearest)
    kinds = {m.path: m.kind for m in profile.modules}
    assert "lm_head" in kinds.values()
    assert {m.path for m in profile.modules if m.layer is not None or m.kind == "lm_head"} <= set(
        measured
    )
    assert not any(kinds[p] == "embedding" for p in measured)
    assert all(0 < r <= 1 for r in measured.values()), measured
    assert min(measured.values()) < 0.95  # compensation removes error somewhere
    nearest = settings.model_copy(
        update={"rounding": settings.rounding.model_copy(update={"method": "nearest"})}
    )
    plan, other = (
        make_plan(profile, "35%", settings=settings),
        make_plan(profile, "35%", settings=nearest),
    )
    for p in (plan, other):
        compensated = p.rounding["method"] == "compensated"
        chosen = [
            next(o for o in m.options if (o.bits, o.group_size) == (c.bits, c.group_size))
            for m in profile.modules
            for c in [p.choices[m.path]]
        ]
        want = sum(o.damage_with(compensated) for o in chosen)
        assert p.predicted_damage == pytest.approx(want, rel=1e-9)
    assert plan.predicted_damage < other.predicted_damage


@pytest.mark.parametrize("shape", [(2, 7, 1, 1, 16), (14, 1, 16)])
def test_expert_matmul_is_gather_mm_with_its_gradients(shape: tuple[int, ...]) -> None:
    """The streamed passes' per-expert BLAS product equals MLX's gather_mm, values and gradients
    (the layouts mlx-lm's SwitchGLU calls with: broadcast tokens, and rows sorted by expert)."""
    from ramserve.fisher import expert_matmul

    k = mx.random.key(3)
    x = mx.random.normal(shape, key=k)
    w = mx.random.normal((5, 6, 16), key=mx.random.split(k)[0])
    lead = (2, 7, 3) if len(shape) == 5 else (14,)
    idx = mx.random.randint(0, 4, lead, key=mx.random.split(k)[1]).astype(
        mx.uint32
    )  # expert 4 unused

    def ref(x: mx.array, w: mx.array) -> mx.array:
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=idx)

    def mine(x: mx.array, w: mx.array) -> mx.array:
        return expert_matmul(x, w, idx)

    assert mx.allclose(mine(x, w), ref(x, w), atol=1e-4).item()
    g_ref = mx.grad(lambda a, b: (ref(a, b) ** 2).sum(), argnums=(0, 1))(x, w)
    g_mine = mx.grad(lambda a, b: (mine(a, b) ** 2).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(g_mine, g_ref, strict=True):
        assert mx.allclose(a, b, atol=1e-3).item()


def test_expert_matmul_gradient_lets_each_widened_expert_go() -> None:
    """Under ``mx.grad`` the per-expert products do not keep every expert's widened weight for the
    backward pass (MLX's tape would: the self-Fisher's MoE layers held 600 MB of them)."""
    from ramserve.fisher import expert_matmul

    experts, out, width, tokens = 64, 512, 512, 256
    k = mx.random.key(5)
    w = (mx.random.normal((experts, out, width), key=k) * 0.05).astype(mx.bfloat16)
    x = mx.random.normal((tokens, 1, 1, width), key=mx.random.split(k)[0])
    idx = mx.random.randint(0, experts, (tokens, 4), key=mx.random.split(k)[1]).astype(mx.uint32)
    mx.eval(w, x, idx)
    widened = experts * out * width * 4  # every expert in float32: 67 MB
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    g = mx.grad(lambda a: (expert_matmul(a, w, idx) ** 2).sum())(x)
    mx.eval(g)
    assert mx.get_peak_memory() - base < widened / 4
    ref = mx.grad(lambda a: (mx.gather_mm(a, w.astype(mx.float32).swapaxes(-1, -2),
                                          rhs_indices=idx) ** 2).sum())(x)  # fmt: skip
    assert mx.allclose(g, ref, rtol=1e-3, atol=1e-3).item()


@pytest.mark.parametrize("layout", ["hub", "stacked"])
def test_experts_are_read_an_expert_at_a_time_with_the_results_of_reading_them_whole(
    tmp_path: Path, tiny_moe_dir: Path, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stacked experts are read from the checkpoint an expert at a time, whether they lie there one
    tensor per expert (the hub's layout, which mlx-lm's ``sanitize`` stacks) or as one tensor (mlx-lm's),
    by the streamed passes and by compensated rounding (no layer's stacks resident), and give the
    self-Fisher and the compensated weights exactly what reading each stack whole gives."""
    from ramserve.fisher import StreamedModel, streamed_fisher
    from ramserve.source import ExpertBytes, Source

    folder = tiny_moe_dir
    if layout == "stacked":
        folder = make_model(tmp_path / "stacked", "qwen3_moe", stacked_experts=True)
    settings = load_settings()
    source = open_source(str(folder), settings)
    run = StreamedModel(source, mx.float32)
    experts = [k for k, shape in source.tensor_shapes.items() if len(shape) == 3]
    assert experts and set(run.streamed) == set(experts)
    key = experts[0]
    reader = run.streamed[key]
    assert isinstance(reader, ExpertBytes)
    whole = source.weights()[key]
    for e in range(whole.shape[0]):
        assert mx.array_equal(reader[e], whole[e]).item(), e
    assert reader.astype(mx.float32)[1].dtype == mx.float32
    assert not any(k in run.layer_params(0) for k in ("mlp.switch_mlp.up_proj.weight",))

    fisher = settings.sensitivity.fisher
    plan = {m.path: {"bits": 4, "group_size": 32} for m in source.modules if m.kind != "embedding"}
    rounding, quantizer = settings.rounding.model_dump(), settings.quantizer.model_dump()

    def results(s: Source) -> tuple[dict, dict]:
        stats = streamed_fisher(s, fisher, mx.float32, False).stats
        return stats, dict(compensated_layers(s, plan, quantizer, rounding, Gain()))

    streamed = results(source)
    monkeypatch.setattr(Source, "experts_as_stored", lambda self, key: None)
    assert not StreamedModel(open_source(str(folder), settings), mx.float32).streamed
    whole_read = results(open_source(str(folder), settings))
    for path in streamed[0]:
        assert np.array_equal(streamed[0][path].rows, whole_read[0][path].rows), path
        assert np.array_equal(streamed[0][path].cols, whole_read[0][path].cols), path
    for i, layer in whole_read[1].items():
        for path, theirs in layer.items():
            mine = streamed[1][i][path]
            assert all(mx.array_equal(p, q).item() for p, q in zip(mine, theirs, strict=True)), path


def test_experts_that_sanitize_changes_are_read_whole(tmp_path: Path, tiny_moe_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Where ``sanitize`` does more to the experts than stack them (here: scales them), their
    stored bytes are not what mlx-lm computes with, so they are read whole."""
    from mlx_lm.models.qwen3_moe import Model

    plain = Model.sanitize

    def scaled(self: Model, weights: dict) -> dict:
        out = plain(self, weights)
        return {k: v * 2 if "switch_mlp" in k else v for k, v in out.items()}

    monkeypatch.setattr(Model, "sanitize", scaled)
    source = open_source(str(tiny_moe_dir), load_settings())
    experts = [k for k, shape in source.tensor_shapes.items() if len(shape) == 3]
    assert experts and all(source.experts_as_stored(k) is None for k in experts)


def test_an_expert_read_from_a_truncated_shard_names_the_file(tmp_path: Path) -> None:
    from ramserve.errors import BadModel
    from ramserve.fisher import StreamedModel

    folder = make_model(tmp_path / "stacked", "qwen3_moe", stacked_experts=True, shards=1)
    run = StreamedModel(open_source(str(folder), load_settings()), mx.float32)
    reader = run.streamed[next(iter(run.streamed))]
    shard, offset = reader.places[0]
    with shard.open("r+b") as f:
        f.truncate(offset + 10)
    with pytest.raises(BadModel, match=str(shard)):
        reader[0]
