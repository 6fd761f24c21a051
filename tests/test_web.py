"""The web page at ``/``, driven in a real headless Chromium (Debian's, through Playwright) against a
real `ramserve run` of the shared dense model: chat, stop, variant swap, the fit, the X-ray, the key."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import DENSE, REPO, TEST_CONFIG, shared_model
from .factory import TOOLS_TEMPLATE, make_model
from .serving import metric, open_page, ramserve_run, run_env, serve_folder, wait_for

SCREENSHOTS = REPO / "docs" / "screenshots"
# A stated memory, so that `ramserve budget` in the test and the server plan for the same machine
# (the budget's "available now" moves from one reading to the next).
MEMORY = "[budget]\nmemory_gb = 16\n"
SHAPE = ["--context", "2048", "--parallel", "2", "--kv-bits", "16"]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("web") / "home"
    home.mkdir()
    (home / "config.toml").write_text(TEST_CONFIG + MEMORY)
    return home


@pytest.fixture(scope="module")
def served(home: Path) -> Iterator[str]:
    """`ramserve run` of the shared dense model at 30% of its size, with a stated memory."""
    model = str(shared_model(DENSE))
    with ramserve_run(model, "--budget", "30%", *SHAPE, env=run_env(home)) as (base, _):
        yield base


def test_the_xray_tells_homogeneous_sensitivity_from_a_few_sensitive_modules(profile_cache) -> None:
    from ramserve.server.web import xray

    profile = profile_cache(shared_model(DENSE))
    n = len(profile.modules)
    alike = replace(profile, modules=[replace(m, importance=1.0 + 0.1 * (i % 3))
                                      for i, m in enumerate(profile.modules)])  # fmt: skip
    few = replace(profile, modules=[replace(m, importance=50.0 if i in (3, 11) else 1.0)
                                    for i, m in enumerate(profile.modules)])  # fmt: skip
    flat, peaked = xray(alike), xray(few)
    assert flat["stand_out"] == [] and len(flat["modules"]) == n
    assert peaked["stand_out"] == [profile.modules[3].path, profile.modules[11].path]
    assert flat["decades"] < 0.1 < 1.5 < peaked["decades"]
    real = xray(profile)  # the shared model: its head and a few early modules stand out
    assert real["stand_out"] and real["max"] > 4 * real["median"]
    assert all(m["damage_4bit"] is not None for m in real["modules"] if m["kind"] != "router")


def test_the_memory_bar_adds_up_to_the_machine(profile_cache) -> None:
    from ramserve.budget import weight_budget
    from ramserve.server.web import memory_bar
    from ramserve.settings import load_settings
    from ramserve.source import open_source

    budget = weight_budget(open_source(str(shared_model(DENSE)), load_settings()), context=1024)
    bar = {s["label"]: s["bytes"] for s in memory_bar(budget, None)}
    assert sum(bar.values()) == budget.machine.total
    assert bar["weights"] == budget.weights and "free" not in bar  # no plan: the whole budget
    assert bar.get("unusable", 0) == budget.machine.total - bar["OS reserve"] - budget.usable


def reply_text(page: Any) -> str:
    return str(page.locator("#messages .msg.assistant .content").last.text_content())


def send(page: Any, text: str, *, temperature: str = "0", max_tokens: str = "24") -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#prompt", text)
    page.keyboard.press("Enter")  # in the prompt: Enter sends


def wait_idle(page: Any, timeout: float = 120_000) -> None:
    page.wait_for_function("document.querySelector('#stop').disabled", timeout=timeout)


def test_the_page_loads_and_a_reply_streams_in(browser: Any, served: str) -> None:
    assert httpx.head(f"{served}/").status_code == 200  # Ollama's clients' heartbeat
    page = open_page(browser, served)
    assert "ramserve" in page.title()
    assert page.locator("#model option").count() >= 2  # the model and its variants
    assert page.locator("#model").input_value() == "code-qwen3-30m"
    page.click("#new-chat")
    send(page, "def fibonacci(n):", max_tokens="48")
    # Mid-stream: part of the reply is shown while the Stop button is still live.
    page.wait_for_function("""() => {
        const c = [...document.querySelectorAll('#messages .msg.assistant .content')].pop();
        return c && c.textContent.length > 0 && !document.querySelector('#stop').disabled; }""",
                           timeout=60_000)  # fmt: skip
    partial = reply_text(page)
    wait_idle(page)
    final = reply_text(page)
    assert final.startswith(partial) and len(final) > len(partial)
    # The same greedy request through the API gives the text the page showed.
    api = httpx.post(f"{served}/v1/chat/completions", timeout=60, json={
        "model": "code-qwen3-30m", "temperature": 0, "max_tokens": 48,
        "messages": [{"role": "user", "content": "def fibonacci(n):"}]}).json()  # fmt: skip
    assert final == api["choices"][0]["message"]["content"]
    assert "48 tokens" in str(page.locator("#messages .msg.assistant .meta").last.text_content())
    # The conversation is kept in the browser: a reload shows it again.
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert reply_text(page) == final
    assert page.errors == []


def test_stop_cancels_the_request_and_frees_the_slot(browser: Any, served: str) -> None:
    page = open_page(browser, served)
    cancelled = metric(served, "generations_finished_total", '{reason="cancelled"}')
    for _ in range(5):  # sampled: a reply may end on its own before it is stopped; then again
        page.click("#new-chat")
        send(page, "class Parser:", temperature="1", max_tokens="1500")
        # decoding, and the live line shows it (it polls /status every 3 s), or the reply ended
        page.wait_for_function("""() => document.querySelector('#stop').disabled
            || document.querySelector('#live-active').textContent === '1/2'""", timeout=60_000)  # fmt: skip
        live = page.locator("#live-active").text_content() == "1/2"
        if live and metric(served, "active_sequences") == 1:
            break
        wait_idle(page)
    assert metric(served, "active_sequences") == 1
    assert page.locator("#live-active").text_content() == "1/2"
    page.click("#stop")
    assert wait_for(lambda: metric(served, "active_sequences") == 0, timeout=20)
    assert metric(served, "generations_finished_total", '{reason="cancelled"}') == cancelled + 1
    wait_idle(page)
    assert "stopped" in str(page.locator("#messages .msg.assistant .meta").last.text_content())
    assert page.locator("#send").is_enabled()


def test_the_memory_bar_shows_what_ramserve_budget_prints(
    browser: Any, served: str, home: Path
) -> None:
    cmd = [sys.executable, "-m", "ramserve.cli", "budget", str(DENSE), *SHAPE, "--json", "-q"]
    done = subprocess.run(cmd, env=run_env(home), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    budget = json.loads(done.stdout)
    lines = {ln["label"]: ln["bytes"] for ln in budget["lines"]}
    page = open_page(browser, served)
    page.click("#tab-fit")
    page.wait_for_selector("#memory-bar .seg")
    shown = {r.get_attribute("data-label"): int(r.get_attribute("data-bytes"))
             for r in page.locator("#budget-lines tbody tr").all()}  # fmt: skip
    assert shown == lines
    bar = {s.get_attribute("data-label"): int(s.get_attribute("data-bytes"))
           for s in page.locator("#memory-bar .seg").all()}  # fmt: skip
    assert bar["OS reserve"] == lines["OS reserve"]
    assert bar["runtime"] == lines["runtime"] and bar["KV cache"] == lines["KV cache"]
    assert bar["weights"] + bar["free"] == lines["weights"]
    assert sum(bar.values()) == lines["total memory"] == 16 * 2**30
    total = page.locator("#memory-legend [data-bytes]").first.get_attribute("data-bytes")
    assert int(str(total)) == lines["total memory"]


def test_the_bit_map_has_one_cell_per_quantized_module(browser: Any, served: str) -> None:
    folder = Path(httpx.get(f"{served}/status").json()["folder"])
    plan = json.loads((folder / "plan.json").read_text())
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    quantized = {k.removesuffix(".scales") for k in index if k.endswith(".scales")}
    assert set(plan["choices"]) == quantized  # at 30% every module is quantized
    page = open_page(browser, served)
    page.click("#tab-fit")
    page.wait_for_selector("#bitmap .cell")
    cells = page.locator("#bitmap .cell").all()
    assert {c.get_attribute("data-path") for c in cells} == quantized and len(cells) == len(
        quantized
    )
    for c in cells:
        choice = plan["choices"][c.get_attribute("data-path")]
        assert int(str(c.get_attribute("data-bits"))) == choice["bits"]
        assert f"group size {choice['group_size']}" in str(c.get_attribute("title"))
    shares = page.locator("#histogram .row").count()
    assert shares == len({(c["bits"], c["group_size"]) for c in plan["choices"].values()})
    loaded = page.locator("#variants tr[aria-current=true]").first.get_attribute("data-id")
    assert loaded == "code-qwen3-30m"


def test_the_xray_draws_every_module_and_says_which_stand_out(browser: Any, served: str) -> None:
    fit = httpx.get(f"{served}/fit").json()
    page = open_page(browser, served)
    page.click("#tab-xray")
    page.wait_for_selector("#xray-map .cell")
    assert page.locator("#xray-map .cell").count() == len(fit["xray"]["modules"])
    verdict = page.locator("#xray-verdict")
    assert int(str(verdict.get_attribute("data-stand-out"))) == len(fit["xray"]["stand_out"])
    assert page.locator("#xray-curve svg polyline").count() == 1
    # the damage view colours the same cells by another measure
    first = page.locator("#xray-map .cell").first.get_attribute("data-value")
    page.select_option("#xray-measure", "damage_4bit")
    assert page.locator("#xray-map .cell").first.get_attribute("data-value") != first


def test_screenshots_of_every_view_in_light_and_dark(browser: Any, served: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    backgrounds = {}
    for scheme in ("light", "dark"):
        page = open_page(browser, served, scheme)
        page.click("#new-chat")
        send(page, "def quicksort(items):", max_tokens="40")
        wait_idle(page)
        for view in ("chat", "fit", "xray"):
            page.click(f"#tab-{view}")
            if view != "chat":
                page.wait_for_selector(f"#{view} .cell")
            path = SCREENSHOTS / f"{view}-{scheme}.png"
            page.screenshot(path=str(path), full_page=view != "chat")
            assert path.stat().st_size > 10_000
        backgrounds[scheme] = page.evaluate("getComputedStyle(document.body).backgroundColor")
        # keyboard: the tabs move with the arrow keys
        page.focus("#tab-xray")
        page.keyboard.press("ArrowRight")
        assert page.locator("#tab-chat").get_attribute("aria-selected") == "true"
        assert page.errors == []
    assert backgrounds["light"] != backgrounds["dark"]


def test_switching_to_a_variant_shows_the_swap_and_replies_from_it(
    browser: Any, served: str
) -> None:
    page = open_page(browser, served)
    page.click("#new-chat")
    page.select_option("#model", "code-qwen3-30m@min-safe")
    assert "not loaded" in str(page.locator("#model-note").text_content())
    send(page, "import os", max_tokens="8")
    page.wait_for_selector("#swap", state="visible", timeout=10_000)
    wait_idle(page, timeout=300_000)
    assert page.locator("#swap").is_hidden()
    assert page.locator("#chat-error").is_hidden()
    meta = str(page.locator("#messages .msg.assistant .meta").last.text_content())
    assert "code-qwen3-30m@min-safe" in meta and "8 tokens" in meta
    cards = {m["id"]: m["status"] for m in httpx.get(f"{served}/v1/models").json()["data"]}
    assert cards["code-qwen3-30m@min-safe"] == "loaded"
    page.click("#tab-fit")
    page.wait_for_selector("#bitmap .cell")
    row = page.locator("#variants tr[aria-current=true]").first
    assert row.get_attribute("data-id") == "code-qwen3-30m@min-safe"
    assert re.search(r"min-safe", str(page.locator("#plan-summary").text_content()))


def test_the_page_asks_for_the_api_key_once(browser: Any, served_dense: Path) -> None:
    with serve_folder(served_dense, "code-qwen3-30m", api_key="sesame") as base:
        assert httpx.get(f"{base}/").status_code == 200  # the page itself needs no key
        assert httpx.get(f"{base}/fit").status_code == 401
        page = browser.new_page()
        page.goto(f"{base}/")
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong")
        page.click("#key-save")
        page.wait_for_selector("#key-dialog[open]")  # refused: asked again
        assert "refused" in str(page.locator("#key-why").text_content())
        page.fill("#key-input", "sesame")
        page.click("#key-save")
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator("#model option").count() == 1
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert not page.locator("#key-dialog").is_visible()
        # served with `ramserve serve`: the plan's bit map, and no fit to show
        page.click("#tab-fit")
        page.wait_for_selector("#bitmap .cell")
        assert "ramserve serve" in str(page.locator("#runtime-shape").text_content())


def test_reasoning_is_folded_away(browser: Any, tmp_path: Path) -> None:
    """A model whose template opens <think> for the answer: what it writes comes as
    reasoning_content, which the page shows folded (a closed <details>) above the answer."""
    thinking = TOOLS_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                      "<|im_start|>assistant\n<think>\n{% endif %}")  # fmt: skip
    folder = make_model(tmp_path / "thinker", chat_template=thinking,
                        extra_special=("<think>", "</think>"))  # fmt: skip
    with serve_folder(folder, "tiny", parallel=1, queue_size=1) as base:
        page = open_page(browser, base)
        send(page, "hi", max_tokens="12")
        wait_idle(page)
        reply = page.locator("#messages .msg.assistant").last
        fold = reply.locator("details")
        assert fold.count() == 1 and fold.get_attribute("open") is None
        assert str(fold.locator(".reasoning").text_content()).strip()
        assert not fold.locator(".reasoning").is_visible()  # folded until opened
        fold.locator("summary").click()
        assert fold.locator(".reasoning").is_visible()
        assert page.errors == []
