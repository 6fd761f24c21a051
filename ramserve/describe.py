"""What ``ramserve inspect`` shows: a model's architecture, size, shards, fingerprint and quantizable
modules, and for a folder ramserve quantized, its plan."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .fmt import human_bytes, human_count, table
from .plan import histogram, rounding_label
from .records import Plan
from .source import Source


def describe(source: Source) -> dict[str, Any]:
    """What ``ramserve inspect`` shows: architecture, size, shards, fingerprint, modules by kind."""
    kinds: dict[str, dict[str, Any]] = {}
    for m in source.modules:
        entry = kinds.setdefault(m.kind, {"count": 0, "params": 0, "no_group_size": []})
        entry["count"] += 1
        entry["params"] += m.numel
        if not m.group_sizes:
            entry["no_group_size"].append(m.path)
    plan = _folder_plan(source)
    params = plan["parameters"] if plan else source.parameter_count
    return {
        "plan": plan,
        "name": source.name,
        "path": str(source.path),
        "model_type": source.model_type,
        "architectures": source.config.get("architectures", []),
        "parameters": params,
        "bf16_bytes": 2 * params,
        "tied_embeddings": source.tied_embeddings,
        "shards": [
            {"name": s.name, "bytes": s.size, "tensors": len(s.tensors)} for s in source.shards
        ],
        "fingerprint": source.fingerprint,
        "quantized": source.quantization is not None,
        "quantizable_modules": len(source.modules),
        "stacked_expert_modules": sum(1 for m in source.modules if m.kind.startswith("expert_")),
        "experts_per_module": source.config.get("num_experts")
        or source.config.get("n_routed_experts"),
        "modules_by_kind": kinds,
        "modules": [
            {
                "path": m.path,
                "kind": m.kind,
                "shape": list(m.shape),
                "group_sizes": list(m.group_sizes),
            }
            for m in source.modules
        ],
    }


def _folder_plan(source: Source) -> dict[str, Any] | None:
    """The plan of a folder ramserve quantized (its plan.json), summarised."""
    plan = Plan.in_folder(source.path) if source.quantization is not None else None
    if plan is None:
        return None
    return {"budget": asdict(plan.budget), "total_bytes": plan.total_bytes, "hash": plan.hash,
            "parameters": plan.parameters,
            "bits_per_weight": plan.bits_per_weight, "source_fingerprint": plan.fingerprint,
            "predicted_damage": plan.predicted_damage, "rounding": plan.rounding,
            "histogram": [{"choice": c, "modules": a, "bytes": b} for c, a, b in histogram(plan)]}  # fmt: skip


def render_description(d: dict[str, Any]) -> str:
    lines = [
        f"{d['name']}  ({d['model_type']}, {', '.join(d['architectures']) or '?'})",
        f"  path          {d['path']}",
        f"  parameters    {human_count(d['parameters'])} ({d['parameters']:,})",
        f"  bf16 size     {human_bytes(d['bf16_bytes'])}",
        f"  shards        {len(d['shards'])} ({human_bytes(sum(s['bytes'] for s in d['shards']))})",
        f"  fingerprint   {d['fingerprint']}",
        f"  tied embed.   {'yes' if d['tied_embeddings'] else 'no'}",
        f"  quantizable   {d['quantizable_modules']} modules",
    ]
    if plan := d["plan"]:
        mix = ", ".join(f"{h['choice']}: {100 * h['bytes']:.0f}%" for h in plan["histogram"])
        lines += [
            f"  quantized     by ramserve, plan {plan['hash']} for budget {plan['budget']['spec']}"
            f" ({plan['bits_per_weight']:.3f} bits per weight, {plan['total_bytes']:,} bytes)",
            f"  bit mix       {mix} (share of weights)",
            f"  rounding      {rounding_label(plan['rounding'])}",
        ]
    elif d["quantized"]:
        lines.append("  quantized     yes (not by ramserve)")
    if d["stacked_expert_modules"]:
        lines.append(
            f"  experts       {d['stacked_expert_modules']} stacked expert modules"
            f" ({d['experts_per_module']} experts each)"
        )
    lines.append("")
    rows = [
        (kind, e["count"], human_count(e["params"]), len(e["no_group_size"]) or "")
        for kind, e in d["modules_by_kind"].items()
    ]
    lines.append(table(["kind", "modules", "params", "no group size"], rows))
    for _kind, e in d["modules_by_kind"].items():
        for path in e["no_group_size"]:
            lines.append(f"  {path}: last dimension not divisible by 32/64/128; stays 16-bit")
    return "\n".join(lines)
