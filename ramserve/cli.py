"""The ``ramserve`` command: parses arguments, calls the stage modules, prints. No logic lives here."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import RamserveError
from .settings import ServerSettings, Settings, load_settings

if TYPE_CHECKING:
    from .budget import Ask

Handler = Callable[[argparse.Namespace], int]


def _emit(data: Any, as_json: bool, render: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=1) if as_json else render(data))


def cmd_inspect(a: argparse.Namespace) -> int:
    from .describe import describe, render_description
    from .source import open_source

    _emit(describe(open_source(a.model, a.settings)), a.json, render_description)
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from .profile import analyze, render_report, summary
    from .source import open_source

    profile = analyze(open_source(a.model, a.settings), force=a.force, progress=not a.quiet)
    if a.report:
        print(render_report(profile))
    else:
        _emit(summary(profile), a.json, lambda s: "\n".join(f"{k:18} {v}" for k, v in s.items()))
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .fit import plan_for
    from .plan import plot_plan, render_plan
    from .source import open_source

    if a.hosts:
        return _hosts_view(a, plan_view=True)
    if not a.budget:
        raise RamserveError("plan needs --budget (or --hosts: each host's budget)")
    plan = plan_for(
        open_source(a.model, a.settings), a.budget, a.quiet, allow_unsafe=a.allow_unsafe
    )
    if a.output:
        plan.write(Path(a.output))
    if a.plot:
        plot_plan(plan, Path(a.plot))
    _emit(plan.to_json() if a.json else plan, a.json, render_plan)
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .fit import plan_for
    from .plan import load_plan
    from .quantize import quantize, rounding_line
    from .source import open_source

    source = open_source(a.model, a.settings)
    plan = load_plan(Path(a.plan)) if a.plan else plan_for(source, a.budget, a.quiet)
    folder, cached = quantize(
        source, plan, Path(a.output) if a.output else None, progress=not a.quiet
    )
    print(
        f"{folder}  ({'cached' if cached else 'written'}; {plan.bits_per_weight:.3f} bits per "
        f"weight, {plan.total_bytes:,} bytes)"
    )
    if line := rounding_line(folder):
        print(line)
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import evaluate, recipe_quantization, render_scores
    from .fit import plan_for
    from .plan import load_plan
    from .source import open_source

    quantization, quantizer, label, rounding = None, None, None, None
    if a.plan or a.budget:
        plan = (
            load_plan(Path(a.plan))
            if a.plan
            else plan_for(open_source(a.model, a.settings), a.budget, a.quiet)
        )
        quantization, quantizer, rounding = plan.quantization, plan.quantizer, plan.rounding
        label = f"ramserve@{plan.budget.spec}"
    elif a.recipe:
        quantization, label = (
            recipe_quantization(open_source(a.model, a.settings), a.recipe),
            a.recipe,
        )
    scores = evaluate(a.model, Path(a.text), a.settings, reference=a.reference, quantization=quantization,
                      quantizer=quantizer, rounding=rounding, label=label, seq_len=a.seq_len, samples=a.samples,
                      batch_size=a.batch_size, kv_bits=a.kv_bits, progress=not a.quiet)  # fmt: skip
    _emit(scores.to_json() if a.json else scores, a.json, render_scores)
    return 0


def cmd_budget(a: argparse.Namespace) -> int:
    from .budget import render_budget
    from .fmt import table

    if a.hosts and a.model:
        return _hosts_view(a, plan_view=False)
    if a.devices or not a.model:
        rows = [(name, f"{d.memory_gb:g} GiB", f"{d.working_set_share or 1:.2f}")
                for name, d in a.settings.devices.items()]  # fmt: skip
        print(table(["device", "memory", "GPU share"], rows))
        return 0
    from .fit import fitted_budget
    from .source import open_source

    b = fitted_budget(open_source(a.model, a.settings), ask_of(a), progress=not a.quiet)
    _emit(b.to_json(), a.json, render_budget)
    return 0


def _hosts_view(a: argparse.Namespace, *, plan_view: bool) -> int:
    """``plan --hosts`` and ``budget --hosts``: the split over several machines, per host."""
    from pathlib import Path

    from .hosts import read_hostfile, render_host_budgets, render_split, split_for
    from .profile import analyze
    from .source import open_source

    source = open_source(a.model, a.settings)
    hosts = read_hostfile(Path(a.hosts))
    profile = analyze(source, progress=not a.quiet)
    done = split_for(source, profile, hosts, ask_of(a), getattr(a, "budget", None) or "auto")
    if plan_view and getattr(a, "output", None):
        done.plan.write(Path(a.output))
    data = done.to_json()
    _emit(data, a.json, render_split if plan_view else render_host_budgets)
    return 0


def cmd_pipeline(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline import run_greedy

    bounds = [int(b) for b in a.bounds.split(",")]
    done = run_greedy(Path(a.model), bounds, a.prompt, a.tokens, a.settings.kinds)
    print(json.dumps(done), flush=True)
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .plan import served_name
    from .server import serve
    from .server.registry import Registry
    from .source import open_source

    source = open_source(a.model, a.settings)
    registry = Registry(source.path, a.name or served_name(source), a.settings,
                        {"context": a.context, "parallel": a.parallel,
                         "kv_bits": a.kv_bits or 16})  # fmt: skip
    serve(registry, a.settings.server, host=a.host, port=a.port, api_key=api_key(a),
          allow_origin=a.allow_origin)  # fmt: skip
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from .fit import fit, hub_precheck, render_fit
    from .server import serve
    from .source import open_source
    from .variants import VariantRegistry

    cfg = a.settings.server
    if a.hosts:
        return _run_on_hosts(a)
    hub_precheck(a.model, a.settings, ask_of(a))
    fitted = fit(open_source(a.model, a.settings), a.budget, ask_of(a), progress=not a.quiet)
    print(render_fit(fitted), flush=True)
    registry = VariantRegistry(fitted, a.settings, fitted.engine_args(), any_budget=a.any_budget)
    serve(registry, cfg, host=a.host, port=a.port, api_key=api_key(a), allow_origin=a.allow_origin)
    return 0


def _run_on_hosts(a: argparse.Namespace) -> int:
    """``run --hosts``: start one rank per host under mlx.launch, or be one of them."""
    import os
    import sys
    from pathlib import Path

    from .cluster import RanksRegistry, follow, launch, under_launch
    from .server import serve

    hostfile = Path(a.hosts)
    others = [] if under_launch() else launch(hostfile, a.settings, sys.argv[1:])
    if os.environ["MLX_RANK"] != "0":
        return follow(a.model, hostfile, a.settings)
    registry = RanksRegistry(a.model, hostfile, a.settings, ask_of(a), budget=a.budget,
                             any_budget=a.any_budget, progress=not a.quiet)  # fmt: skip
    try:
        serve(registry, a.settings.server, host=a.host, port=a.port, api_key=api_key(a),
              allow_origin=a.allow_origin)  # fmt: skip
    finally:
        for rank in others:
            rank.terminate()
    return 0


def ask_of(a: argparse.Namespace) -> Ask:
    """What the command line fixed of the runtime."""
    from .budget import Ask

    return Ask(a.context, a.parallel, a.kv_bits, getattr(a, "device", None))


def api_key(a: argparse.Namespace) -> str | None:
    import os

    return a.api_key or os.environ.get("RAMSERVE_API_KEY") or None


def add_server_options(s: argparse.ArgumentParser, cfg: ServerSettings) -> None:
    s.add_argument("--host", default=cfg.host, help="listen address (default: loopback only)")
    s.add_argument("--port", type=int, default=cfg.port)
    s.add_argument("--api-key", help="require this bearer key (or set RAMSERVE_API_KEY)")
    s.add_argument(
        "--allow-origin", action="append", help="enable CORS for this origin (repeatable)"
    )
    s.add_argument("--context", type=int, help="tokens per sequence (default: the model's maximum)")
    s.add_argument("--parallel", type=int, help="sequences decoding at once")
    add_kv_bits(s)


def kv_bits(value: str) -> int | None:
    """``--kv-bits``: 16, 8 or 4, or auto (None: the fit decides)."""
    if value == "auto":
        return None
    if value not in ("16", "8", "4"):
        raise argparse.ArgumentTypeError(f"{value!r} is not auto, 16, 8 or 4")
    return int(value)


def sample_count(value: str) -> int | None:
    """``--samples``: how many sequences to spread over the text, or all (None: every window)."""
    return None if value == "all" else int(value)


def add_kv_bits(s: argparse.ArgumentParser) -> None:
    s.add_argument("--kv-bits", type=kv_bits, default=None, metavar="auto|16|8|4",
                   help="the KV cache's precision (default auto: 16-bit unless fewer bits are "
                   "needed to fit; `serve` takes auto as 16)")  # fmt: skip


def add_hosts(s: argparse.ArgumentParser) -> None:
    s.add_argument("--hosts", metavar="HOSTS.json",
                   help="split the model over these machines (mlx.launch's hostfile; a host's "
                   '"memory_gb" states its memory)')  # fmt: skip


def add_rounding(s: argparse.ArgumentParser, settings: Settings) -> None:
    s.add_argument("--rounding", choices=["nearest", "compensated"], default=None,
                   help="how codes are rounded: compensated (each column's error corrected in the "
                   "columns after it, from inputs the model samples itself) or to nearest (default "
                   f"{settings.rounding.method})")  # fmt: skip


def cmd_ls(a: argparse.Namespace) -> int:
    from .cache import entries, render_entries, usage

    data = {"entries": [e.to_json() for e in entries()], "total": usage(a.settings.cache).to_json()}
    _emit(data, a.json, lambda d: render_entries(d["entries"], d["total"]))
    return 0


def cmd_rm(a: argparse.Namespace) -> int:
    from .cache import CacheError, remove, select

    found = select(a.model)
    if not found:
        raise CacheError(f"nothing cached matches {a.model!r}; `ramserve ls` lists what is")
    removed = remove(found)
    kept = [e for e in found if e not in removed]
    _report_removed(removed, a.json, kept, a.settings)
    if kept:
        raise CacheError(", ".join(e.label for e in kept) + " is in use by a running ramserve; "
                         "stop it first (`ramserve ps` shows what runs)")  # fmt: skip
    return 0


def cmd_prune(a: argparse.Namespace) -> int:
    from .cache import GB, prune

    keep = a.keep_gb if a.keep_gb is not None else a.settings.cache.max_gb
    _report_removed(prune(int(keep * GB)), a.json, [], a.settings)
    return 0


def _report_removed(removed: list[Any], as_json: bool, kept: list[Any], settings: Settings) -> None:
    from .cache import render_removed, usage

    data = {"removed": [e.to_json() for e in removed], "in_use": [e.to_json() for e in kept],
            "total": usage(settings.cache).to_json()}  # fmt: skip
    _emit(data, as_json, render_removed)


def cmd_ps(a: argparse.Namespace) -> int:
    from .status import default_urls, probe, render_status

    servers = probe(a.url or default_urls(a.settings.server), api_key(a))
    _emit(servers, a.json, render_status)
    return 0


def cmd_service(a: argparse.Namespace) -> int:
    from . import service

    if a.action == "install":
        options = []
        for flag in ("budget", "context", "parallel", "kv_bits", "host", "port"):
            if (value := getattr(a, flag)) is not None:
                options += [f"--{flag.replace('_', '-')}", str(value)]
        done = service.install(a.model, options, dry_run=a.dry_run)
        if a.dry_run:
            print(done["plist"])
        print(("would write " if a.dry_run else "wrote ") + done["path"])
        for cmd in done["commands"]:
            print(("would run: " if a.dry_run else "ran: ") + " ".join(cmd))
    elif a.action == "uninstall":
        done = service.uninstall(purge=a.purge, dry_run=a.dry_run)
        for cmd in done["commands"]:
            print(("would run: " if a.dry_run else "ran: ") + " ".join(cmd))
        print(("would remove: " if a.dry_run else "removed: ") + ", ".join(done["removes"]))
    elif a.action == "status":
        _emit(
            service.status(a.settings.server),
            a.json,
            lambda d: "\n".join(f"{k:16} {v}" for k, v in d.items()),
        )
    else:
        service.follow_logs(service.log_files(), a.lines, a.follow)
    return 0


def build_parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ramserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("inspect", help="describe a model without loading it")
    s.add_argument("model", help="local folder or Hugging Face repo id (org/name[@revision])")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("analyze", help="data-free sensitivity profile (cached)")
    s.add_argument("model")
    s.add_argument("--json", action="store_true")
    s.add_argument("--force", action="store_true", help="recompute even if cached")
    s.add_argument("--report", action="store_true", help="print the model X-ray")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_analyze)

    s = sub.add_parser("plan", help="choose the per-module quantization for a budget")
    s.add_argument("model")
    s.add_argument(
        "--budget",
        help="6GB, 5.5GiB, 800MB, 4.5bpw, 30%%, min-safe, max, or a named device",
    )
    s.add_argument("--allow-unsafe", action="store_true", help="lift the safety floor")
    add_hosts(s)
    s.add_argument("--context", type=int, help="with --hosts: tokens per sequence")
    s.add_argument("--parallel", type=int, help="with --hosts: concurrent sequences")
    add_kv_bits(s)
    s.add_argument("-o", "--output", help="write plan.json here")
    s.add_argument("--plot", help="draw the per-layer bit map into this PNG")
    add_rounding(s, settings)
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_plan)

    s = sub.add_parser("quantize", help="write the quantized model for a plan (cached)")
    s.add_argument("model")
    how = s.add_mutually_exclusive_group(required=True)
    how.add_argument("--plan", help="a plan.json from `ramserve plan -o`")
    how.add_argument("--budget", help="plan for this budget first")
    s.add_argument("-o", "--output", help="output folder (default: the cache)")
    add_rounding(s, settings)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity on a text, and KL divergence from a reference")
    s.add_argument("model", help="a model folder (quantized or not) or repo id")
    s.add_argument("--text", required=True, help="a UTF-8 text file to score")
    s.add_argument("--reference", help="the model to measure KL from (e.g. the bf16 source)")
    how = s.add_mutually_exclusive_group()
    how.add_argument("--plan", help="simulate this plan.json's quantization on the float model")
    how.add_argument("--budget", help="plan for this budget, then simulate it")
    how.add_argument("--recipe", help="simulate a fixed recipe: uniform-4g64, mixed_3_6, ...")
    add_rounding(s, settings)
    s.add_argument("--seq-len", type=int, default=512, help="tokens per sequence")
    s.add_argument("--samples", type=sample_count, default=48, metavar="N|all",
                   help="sequences, spread over the text (all: every window of it)")  # fmt: skip
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--kv-bits", type=kv_bits, default=None, metavar="16|8|4",
                   help="score with the KV cache stored in this many bits")  # fmt: skip
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("budget", help="how much memory the weights may use on this machine")
    s.add_argument(
        "model", nargs="?", help="the model (its KV cache and min-safe plan are counted)"
    )
    s.add_argument("--context", type=int, help="tokens per sequence (default from configs/)")
    s.add_argument("--parallel", type=int, help="concurrent sequences (default from configs/)")
    s.add_argument("--device", help="a named device instead of this machine")
    add_kv_bits(s)
    s.add_argument("--devices", action="store_true", help="list the named devices")
    add_hosts(s)
    s.add_argument("--json", action="store_true")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(func=cmd_budget)

    s = sub.add_parser("serve", help="serve a (quantized) model folder through the OpenAI API")
    s.add_argument("model", help="a model folder (e.g. from `ramserve quantize`) or repo id")
    s.add_argument("--name", help="the model id clients use (default: the model's name)")
    add_server_options(s, settings.server)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run", help="fit a model to this machine and serve it (all stages cached)")
    s.add_argument("model", help="local folder or Hugging Face repo id (org/name[@revision])")
    s.add_argument(
        "--budget", default="auto", help="auto (this machine), or any budget `plan` takes"
    )
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    s.add_argument("--any-budget", action="store_true",
                   help="let clients ask for any name@budget (each new one is quantized and cached)")  # fmt: skip
    add_rounding(s, settings)
    add_server_options(s, settings.server)
    add_hosts(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("pipeline", help="one rank of a model split over machines, under "
                       "mlx.launch: greedy tokens as a JSON line")  # fmt: skip
    s.add_argument("model", help="an mlx-lm model folder (e.g. from `ramserve quantize`)")
    s.add_argument("--bounds", required=True,
                   help="the cut points: 0,3,7 gives rank 0 layers 0-2, rank 1 layers 3-6")  # fmt: skip
    s.add_argument("--prompt", default="def main():")
    s.add_argument("--tokens", type=int, default=16)
    s.set_defaults(func=cmd_pipeline)

    s = sub.add_parser("ls", help="list the cache: profiles and quantized models")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ls)

    s = sub.add_parser("rm", help="remove a model's cached profile and variants, or one variant")
    s.add_argument(
        "model", help="MODEL (name or fingerprint) or MODEL@BUDGET (budget or plan hash)"
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_rm)

    s = sub.add_parser("prune", help="evict least recently used entries (and crashed runs' files)")
    s.add_argument("--keep-gb", type=float, help="keep at most this much (default: [cache] max_gb)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_prune)

    s = sub.add_parser("ps", help="what running servers hold: model, memory, requests")
    s.add_argument("--url", action="append", help="a server's base URL (default: the configured "
                   "port and the service's)")  # fmt: skip
    s.add_argument("--api-key", help="the server's key (or set RAMSERVE_API_KEY)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("service", help="run ramserve as a launchd agent (macOS)")
    acts = s.add_subparsers(dest="action", required=True)
    i = acts.add_parser("install", help="save the run options and (re)load the agent")
    i.add_argument("model", nargs="?", help="omit to reinstall from the saved settings")
    i.add_argument("--budget")
    i.add_argument("--context", type=int)
    i.add_argument("--parallel", type=int)
    add_kv_bits(i)
    i.add_argument("--host")
    i.add_argument("--port", type=int)
    i.add_argument("--dry-run", action="store_true", help="print the plist and commands only")
    u = acts.add_parser("uninstall", help="stop and remove the agent (settings and logs stay)")
    u.add_argument("--purge", action="store_true", help="also remove the saved settings and logs")
    u.add_argument("--dry-run", action="store_true")
    st = acts.add_parser("status", help="launchd's view and a /health probe")
    st.add_argument("--json", action="store_true")
    lg = acts.add_parser("logs", help="print the agent's logs")
    lg.add_argument("-n", "--lines", type=int, default=50)
    lg.add_argument("-f", "--follow", action="store_true")
    s.set_defaults(func=cmd_service)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # the program itself, not a call from Python
        from .process import restart_tuned

        restart_tuned()
    try:
        settings = load_settings()  # the one read: every stage is given it (docs/architecture.md)
        args = build_parser(settings).parse_args(argv)
        if getattr(args, "rounding", None):
            rounding = settings.rounding.model_copy(update={"method": args.rounding})
            settings = settings.model_copy(update={"rounding": rounding})
        args.settings = settings
        func: Handler = args.func
        return func(args)
    except RamserveError as e:
        print(f"ramserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ramserve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
