"""The self-Fisher: how much each weight's error costs, from sequences the model writes itself.

Because the tokens are the model's own samples, the gradient of their log-likelihood is a sample of the
score, whose second moment is the Fisher information: no labels and no text. Second order, a weight
error δW costs ``½ Σ F_ij δW_ij²`` nats of KL divergence per token.

The pass is *streamed*: mlx-lm's own model runs with one decoder layer's weights in memory at a time
(each layer of the list is replaced by a stand-in that loads the real layer's tensors, runs it, and lets
them go), so the peak is about one layer, its gradients and the activations, however large the model:

1. inputs: ``jacobi`` parallel sampling sweeps (each one streamed forward pass over every sequence at
   once; split over ranks, in chunks of sequences pipelined through them). With the Gumbel noise of
   every position fixed, sweep k makes the first k tokens exactly the model's own temperature-1
   sample and the rest a sample given a nearly converged prefix, instead of one pass per token as
   autoregressive sampling needs;
2. labels: one more sweep samples each next token from the model given the final inputs, so the
   gradient is an exact score sample at those inputs (the true Fisher, never the empirical one); that
   pass also keeps each layer's input;
3. the head's gradient gives d(log p)/d(last hidden state) per sequence, and going down the layers, each layer is run again under ``mx.grad`` with the
   gradient from above: its weights' gradients give the module statistics and its input's gradient
   goes on to the layer below; the embedding's comes last.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .affine import joined
from .errors import BadModel
from .progress import Bar
from .relay import Share, Work, alone, arrive, arrive_down, chunk_rows, leave, leave_down, ring
from .seams import DecoderStack, swap_classes, with_cache
from .settings import FisherSettings
from .source import ExpertBytes

# The architectures the seams (this layer streaming, cpu.adapt_to_cpu) are tested on, for the message.
TESTED = "Llama, Qwen3 and Qwen3-MoE, with tied and untied heads"


@dataclass
class FisherStat:
    """A module's diagonal Fisher per token, kept as its trace and its rank-1 marginals: ``rows`` sums
    over input channels (shape (..., out)), ``cols`` over output channels ((..., in)). The element
    (i, j) is estimated as rows_i × cols_j / trace (per expert for stacked experts): which outputs the
    model's loss is sensitive to, times which inputs carry energy, as in K-FAC's factorisation."""

    rows: np.ndarray
    cols: np.ndarray

    @property
    def trace(self) -> float:
        return float(self.rows.sum())

    def smoothed_rows(self, smooth: float) -> np.ndarray:
        """Flattened row sums plus ``smooth`` × their mean: rows the sampled sequences never reach
        (embedding rows of unseen tokens) still count a little."""
        rows = self.rows.reshape(-1)
        return np.asarray(rows + smooth * rows.mean())

    def row_probabilities(self, smooth: float) -> np.ndarray:
        """Each flattened row's share of the (smoothed) Fisher: where the damage is."""
        rows = self.smoothed_rows(smooth)
        total = rows.sum()
        return np.asarray(rows / total) if total > 0 else np.full(rows.size, 1 / rows.size)

    def row_scale(self, smooth: float) -> np.ndarray:
        """Each flattened row's smoothed sum over its expert's total: F̂_ij = row_scale_i × cols_j
        of row i's expert."""
        rows = self.smoothed_rows(smooth)
        per_expert = self.rows.shape[-1]
        total = self.rows.reshape(-1, per_expert).sum(-1)
        expert = np.arange(rows.size) // per_expert
        return np.asarray(rows / np.maximum(total[expert], 1e-30))

    def columns(self) -> np.ndarray:
        """The column marginals per expert, (experts, in) (one row for a plain module)."""
        return self.cols.reshape(-1, self.cols.shape[-1])

    def column_weights(self, row_index: np.ndarray | None) -> np.ndarray:
        """The column marginals that weigh each given flattened row (all when None): (rows, in),
        or (1, in) for a plain module, where every row shares them."""
        cols = self.columns()
        if cols.shape[0] == 1:
            return cols
        index = np.arange(self.rows.size) if row_index is None else row_index
        picked: np.ndarray = cols[index // self.rows.shape[-1]]
        return picked


class _Stop(Exception):
    """Ends a model call early, carrying the hidden state where it stopped (and the layer call's
    other arguments)."""

    def __init__(self, h: mx.array, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                 ) -> None:  # fmt: skip
        self.h, self.args, self.kwargs = h, args, kwargs or {}


class _Slot:
    """Takes a decoder layer's place in the model's list: calls go to ``run``, attributes the model's
    loop reads (``use_sliding``, …) to the real layer."""

    def __init__(self, layer: Any, run: Callable[..., mx.array]) -> None:
        self._layer, self._run = layer, run

    def __call__(self, *args: Any, **kwargs: Any) -> mx.array:
        return self._run(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._layer, name)


class _Given(nn.Module):
    """Stands in for the embedding: returns the lookup values it is given, else zeros; no weights."""

    def __init__(self, width: int, dtype: mx.Dtype) -> None:
        super().__init__()
        self._width, self._dtype = width, dtype
        self._value: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        if self._value is None:
            return mx.zeros((*x.shape, self._width), dtype=self._dtype)
        return self._value


class _HeadProbe(nn.Module):
    """Wraps the head: keeps its input and adds ``_z`` to its output, so that the gradient with
    respect to z is the gradient with respect to the logits. The head's own weight gradient, as large
    as the head, is never formed (``Marginals.add_product`` needs only those two)."""

    def __init__(self, inner: nn.Module, tied: bool) -> None:
        super().__init__()
        self._inner, self._tied = inner, tied
        self._x: mx.array | None = None
        self._z: mx.array | None = None

    def __call__(self, x: mx.array) -> mx.array:
        # tied: this is the embedding, and calling it is the lookup
        return self._inner(x) if self._tied else self._probe(self._inner(x), x)

    def as_linear(self, x: mx.array) -> mx.array:
        return self._probe(self._inner.as_linear(x), x)

    def _probe(self, y: mx.array, x: mx.array) -> mx.array:
        self._x = x
        return y if self._z is None else y + self._z


class Marginals:
    """Running sums of squared per-sequence gradients, as row and column marginals per module."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.rows: dict[str, mx.array] = {}
        self.cols: dict[str, mx.array] = {}

    def _accumulate(self, path: str, rows: mx.array, cols: mx.array) -> None:
        self.rows[path] = self.rows[path] + rows if path in self.rows else rows
        self.cols[path] = self.cols[path] + cols if path in self.cols else cols

    def add(self, path: str, grad: mx.array) -> None:
        sq = mx.square(grad.astype(mx.float32))
        self._accumulate(path, sq.sum(-1), sq.sum(-2))

    def add_product(
        self, path: str, delta: mx.array, inputs: mx.array, experts: mx.array | None = None
    ) -> None:
        """Adds the marginals of G², G = deltaᵀ inputs (a linear map's weight gradient from its
        output gradients (T, out) and inputs (T, in)), through T×T Gram matrices: G is never formed.
        Stacked experts: row t went through expert ``experts[t]``, and expert e's gradient sums its
        own rows only, so the Gram matrices keep the pairs of rows that share an expert."""
        delta, inputs = delta.astype(mx.float32), inputs.astype(mx.float32)
        near, far = inputs @ inputs.T, delta @ delta.T
        if experts is not None:
            same = (experts[:, None] == experts[None, :]).astype(mx.float32)
            near, far = near * same, far * same
        rows, cols = (near @ delta * delta), (far @ inputs * inputs)
        if experts is None:
            self._accumulate(path, rows.sum(0), cols.sum(0))
            return
        count = self.shapes[path][0]
        self._accumulate(path, mx.zeros((count, rows.shape[-1])).at[experts].add(rows),
                         mx.zeros((count, cols.shape[-1])).at[experts].add(cols))  # fmt: skip

    def add_rows(self, path: str, index: mx.array, grad: mx.array, counted: mx.array) -> None:
        """Adds a gradient that is zero outside the rows ``index``: (grad + counted)² − counted²,
        counted being a part of those rows' gradient that was added before."""
        sq = mx.square(grad + counted) - mx.square(counted)
        rows = mx.zeros((self.shapes[path][-2],)).at[index].add(sq.sum(-1))
        self._accumulate(path, rows, sq.sum(0))

    def eval(self) -> None:
        mx.eval(self.rows, self.cols)

    def stats(self, tokens: int) -> dict[str, FisherStat]:
        return {p: FisherStat(np.asarray(self.rows[p], dtype=np.float64) / tokens,
                              np.asarray(self.cols[p], dtype=np.float64) / tokens)
                for p in self.rows}  # fmt: skip


Hidden = tuple[
    list[mx.array], mx.array, tuple[Any, ...], dict[str, Any]
]  # what StreamedModel.hidden_states returns


class StreamedModel:
    """mlx-lm's model for a source with no weights resident: calls load what each part needs."""

    def __init__(
        self, source: Any, dtype: mx.Dtype, share: Share | None = None, pass_tokens: int = 0
    ) -> None:
        from .source import model_classes

        self.source, self.dtype, self.pass_tokens = source, dtype, pass_tokens
        # tensors read in their stored dtype, not the run's: stacked experts on the CPU, which
        # ``expert_matmul`` widens one expert at a time (in float32 a layer of them is twice the
        # memory: 600 MB at Qwen3-30B's widths with 32 experts)
        self.stored: set[str] = set()
        model_class, args_class = model_classes(source.config)
        self.model = model_class(args_class.from_dict(source.config))
        if mx.default_device() == mx.cpu:  # on Metal, gather_mm is fast
            from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear

            swapped = swap_classes(self.model, {SwitchLinear: _blas_switch_class(),
                                                SwitchGLU: _unsorted_glu_class()})  # fmt: skip
            if swapped:  # stacked experts stay as stored, widened an expert at a time
                self.stored = {f"{m.path}.weight" for m in source.modules
                               if len(source.tensor_shapes[f"{m.path}.weight"]) == 3}  # fmt: skip
        # those whose experts lie in the checkpoint as stored are read an expert at a time when used;
        # such a weight gets no gradient, so only where a probe stands in for its module
        self.streamed: dict[str, ExpertBytes] = {}
        modules: dict[str, Any] = dict(self.model.named_modules())
        for key in self.stored:
            path = key.removesuffix(".weight")
            if isinstance(modules[path], probed_types()) and (
                experts := source.experts_as_stored(key)
            ):
                self.streamed[key] = modules[path].streamed = experts
        stack = DecoderStack.of(self.model)  # seams: the list the model's loop reads
        self.layers = stack.layers
        # this rank's layers; rank 0 alone holds the embedding and the head (ramserve/relay.py)
        self.share = share or alone(len(self.layers))
        self.prefixes = [p + "." for p in stack.paths]
        self.slots: list[Any] = stack.slots  # its entries are swapped for stand-ins
        # their never-evaluated initialisers: restoring them lets loaded tensors go
        self.blank = [layer.parameters() for layer in self.layers]
        flat: list[tuple[str, mx.array]] = tree_flatten(self.model.parameters())  # type: ignore[assignment]
        self.outer_blank = [(k, v) for k, v in flat if self._outer(k)]
        kinds = {m.path: m.kind for m in source.modules}
        embed = next((p for p, k in kinds.items() if k == "embedding"), None)
        if embed is None:
            raise ValueError("no embedding module found (configs: [[kinds]] embedding)")
        self.embed_path: str = embed
        self.head_path: str = source.untied_head or embed
        self.tied = self.head_path == self.embed_path
        self.width = int(source.tensor_shapes[f"{embed}.weight"][-1])
        self.vocab_out = int(source.tensor_shapes[f"{self.head_path}.weight"][0])
        self.quantizable = {f"{m.path}.weight": m.path for m in source.modules}
        # progress: a share of one layer of a pass run (a chunk's)
        self.layer_done: Callable[[float], None] = lambda part: None

    def _module(self, path: str) -> Any:
        return dict(self.model.named_modules())[path] if path else self.model

    # -- tensors --------------------------------------------------------------------------------

    def tensors(self, keep: Callable[[str], bool]) -> dict[str, mx.array]:
        """The named tensors in the run dtype, read now (from a fresh lazy map, so nothing else of
        the checkpoint stays resident)."""
        out = {}
        for k, v in self.source.weights().items():
            if keep(k):
                out[k] = v if k in self.stored else v.astype(self.dtype)
                mx.eval(out[k])  # one at a time: only one tensor is ever held in both dtypes
        return out

    def _outer(self, k: str) -> bool:
        return not any(k.startswith(p) for p in self.prefixes)

    @contextmanager
    def outer(self, *, head: bool) -> Iterator[tuple[_HeadProbe | None, _Given | None]]:
        """Everything outside the layers (norms, …) loaded, and the head too when asked (wrapped in
        a probe); the embedding is a stand-in given its lookup values (for a tied one asked as the
        head, the real module). Released afterwards."""
        embed_key = f"{self.embed_path}.weight"
        head_key = f"{self.head_path}.weight"
        skip = {embed_key, head_key} - ({head_key} if head else set())
        loaded = self.tensors(lambda k: self._outer(k) and k not in skip)
        self.model.update(tree_unflatten(list(loaded.items())), strict=False)
        del loaded
        probe = given = None
        swapped = []
        if head:
            probe = _HeadProbe(self._module(self.head_path), self.tied)
            swapped.append((self.head_path, self.swap(self.head_path, probe)))
        if not (head and self.tied):
            given = _Given(self.width, self.dtype)
            swapped.append((self.embed_path, self.swap(self.embed_path, given)))
        try:
            yield probe, given
        finally:
            for path, module in reversed(swapped):
                self.swap(path, module)
            self.model.update(tree_unflatten(self.outer_blank), strict=False)

    def swap(self, path: str, module: Any) -> Any:
        parent_path, _, name = path.rpartition(".")
        parent = self._module(parent_path)
        old = parent[name]
        parent[name] = module
        return old

    def lookups(self, x: mx.array) -> mx.array:
        """The embedding rows of ``x`` in the run dtype (the table is read once, in its own dtype)."""
        table = self.source.weights()[f"{self.embed_path}.weight"]
        rows: mx.array = table[x].astype(self.dtype)
        mx.eval(rows)
        return rows

    def layer_params(self, i: int) -> dict[str, Any]:
        prefix = self.prefixes[i]
        flat = self.tensors(lambda k: k.startswith(prefix) and k not in self.streamed)
        params: dict[str, Any] = tree_unflatten([(k[len(prefix) :], v) for k, v in flat.items()])
        return params

    def release_layer(self, i: int) -> None:
        self.layers[i].update(self.blank[i])
        mx.clear_cache()  # give its buffers back: the process, not MLX's cache, should hold one layer

    # -- passes ---------------------------------------------------------------------------------

    def through(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                seen: dict[int, list[mx.array]] | None = None, chunks: int = 1) -> Work:  # fmt: skip
        """A chunk through this rank's layers (each loaded for it, then let go), keeping each
        layer's input in ``seen``; one of ``chunks`` for the progress. Every layer gets the first
        layer's extra arguments (``first_layer_call``), as the model's loop gives them on sequences
        shorter than any sliding window."""

        def work(_: int, h: mx.array) -> mx.array:
            for i in self.share.layers:
                if seen is not None:
                    seen.setdefault(i, []).append(h)
                layer = self.layers[i]
                layer.update(self.layer_params(i))
                h = joined(self.in_pieces(layer, self.pieces(h), args, kwargs))
                self.release_layer(i)
                self.layer_done(1 / chunks)
            return h

        return work

    def pieces(self, h: mx.array) -> list[mx.array]:
        """The sequences of ``h`` that run through a layer together: whole sequences, at most
        ``pass_tokens`` tokens a piece (all of them where 0), so that a layer's activations stay
        bounded however many sequences the pass takes. A sequence's output does not depend on the
        others beside it."""
        count = h.shape[0]
        per = count if self.pass_tokens <= 0 else max(1, self.pass_tokens // h.shape[1])
        return [h[s : min(count, s + per)] for s in range(0, count, per)]

    def in_pieces(self, layer: Any, pieces: list[mx.array], args: tuple[Any, ...],
                  kwargs: dict[str, Any], after: Callable[[mx.array], None] = mx.eval
                  ) -> list[mx.array]:  # fmt: skip
        """``layer`` on each of ``pieces`` in turn, with ``after`` each output: it evaluates the
        output, and takes from the piece whatever else its caller needs. The outputs are the next
        layer's pieces. Each input is let go once it has run (``pieces`` is emptied), and the
        outputs are never joined, so that a pass holds about one copy of the layer's activations,
        not three (input, outputs, joined: 67 MB each at 8,192 tokens of width 2,048)."""
        outs = []
        while pieces:
            outs.append(layer(pieces.pop(0), *args, **kwargs))
            after(outs[-1])
        return outs

    def hidden_states(
        self,
        inputs: mx.array,
        finish: Callable[[slice, mx.array], None] | None = None,
        keep: bool = True,
    ) -> Hidden:
        """One streamed pass up the layers, pipelined over the ranks in chunks of sequences
        (ramserve/relay.py): each layer's input (where ``keep``), the last layer's output, and the
        extra arguments the model's loop passes every layer (mask, cache). Rank 0, which also gets
        the last layer's output, gives each chunk's to ``finish`` (its sequences, that output) as it
        comes back, with the head loaded (``outer``)."""
        share = self.share
        h, args, kwargs = self.first_layer_call(inputs)
        rows = chunk_rows(share, inputs.shape[0])
        seen: dict[int, list[mx.array]] | None = {} if keep else None
        back = (lambda c, out: finish(rows[c], out)) if finish else None
        with self.outer(head=True) if finish and share.first else contextlib.nullcontext():
            # on ranks after the first, their own output's shape stands in for the model's
            outs = ring(share, [h[r] for r in rows], self.through(args, kwargs, seen, len(rows)),
                        back)  # fmt: skip
        layers = [joined(seen.pop(i)) for i in share.layers] if seen else []
        return layers, joined(outs), args, kwargs

    def _until_stopped(self, inputs: mx.array, slots: list[_Slot], which: str) -> _Stop:
        """The model's call on ``inputs`` (embedding rows read, nothing else outside the layers
        beyond the norms) with ``slots`` in the layers' places, one of which stops it."""
        self.slots[:] = slots
        try:
            with self.outer(head=False) as (_, given):
                assert given is not None
                given._value = self.lookups(inputs) if self.share.first else \
                    mx.zeros((*inputs.shape, self.width), dtype=self.dtype)  # fmt: skip
                self.model(inputs)
            raise RuntimeError(f"the model's loop did not reach its {which} layer")
        except _Stop as stop:
            return stop
        finally:
            self.slots[:] = self.layers

    def first_layer_call(
        self, inputs: mx.array
    ) -> tuple[mx.array, tuple[Any, ...], dict[str, Any]]:
        """The first layer's input for ``inputs`` and the extra arguments the model's loop passes
        every layer (mask, cache), from a call that stops there; only the embedding rows are read."""

        def stop_at_first(h: mx.array, *args: Any, **kwargs: Any) -> mx.array:
            raise _Stop(h, args, kwargs)

        slots = [_Slot(layer, stop_at_first) for layer in self.layers]
        stop = self._until_stopped(inputs, slots, "first")
        return stop.h, stop.args, stop.kwargs

    def _head_only(self, h: mx.array) -> None:
        """Layers become pass-throughs except the last, which returns ``h``: the model's call then
        computes just the final norm and the head on ``h`` (and whatever the model does there)."""
        last = len(self.layers) - 1
        self.slots[:] = [_Slot(layer, lambda x, *a, _i=i, **k: h if _i == last else x)
                         for i, layer in enumerate(self.layers)]  # fmt: skip

    def head_inputs(self, inputs: mx.array, h: mx.array) -> mx.array:
        """The head's input for ``inputs`` whose last layer output ``h`` (the final norm of ``h``,
        or whatever the model does there), without the head's weight or its logits."""

        def stop(x: mx.array) -> mx.array:
            raise _Stop(x)

        self._head_only(h)
        try:
            with self.outer(head=False):  # the embedding gives zeros, which the layers pass by
                head = self.swap(self.head_path, stop)
                try:
                    self.model(inputs)
                finally:
                    self.swap(self.head_path, head)
            raise RuntimeError("the model's call did not reach its head")
        except _Stop as stopped:
            return stopped.h
        finally:
            self.slots[:] = self.layers

    def logits(self, inputs: mx.array, h: mx.array) -> mx.array:
        self._head_only(h)
        try:
            logits: mx.array = self.model(inputs).astype(mx.float32)
            return logits
        finally:
            self.slots[:] = self.layers


def require_streamable(source: Any) -> None:
    """Refuse, before any work, a model whose mlx-lm class the layer streaming cannot drive: its
    decoder layers must be a list the model's loop reads (``model.layers``), and its embedding and
    head must be found by the module kinds in configs."""
    try:
        StreamedModel(source, mx.float32)
    except (AttributeError, KeyError, ValueError, IndexError, TypeError) as e:
        raise BadModel(
            f"ramserve cannot analyse {source.name}: its architecture ({source.model_type}) does "
            f"not fit how ramserve drives mlx-lm's models ({e}); tested on {TESTED}"
        ) from e


def sampled_sequences(
    run: StreamedModel, count: int, length: int, sweeps: int, seed: int, start: int, vocab: int
) -> mx.array:
    """``count`` sequences of ``length`` tokens from ``sweeps`` parallel sampling sweeps, starting
    from random tokens after ``start``. A position's Gumbel noise is drawn from its own key, so every
    sweep sees the same noise without keeping it."""
    k_init, k_noise, _ = mx.random.split(mx.random.key(seed), 3)
    noise_keys = mx.random.split(k_noise, count)
    x = mx.random.randint(0, vocab, (count, length), key=k_init).astype(mx.int32)
    x[:, 0] = start

    def sweep(i: int, logits: mx.array) -> mx.array:
        noise = mx.random.gumbel(logits[:, :-1].shape, key=noise_keys[i])
        return mx.argmax(logits[:, :-1] + noise, axis=-1).astype(mx.int32)

    for _ in range(sweeps):
        tokens, _ = next_tokens(run, x, sweep, keep=False)
        if tokens is not None:
            x = mx.concatenate([x[:, :1], tokens], axis=1)
    return x


def jacobi_inputs(
    run: StreamedModel, count: int, length: int, sweeps: int, seed: int, start: int, vocab: int
) -> tuple[mx.array, mx.array | None, Hidden]:
    """Inputs from ``sweeps`` parallel sampling sweeps (``sampled_sequences``), labels sampled given
    them (None on ranks after the first), and the hidden states of the inputs (the pass that gave
    the labels; the backward pass needs them too)."""
    x = sampled_sequences(run, count, length, sweeps, seed, start, vocab)
    label_keys = mx.random.split(mx.random.split(mx.random.key(seed), 3)[2], count)

    def label(i: int, logits: mx.array) -> mx.array:
        return mx.random.categorical(logits, key=label_keys[i]).astype(mx.int32)

    labels, hidden = next_tokens(run, x, label)
    return x, labels, hidden


def next_tokens(
    run: StreamedModel, x: mx.array, pick: Callable[[int, mx.array], mx.array], keep: bool = True
) -> tuple[mx.array | None, Hidden]:
    """``pick(i, logits)`` for each sequence i of ``x``, as its chunk comes back from one streamed
    forward pass (one sequence's logits at a time: all of them at once would be the largest array
    of the pass), and that pass's hidden states (each layer's input only where ``keep``). On ranks
    after the first, which hold no head, no tokens: their passes never read tokens, only the shape
    of ``x`` (ramserve/relay.py)."""
    picked: list[mx.array] = []

    def finish(rows: slice, last: mx.array) -> None:
        for i in range(rows.start, rows.stop):
            j = i - rows.start
            picked.append(pick(i, run.logits(x[i : i + 1], last[j : j + 1])))
            mx.eval(picked[-1])

    hidden = run.hidden_states(x, finish, keep)
    return (mx.concatenate(picked) if run.share.first else None), hidden


def streamed_fisher(
    source: Any, cfg: FisherSettings, dtype: mx.Dtype, progress: bool, share: Share | None = None
) -> SelfFisher:
    """Per quantizable module, the diagonal of the Fisher of its weight per token (``FisherStat``);
    and, on the same sequences, the KL the quantized KV cache costs (``kv_damage``). Split over
    ranks (``share``), each rank's statistics are its own layers' (rank 0's also the embedding's and
    the head's, and the KV cache's KL)."""
    run = StreamedModel(source, dtype, share)
    share = run.share
    n, layers = cfg.sequences, len(share.layers)
    # every layer of the sweeps, of the labelling pass and of the backward pass
    bar = Bar((cfg.sweeps + 3) * layers, "self-Fisher", unit="layer", show=progress)
    run.layer_done = bar.update
    vocab = int(source.config["vocab_size"])
    x, labels, (seen, last, args, kwargs) = jacobi_inputs(
        run, n, cfg.tokens, cfg.sweeps, cfg.seed, start_token(source.config, vocab), vocab
    )
    kv = kv_damage(run, x, (seen, last, args, kwargs), KV_BITS)
    sums = Marginals({m.path: m.shape for m in source.modules})
    # on ranks after the first, the gradient from above comes by the relay (``last`` its shape)
    grads, head_rows = _head(run, x, labels, last, sums) if labels is not None else (last, [])
    grads = arrive_down(share, [grads])[0]
    for i in reversed(share.layers):
        grads = _layer(run, i, seen.pop(), grads, args, kwargs, sums)
        bar.update(1)
    grads = leave_down(share, [grads])[0]
    if share.first:
        _embedding(run, x, grads, head_rows, sums)
    bar.close()
    return SelfFisher(sums.stats(n * cfg.tokens), kv)


KV_BITS = (8, 4)


def kv_damage(run: StreamedModel, x: mx.array, hidden: Hidden, bits: tuple[int, ...]
              ) -> dict[str, float]:  # fmt: skip
    """The KL per token from the next-token distributions of the sampled sequences ``x`` with a
    16-bit KV cache (``hidden``: that pass) to those with every layer's keys and values stored in
    each of ``bits`` (MLX affine, 64-element groups, as ramserve/kvcache.py stores them)."""
    from mlx_lm.models.cache import QuantizedKVCache

    from .device import KV_GROUP_SIZE, kv_quantizable
    from .source import head_dim_of

    seen, last, args, kwargs = hidden
    if not kv_quantizable(head_dim_of(run.source.config)):
        return {}  # such a cache stays 16-bit (kvcache): nothing to measure
    share = run.share
    h = dict(zip(bits, arrive(share, [seen[0]] * len(bits)), strict=True))
    for i in share.layers:
        layer = run.layers[i]
        layer.update(run.layer_params(i))
        for b in bits:
            a, k = with_cache(args, kwargs, QuantizedKVCache(group_size=KV_GROUP_SIZE, bits=b))
            h[b] = layer(h[b], *a, **k)
            mx.eval(h[b])
        run.release_layer(i)
        run.layer_done(1)
    h = dict(zip(bits, leave(share, [h[b] for b in bits]), strict=True))
    if not share.first:  # the head is rank 0's
        return {}
    total = dict.fromkeys(bits, 0.0)
    with run.outer(head=True):
        for s in range(x.shape[0]):
            ref = nn.log_softmax(run.logits(x[s : s + 1], last[s : s + 1]), axis=-1)
            for b in bits:
                quantized = nn.log_softmax(run.logits(x[s : s + 1], h[b][s : s + 1]), axis=-1)
                kl = (mx.exp(ref) * (ref - quantized)).sum()
                total[b] += float(kl.item())
    return {str(b): total[b] / x.size for b in bits}


def _head(
    run: StreamedModel, x: mx.array, labels: mx.array, last: mx.array, sums: Marginals
) -> tuple[mx.array, list[mx.array]]:
    """Per sequence, the head's statistics and d(log-likelihood)/d(last hidden state); for a tied
    embedding also the head gradient's rows of the sequence's own tokens (sorted, as ``np.unique``
    gives them), the only rows its use as the embedding adds to (``_embedding`` completes the square)."""
    own_rows, out = [], []
    with run.outer(head=True) as (probe, _):
        assert probe is not None

        def loss(z: mx.array, h: mx.array, i: int) -> mx.array:
            probe._z = z
            logits = run.logits(x[i : i + 1], h)
            loss: mx.array = nn.losses.cross_entropy(logits, labels[i : i + 1], reduction="sum")
            return loss

        grad = mx.grad(loss, argnums=(0, 1))
        z = mx.zeros((1, x.shape[1], run.vocab_out), dtype=run.dtype)
        for i in range(x.shape[0]):
            delta, g_h = grad(z, last[i : i + 1], i)
            assert probe._x is not None
            inputs = probe._x[0]
            sums.add_product(run.head_path, delta[0], inputs)
            if run.tied:
                tokens = mx.array(np.unique(np.asarray(x[i])))
                own_rows.append(delta[0][:, tokens].T.astype(mx.float32) @ inputs)
            sums.eval()
            mx.eval(g_h, own_rows)
            out.append(g_h)
    return mx.concatenate(out), own_rows


class Probe:
    """Stands in for a linear module of a layer (``nn.Linear``, or mlx-lm's stacked experts, called
    with the expert of each row): keeps its input and adds ``z`` to its output, so the gradient with
    respect to ``z`` is the gradient at the module's output. With the input, that is all the weight's
    marginals need (``Marginals.add_product``); the weight's gradient is never formed."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.x: mx.array | None = None
        self.experts: mx.array | None = None
        self.z: mx.array | None = None
        self.shape: tuple[int, ...] = ()

    def __call__(self, x: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        y = self.inner(x, *args, **kwargs)
        self.x, self.shape = x, y.shape
        self.experts = args[0] if args else kwargs.get("indices")
        out: mx.array = y if self.z is None else y + self.z
        return out

    def rows(self) -> tuple[mx.array, mx.array | None]:
        """The inputs the module saw as rows (pairs, in) and, for stacked experts, the expert each
        row went to (pairs,): every output row of stacked experts is one (token, expert) pair."""
        assert self.x is not None
        if self.experts is None:
            return self.x.reshape(-1, self.x.shape[-1]), None
        pairs = self.shape[:-1]
        inputs = mx.broadcast_to(self.x, (*pairs, self.x.shape[-1]))
        experts = mx.broadcast_to(mx.expand_dims(self.experts, -1), pairs)
        return inputs.reshape(-1, inputs.shape[-1]), experts.reshape(-1)

    def token_rows(self) -> tuple[mx.array, mx.array, mx.array] | None:
        """For stacked experts that share each token's input (gate and up): the distinct input
        rows (tokens, in), and per (token, expert) pair its expert and its row. None for any other
        module, whose every output row has an input row of its own (``rows``)."""
        assert self.x is not None
        if self.experts is None:
            return None
        pairs, lead = self.shape[:-1], self.x.shape[:-1]
        distinct = math.prod(lead)
        if distinct == math.prod(pairs):
            return None
        row_of = mx.broadcast_to(mx.arange(distinct).reshape(lead), pairs)
        experts = mx.broadcast_to(mx.expand_dims(self.experts, -1), pairs)
        return self.x.reshape(distinct, -1), experts.reshape(-1), row_of.reshape(-1)

    def add_to(self, sums: Marginals, path: str, delta: mx.array, sequences: int) -> None:
        """The marginals of each sequence's weight gradient (a batch of ``sequences`` of them)."""
        assert self.x is not None
        if self.experts is None:
            for s in range(sequences):
                sums.add_product(path, delta[s], self.x[s])
            return
        inputs, experts = self.rows()  # stacked experts: one sequence
        sums.add_product(path, delta.reshape(-1, delta.shape[-1]), inputs, experts)


def expert_matmul(x: mx.array, weight: mx.array | ExpertBytes, indices: mx.array) -> mx.array:
    """``mx.gather_mm(x, weightᵀ, rhs_indices=indices)`` (mlx-lm's stacked experts), computed as one
    BLAS product per expert over the rows routed to it: MLX's CPU ``gather_mm`` runs about one row at
    a time on one thread (about 2 GFLOP/s), which made an MoE layer's streamed pass cost ~10x a dense
    layer's per byte. Each expert's weight is widened to ``x``'s dtype when used (the layer keeps
    them as stored, ``StreamedModel.stored``, or reads each from the checkpoint, ``ExpertBytes``) and
    let go after its product, under ``mx.grad`` too: the gradients are the function's own
    (``_ExpertRouting.vjp``), so the backward pass never holds every expert's widened weight, as
    MLX's own tape would (the self-Fisher's MoE layer: 600 MB at Qwen3-30B's widths with 32 experts).
    A weight read from the checkpoint gets no gradient (no pass asks for one). The routing is read
    on the host."""
    routing = _ExpertRouting(x, indices, weight.shape[0])
    primals = (x, weight) if isinstance(weight, mx.array) else (x,)

    @mx.custom_function
    def product(*args: mx.array) -> mx.array:
        return routing.forward(args[0], weight)

    @product.vjp
    def _(args: Any, cotangent: mx.array, _out: mx.array) -> tuple[mx.array, ...]:
        given = args if isinstance(args, (list, tuple)) else [args]  # one primal comes bare
        return routing.vjp(given[0], weight, cotangent)[: len(given)]

    out = product(*primals)
    assert isinstance(out, mx.array)
    return out.reshape(*routing.lead, routing.m, weight.shape[1])


def _detached(a: mx.array) -> mx.array:
    """``a``'s values with no graph behind them. Under ``mx.grad`` MLX keeps every array an
    evaluated one was made from (the tape), so a loop of per-expert products would hold each
    expert's widened weight to the end; a copy by way of NumPy (CPU only) lets them go."""
    return mx.array(np.asarray(a))


class _ExpertRouting:
    """Which rows of ``x`` each expert multiplies, grouped by expert: every (pair, row) of the output
    reads a row of ``x``, which a token's experts may share (gate and up see each token once)."""

    def __init__(self, x: mx.array, indices: mx.array, experts: int) -> None:
        self.lead, (self.m, self.k) = indices.shape, x.shape[-2:]
        # each (pair, row)'s row of x, gathered once in the experts' order, never broadcast first
        distinct = np.arange(math.prod(x.shape[:-1])).reshape(x.shape[:-1])
        source_rows = np.broadcast_to(distinct, (*self.lead, self.m)).reshape(-1)
        routed = np.repeat(np.asarray(indices).reshape(-1), self.m)
        order = np.argsort(routed, kind="stable")
        self.rows = mx.array(source_rows[order])
        self.order = mx.array(order)
        self.back = mx.array(np.argsort(order))  # the pairs' own order from the experts'
        counts = np.bincount(routed, minlength=experts)
        ends = np.cumsum(counts)
        self.spans = [
            (int(e), int(ends[e] - counts[e]), int(ends[e])) for e in np.nonzero(counts)[0]
        ]

    def forward(self, x: mx.array, weight: mx.array | ExpertBytes) -> mx.array:
        # each expert's rows gathered when it runs: all the pairs' rows at once would be the
        # tokens' rows times the experts a token has (67 MB for 1,024 tokens at Qwen3-30B's widths)
        flat = _detached(x).reshape(-1, self.k)
        parts = []
        for e, start, end in self.spans:
            parts.append(flat[self.rows[start:end]] @ weight[e].astype(x.dtype).T)
            # each product now: MLX would otherwise make every expert's widened copy of its weight
            # before the first product runs (Qwen3-30B's widths: 200 MB a projection at 32 experts)
            mx.eval(parts[-1])
        out = mx.concatenate(parts)
        mx.eval(out)
        del parts  # before the pairs are put back in order: two copies of them at a time, not three
        out = out[self.back]
        mx.eval(out)  # with no graph: it was made from ``x``'s values alone
        return out

    def vjp(self, x: mx.array, weight: mx.array | ExpertBytes, cotangent: mx.array
            ) -> tuple[mx.array, ...]:  # fmt: skip
        """The gradients with respect to ``x`` (computed now, expert by expert) and ``weight``
        (left lazy: the passes never ask for it, and MLX then never computes it)."""
        grads = _detached(cotangent.reshape(-1, weight.shape[1])[self.order])
        rows = []
        for e, start, end in self.spans:
            rows.append(_detached(grads[start:end] @ weight[e].astype(x.dtype)))
        flat = x.reshape(-1, self.k)
        g_x = mx.zeros(flat.shape, x.dtype).at[self.rows].add(mx.concatenate(rows))
        if not isinstance(weight, mx.array):
            return (g_x.reshape(x.shape),)
        picked = flat[self.rows]
        g_w = mx.zeros(weight.shape, x.dtype)
        for e, start, end in self.spans:
            g_w = g_w.at[e].add(grads[start:end].T @ picked[start:end])
        return g_x.reshape(x.shape), g_w.astype(weight.dtype)


@functools.cache
def _blas_switch_class() -> type:
    from mlx_lm.models.switch_layers import SwitchLinear

    class BlasSwitchLinear(SwitchLinear):
        """mlx-lm's stacked experts, multiplied per expert by BLAS (``expert_matmul``)."""

        def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False
                     ) -> mx.array:  # fmt: skip
            out = expert_matmul(x, getattr(self, "streamed", None) or self["weight"], indices)
            if "bias" in self:
                out = out + mx.expand_dims(self["bias"][indices], -2)
            return out

    return BlasSwitchLinear


@functools.cache
def _unsorted_glu_class() -> type:
    from mlx_lm.models.switch_layers import SwitchGLU

    class UnsortedSwitchGLU(SwitchGLU):
        """mlx-lm's gated experts without its sort of the (token, expert) pairs by expert, which
        serves ``gather_mm`` on Metal: ``expert_matmul`` groups the pairs itself. Unsorted, gate and
        up read each token's row (broadcast over its experts), not a copy per pair, so a probe sees
        the tokens' rows (``Probe.token_rows``). The same outputs, the pairs in another order."""

        def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
            x = mx.expand_dims(x, (-2, -3))
            indices = mx.stop_gradient(indices)
            up, gate = self.up_proj(x, indices), self.gate_proj(x, indices)
            out: mx.array = self.down_proj(self.activation(up, gate), indices)
            return out.squeeze(-2)

    return UnsortedSwitchGLU


def probed_types() -> tuple[type, ...]:
    """The modules a probe can stand in for: maps of their input, rows routed to experts or not."""
    from mlx_lm.models.switch_layers import SwitchLinear

    return (nn.Linear, SwitchLinear)


def probe_modules(run: StreamedModel, i: int) -> tuple[dict[str, Probe], dict[str, Any]]:
    """The layer's quantizable modules: linear ones wrapped in probes (keyed by module path), the
    rest by path under the layer (their weight gradients are taken as they are)."""
    prefix = run.prefixes[i]
    modules = dict(run.layers[i].named_modules())
    probes, others = {}, {}
    for path in run.quantizable.values():
        if not path.startswith(prefix):
            continue
        module = modules[path[len(prefix) :]]
        if isinstance(module, probed_types()):
            probes[path] = Probe(module)
        else:
            others[path] = module
    return probes, others


def _layer(
    run: StreamedModel,
    i: int,
    inputs: mx.array,
    upstream: mx.array,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    sums: Marginals,
) -> mx.array:
    """Layer i run again under ``mx.grad`` with the gradient from above: its modules' statistics from
    probes at their outputs (every sequence at once, unless a module needs its own weight gradient
    per sequence or routes rows to experts), and the gradient with respect to its input."""
    layer, prefix = run.layers[i], run.prefixes[i]
    layer.update(run.layer_params(i))
    probes, others = probe_modules(run, i)
    weights = {p[len(prefix) :] + ".weight": m.weight for p, m in others.items()}
    swapped = [(p, run.swap(p, probe)) for p, probe in probes.items()]

    def project(w: dict[str, mx.array], zs: list[mx.array], h: mx.array, g: mx.array) -> mx.array:
        layer.update(tree_unflatten(list(w.items())), strict=False)
        for probe, z in zip(probes.values(), zs, strict=True):
            probe.z = z
        total: mx.array = (layer(h, *args, **kwargs) * g).sum()
        return total

    def zeros_at_outputs(h: mx.array) -> list[mx.array]:
        for probe in probes.values():
            probe.z = None
        layer(h, *args, **kwargs)  # the probes see their inputs' and outputs' shapes; nothing runs
        return [mx.zeros(p.shape, dtype=run.dtype) for p in probes.values()]

    grad = mx.grad(project, argnums=(0, 1, 2))
    step = inputs.shape[0]
    zeros_at_outputs(inputs)
    if others or any(p.experts is not None or p.x is None or p.x.shape[0] != step
                     for p in probes.values()):  # fmt: skip
        step = 1
    out = []
    try:
        for s in range(0, inputs.shape[0], step):
            h, g = inputs[s : s + step], upstream[s : s + step]
            zs = zeros_at_outputs(h)
            g_w, g_zs, g_h = grad(weights, zs, h, g)
            mx.eval(g_h)
            for (path, probe), delta in zip(probes.items(), g_zs, strict=True):
                probe.add_to(sums, path, delta, h.shape[0])
                sums.eval()
            for key, gw in g_w.items():
                path = prefix + key.removesuffix(".weight")
                sums.add(path, gw)
                mx.eval(sums.rows[path], sums.cols[path])
            out.append(g_h)
    finally:
        for path, module in reversed(swapped):
            run.swap(path, module)
        run.release_layer(i)
    return mx.concatenate(out)


def _embedding(
    run: StreamedModel,
    x: mx.array,
    upstream: mx.array,
    head_rows: list[mx.array],
    sums: Marginals,
) -> None:
    """The embedding's statistics from the gradient at its output (its lookup values stand in, so
    the table is not loaded): a row's gradient is the sum over the positions holding that token."""

    def stop_at_first(h: mx.array, *a: Any, **k: Any) -> mx.array:
        raise _Stop(h)

    lookups = run.lookups(x)
    run.slots[:] = [_Slot(layer, stop_at_first) for layer in run.layers]
    try:
        with run.outer(head=False) as (_, given):
            assert given is not None

            def project(e: mx.array, tokens: mx.array, g: mx.array) -> mx.array:
                given._value = e
                try:
                    run.model(tokens)
                except _Stop as stop:
                    return (stop.h * g).sum()
                raise RuntimeError("the model's loop did not reach its first layer")

            grad = mx.grad(project)
            for s in range(x.shape[0]):
                g = grad(lookups[s : s + 1], x[s : s + 1], upstream[s : s + 1])[0]
                tokens, where = np.unique(np.asarray(x[s]), return_inverse=True)
                per_token = mx.zeros((tokens.size, g.shape[-1])).at[mx.array(where)].add(g)
                counted = head_rows[s] if head_rows else mx.zeros_like(per_token)
                sums.add_rows(run.embed_path, mx.array(tokens), per_token, counted)
                sums.eval()
    finally:
        run.slots[:] = run.layers


def start_token(config: dict[str, Any], vocab: int) -> int:
    for key in ("bos_token_id", "eos_token_id"):
        value = config.get(key)
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value < vocab:
            return value
    return 0


def peak_bytes(source: Any, cfg: FisherSettings, dtype: mx.Dtype) -> int:
    """What the streamed pass holds at its peak: the largest of the layers and the rest (norms,
    embedding, head) with its gradients, every layer's saved input, and one sequence's logits."""
    from .source import layer_index

    units: dict[int | None, int] = {}
    for key, shape in source.tensor_shapes.items():
        layer = layer_index(key)  # None: outside the layers
        units[layer] = units.get(layer, 0) + math.prod(shape)
    width = int(source.config.get("hidden_size") or 0)
    vocab = int(source.config.get("vocab_size") or 0)
    saved = cfg.sequences * cfg.tokens * width * (len(units) + 3)
    return int(
        2 * max(units.values()) * dtype.size + saved * dtype.size + 4 * cfg.tokens * vocab * 4
    )


@dataclass
class SelfFisher:
    stats: dict[str, FisherStat]  # per quantizable module
    kv_damage: dict[str, float]  # per KV precision ("8", "4"): KL per token against 16-bit KV


def fisher_fits(source: Any, cfg: FisherSettings, available: int) -> bool:
    """Whether the streamed pass fits in the configured share of ``available`` bytes."""
    from .device import runtime_dtype

    dtype = getattr(mx, runtime_dtype(source.float_dtype))
    return peak_bytes(source, cfg, dtype) <= cfg.memory_share * available


def self_fisher(source: Any, cfg: FisherSettings, progress: bool,
                share: Share | None = None, fits: bool | None = None) -> SelfFisher | None:  # fmt: skip
    """The Fisher statistics of every quantizable module (of this rank's ``share``) and the KV
    precisions' damage, or None when even the streamed pass would not fit in the configured share of
    free memory (the profile then uses the energy flow); split over ranks, rank 0 decides that for
    all (``fits``)."""
    import psutil

    from .device import runtime_dtype

    dtype = getattr(mx, runtime_dtype(source.float_dtype))
    if not (fits if fits is not None else
            fisher_fits(source, cfg, psutil.virtual_memory().available)):  # fmt: skip
        return None
    result = streamed_fisher(source, cfg, dtype, progress, share)
    mx.clear_cache()
    return result
