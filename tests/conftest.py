"""Shared fixtures: offline hub, the zoo, and the browser harness."""
import os, sys
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:  # property tests: random exploration on a developer's machine, a fixed (reproducible) set of examples in CI
    from hypothesis import settings as _hyp
    _hyp.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI") == "true": _hyp.load_profile("ci")
except ImportError: pass


def _browser_required():
    # in CI (and in tests/run.sh) a missing chromium is a failure, not a skip
    return os.environ.get("CI") == "true" or os.environ.get("ALIGNLAB_REQUIRE_BROWSER") == "1"


@pytest.fixture(scope="session")
def tiny_llama():
    from alignlab import zoo
    return zoo.get("tiny-llama")


@pytest.fixture(scope="session")
def tok(tiny_llama):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture()
def page():
    """A Playwright page in headless system Chromium."""
    from alignlab.browser import chromium_path, browser_page
    if not chromium_path():
        if _browser_required(): pytest.fail("chromium is not installed (apt-get install chromium)")
        pytest.skip("chromium is not installed")
    pytest.importorskip("playwright")
    with browser_page() as p: yield p


@pytest.fixture()
def serve_app():
    """serve_app(source) -> URL of the Panel app served by `panel serve` on 127.0.0.1."""
    from contextlib import ExitStack
    from alignlab.browser import serve_panel
    with ExitStack() as stack:
        yield lambda src: stack.enter_context(serve_panel(src))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for one module (tiny models run fastest so, and its float checks were measured so), restored after
    it: set at import time instead, one thread would hold for every later module of the pytest process."""
    import torch
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
