from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ramserve.settings import load_settings

from .factory import make_model

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DENSE = REPO / "models" / "code-qwen3-30m"  # in the repo: every clone has it
MOE = SHARED / "models" / "code-qwen3moe-27m"
EVAL_TEXT = REPO / "models" / "data" / "code-eval-64k.txt"


def shared_model(path: Path) -> Path:
    """A shared fixture: in CI its absence is a failure, elsewhere a skip."""
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"missing shared fixture {path}")
        pytest.skip(f"missing shared fixture {path}")
    return path


# Compensated rounding samples its own inputs with forward passes over 32 x 256 tokens by default,
# about 20 s per quantization of a shared model on this CPU; tests check what it does, not how well
# (bench/quality.py does), so their RAMSERVE_HOME samples 4 x 64 tokens, with fewer sweeps of descent
# and rounds of scales than the defaults (every path still runs). A test that writes its own
# config.toml adds to this one (``user_config``).
TEST_CONFIG = "[rounding]\nsequences = 4\ntokens = 64\ndescent_sweeps = 2\nscale_rounds = 1\n"


def user_config(home: Path, text: str) -> None:
    """Write ``home``'s config.toml: the tests' own settings, then ``text``."""
    (home / "config.toml").write_text(TEST_CONFIG + text)


@pytest.fixture(autouse=True)
def ramserve_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(TEST_CONFIG)
    monkeypatch.setenv("RAMSERVE_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return home


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3", "qwen3")


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-moe", "qwen3_moe")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama", hidden=96)


@pytest.fixture
def dense() -> Path:
    return shared_model(DENSE)


@pytest.fixture
def moe() -> Path:
    return shared_model(MOE)


@pytest.fixture(scope="session")
def profile_cache(tmp_path_factory: pytest.TempPathFactory):
    """Profiles computed once per session (the analysis is deterministic), keyed by model path."""
    from ramserve.profile import analyze
    from ramserve.source import open_source

    home = tmp_path_factory.mktemp("profiles-home")
    memo: dict[str, dict] = {}

    def get(model: Path) -> dict:
        key = str(model)
        if key not in memo:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("RAMSERVE_HOME", str(home))
                memo[key] = analyze(open_source(key, load_settings()), progress=False)
        return memo[key]

    return get


@pytest.fixture(scope="session")
def served_dense(profile_cache, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared dense model quantized to 30% of its bf16 size, once per session, for servers."""
    from ramserve.plan import make_plan
    from ramserve.quantize import quantize
    from ramserve.source import open_source

    src = open_source(str(shared_model(DENSE)), load_settings())
    plan = make_plan(profile_cache(DENSE), "30%", settings=load_settings())
    out, _ = quantize(src, plan, tmp_path_factory.mktemp("served") / "model", progress=False)
    return out


@pytest.fixture(scope="module")
def base(served_dense: Path) -> Any:
    """A real server of the shared dense model (8 slots, 16 waiting), per test module."""
    from .serving import serve_folder

    with serve_folder(served_dense, "code-qwen3-30m", parallel=8, queue_size=16) as url:
        yield url


@pytest.fixture(scope="session")
def thinker(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model's tokenizer with <think> markers and the Hermes tool format."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    from .factory import TOOLS_TEMPLATE

    folder = make_model(tmp_path_factory.mktemp("think") / "m", chat_template=TOOLS_TEMPLATE,
                        extra_special=("<think>", "</think>"))  # fmt: skip
    tok = load_tokenizer(Path(folder))
    assert tok.has_thinking and tok.has_tool_calling
    return tok


CHROMIUM = Path("/usr/bin/chromium")
# Chromium as root on a machine without a network: no sandbox, and none of its background calls.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
         "--disable-component-update", "--no-first-run"]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        message = f"no Chromium at {CHROMIUM} (Debian's chromium package; .ci/run installs it)"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from playwright.sync_api import sync_playwright

    # The OpenBLAS the tests preload (Makefile's FAST) breaks Playwright's driver and Chromium's
    # GPU process: they start without it (a child copies the environment when it starts).
    preload = {k: os.environ.pop(k) for k in ("LD_PRELOAD", "LD_LIBRARY_PATH") if k in os.environ}
    try:
        p = sync_playwright().start()
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
    finally:
        os.environ.update(preload)
    yield b
    b.close()
    p.stop()
