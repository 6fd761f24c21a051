"""The web page at ``/``: its static files (``ramserve/web/``, in the wheel) and the JSON it draws.

The page is plain HTML, CSS and JavaScript: no build step, nothing fetched from another host. It
reads ``/v1/models`` (the variant picker), ``/v1/chat/completions`` (chat), ``/status`` (live state,
a swap's progress) and ``GET /fit``, assembled here: the memory breakdown ``ramserve budget`` prints
(the fit's own ``Budget``), the loaded plan's bit map and histogram, the variants' sizes and
predicted damage, and the profile's X-ray.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from ..budget import Budget
from ..plan import histogram, rounding_label
from ..profile import STAND_OUT, standing_out
from ..records import Plan, Profile
from .registry import Registry

PAGE = Path(__file__).resolve().parent.parent / "web"


def memory_bar(budget: Budget, weights: int | None) -> list[dict[str, Any]]:
    """The machine's memory as the bar draws it, left to right; every number one of the budget's
    lines (``ramserve budget``), the weight budget split into the loaded weights (``weights``
    bytes; None: none loaded, the whole budget) and what is left."""
    line = {ln.label: ln for ln in budget.lines}
    reserve = line["OS reserve"].bytes
    # memory other programs hold now, or past MLX's working-set limit: where that bound the budget
    unusable = budget.machine.total - reserve - budget.usable
    weights = budget.weights if weights is None else weights
    bar = [
        ("OS reserve", reserve, line["OS reserve"].why),
        ("unusable", unusable, line["usable"].why),
        ("runtime", budget.runtime, line["runtime"].why),
        ("KV cache", budget.kv, line["KV cache"].why),
        ("weights", weights, "the loaded plan's weights in memory"),
        ("free", budget.weights - weights, "the weight budget the plan leaves unused"),
    ]
    return [{"label": label, "bytes": n, "why": why} for label, n, why in bar if n > 0]


def plan_view(plan: Plan) -> dict[str, Any]:
    modules = [{"path": path, "layer": c.layer, "kind": c.kind, "bits": c.bits,
                "group_size": c.group_size, "bytes": c.bytes, "label": c.label}
               for path, c in plan.choices.items()]  # fmt: skip
    return {"spec": plan.budget.spec, "hash": plan.hash, "bits_per_weight": plan.bits_per_weight,
            "total_bytes": plan.total_bytes, "memory_bytes": plan.memory_bytes,
            "predicted_damage": plan.predicted_damage, "rounding": rounding_label(plan.rounding),
            "modules": modules,
            "histogram": [{"choice": k, "modules": n, "weight": w} for k, n, w in histogram(plan)]}  # fmt: skip


def xray(profile: Profile) -> dict[str, Any]:
    """Per module its importance and the damage 4-bit g64 would cost it; the spread of importance
    (a model whose modules matter alike spans little, one with a few sensitive modules a lot) and
    the modules that stand out."""
    modules = []
    for m in profile.modules:
        o = m.option(4, 64) or m.option(4, 32)
        modules.append({"path": m.path, "layer": m.layer, "kind": m.kind,
                        "importance": m.importance, "damage_4bit": o.damage if o else None})  # fmt: skip
    ranked = sorted(m.importance for m in profile.modules)
    if not ranked:
        return {"estimator": profile.estimator, "modules": [], "median": 0.0, "spread_p90_p10": 1.0,
                "stand_out": []}  # fmt: skip
    median, stand_out = standing_out(profile)

    def at(q: float) -> float:
        return ranked[min(len(ranked) - 1, int(q * len(ranked)))]

    floor = max(ranked[0], 1e-30)
    return {"estimator": profile.estimator, "modules": modules, "median": median,
            "min": ranked[0], "max": ranked[-1],
            "decades": math.log10(max(ranked[-1], floor) / floor),
            "spread_p90_p10": at(0.9) / max(at(0.1), 1e-30),
            "stand_out": [m.path for m in stand_out],
            "stand_out_factor": STAND_OUT}  # fmt: skip


def variants_view(registry: Registry) -> list[dict[str, Any]]:
    keep = ("id", "status", "budget", "weight_bytes", "memory_bytes", "bits_per_weight",
            "predicted_damage")  # fmt: skip
    return [{k: card.get(k) for k in keep} for card in registry.cards()]


def fit_view(registry: Registry) -> dict[str, Any]:
    """Everything the page's fit and X-ray views draw (``GET /fit``)."""
    plan, fitted = registry.loaded_plan(), registry.how_fitted()
    weights = plan.memory_bytes if plan else None
    return {
        "model": registry.name,
        "loaded": registry.loaded_id,
        "budget": fitted.budget.to_json() if fitted else None,
        "memory_bar": memory_bar(fitted.budget, weights) if fitted else None,
        "hosts": [
            {
                "rank": p.rank,
                "host": p.host,
                "layers": list(p.layers),
                "budget": p.budget.to_json(),
                "memory_bar": memory_bar(p.budget, p.memory_bytes),
            }
            for p in registry.host_parts()
        ],
        "plan": plan_view(plan) if plan else None,
        "variants": variants_view(registry),
        "xray": xray(fitted.profile) if fitted else None,
    }


class Page:
    """The page's routes: the page itself (no key: it asks for one) and its JSON."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    async def index(self, request: Request) -> Response:
        # HEAD / too: Ollama's clients check that a server is up with it before anything else.
        return FileResponse(PAGE / "index.html", headers={"Cache-Control": "no-cache"})

    async def fit(self, request: Request) -> Response:
        return JSONResponse(fit_view(self.registry))
