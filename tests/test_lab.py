"""Every widget in JupyterLab, for real: a JupyterLab server on 127.0.0.1 (token auth, a temp dir), a notebook that builds
the widget opened in headless Chromium, its cell run, the widget drawn, one interaction, and the kernel's answer seen twice:
the widget redraws from Python, and a second cell prints the widget's Python-side state.

Every widget alignlab ships is in WIDGETS (the token inspector, the attention view, the patch view, the review app); a new one
adds one `Widget(...)`. The kernels get no `PANEL_INLINE` and there is no network: each widget loads Panel's JS inline itself
(`alignlab.widgets.panel_extension`), or it is not drawn. Runtime: one JupyterLab for the module (about 10 s to start), then
per widget a kernel start, its imports and the clicks: about 30-40 s each on the 2-core machine.
"""
import re
from dataclasses import dataclass, field
from typing import Callable
import pytest


@dataclass
class Widget:
    name: str            # what the reader calls it
    notebook: str        # where it is documented (nbs/...)
    build: str           # a notebook cell whose last expression is the widget (displayed by JupyterLab)
    ready: str           # text the drawn widget shows: it rendered
    interact: Callable   # interact(output_area): one interaction (a toggle, a click)
    probe: Callable      # probe(output_area) -> str: what the widget shows; it must change after `interact`
    check: str           # a second cell, run after the interaction: prints the widget's state as Python sees it
    expect: str          # ... and that print contains this: the click reached the kernel
    timeout: float = 180  # seconds for `build` (kernel start, imports, zoo)


def _summary(out):
    return out.locator(".summary").first.inner_text()


def _click_patch(out, row, col, s=2):
    """Click the centre of output cell (row, col) of the patch view's s×s grid: the plot's frame is the canvas' left square (the
    colour bar sits right of it). Bokeh reads two clicks within its double-tap interval as one double tap: wait 0.7 s first."""
    canvas = out.locator("canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    out.page.wait_for_timeout(700)
    out.page.mouse.click(box["x"] + (col + 0.5) * box["height"] / s, box["y"] + (row + 0.5) * box["height"] / s)


def _rate_b(out):
    "Type a reviewer's name (the app refuses a nameless rating), then 'B is better': a line in the ratings file, and the next prompt."
    out.get_by_placeholder("your name").first.fill("ana")
    out.page.wait_for_timeout(500)
    out.get_by_role("button", name="B is better").first.click()


WIDGETS = [
    Widget(
        name="token inspector",
        notebook="nbs/12_inspect_tokens.ipynb",
        build=("from transformers import AutoTokenizer\n"
               "from alignlab import zoo\n"
               "from alignlab.inspect.tokens import token_inspector, _records\n"
               "tok = AutoTokenizer.from_pretrained(zoo.get('tiny-llama'))\n"
               "app = token_inspector(_records(zoo.get('chat')/'val.jsonl')[:5], tok)\n"
               "app"),
        ready="carry loss",
        # Bokeh's checkbox is a bare <input> beside its text (no <label>, no accessible name): the first checkbox is
        # only_answer_loss, and `check` proves it was that one
        interact=lambda out: out.get_by_role("checkbox").first.click(),
        probe=_summary,  # "80 tokens, 14 carry loss; ..." -> more tokens carry loss once every turn does
        check="print('only_answer_loss =', app[2][0].value)",
        expect="only_answer_loss = False",
    ),
    Widget(
        name="attention view",
        notebook="nbs/17d_attention_view.ipynb",
        build=("from alignlab.models import load_model\n"
               "from alignlab.rag_records import DOC_SEP_INIT, rag_record\n"
               "from alignlab.attention_view import attention_view\n"
               "model, tok = load_model({'model_path': 'tiny-llama', 'model_type': 'causal', 'transformers_settings': {'dtype': 'float32'}},\n"
               "                        embeddings_initialization_strategy=DOC_SEP_INIT)\n"
               "rec = rag_record('Where does Ardone live?', ['Bisa lives in Kolu.', 'Ardone lives in Tamemo.', 'Cemo keeps a frog.'],\n"
               "                 'Ardone lives in Tamemo.', id='demo')\n"
               "view = attention_view(rec, model, tok)\n"
               "view"),
        ready="Attention over documents",
        # the first <select> is the layer (then head, document): pick layer 2; the heatmap is redrawn by the kernel
        interact=lambda out: out.locator("select").first.select_option("2"),
        probe=lambda out: out.locator(".tokens-heatmap").first.get_attribute("data-layer"),  # "mean" -> "2"
        check="print('layer =', view[2][0].value)",
        expect="layer = 2",
    ),
    Widget(
        name="patch view",
        notebook="nbs/18h_patch_view.ipynb",
        build="from alignlab.patch_view import demo_view\nv = demo_view('c_abs')\nv",
        ready="embedding 0 of 4",
        interact=lambda out: _click_patch(out, 1, 1),  # bottom right of the 2x2 output grid: embedding 3
        probe=lambda out: out.locator(".patch-detail").first.get_attribute("data-output"),  # "0" -> "3"
        check="print('embedding =', v[2][0][1].value)",  # the embedding picker, set by the click on the plot
        expect="embedding = 3",
    ),
    Widget(
        name="review app",
        notebook="nbs/19b_review_app.ipynb",
        build=("import tempfile\n"
               "from alignlab.review import demo_runs\n"
               "from alignlab.review_app import ReviewApp\n"
               "app = ReviewApp(demo_runs(), ratings_dir=tempfile.mkdtemp())\n"
               "app"),
        ready="prompt(s) pass the filters",
        interact=_rate_b,
        probe=lambda out: out.locator(".rv-count").first.inner_text(),  # "1 of 8 ..." -> "2 of 8 ...": rated, moved on
        check="print('ratings:', [(r['reviewer'], r['winner']) for r in app.store.ratings()])",  # read back from the ratings file
        expect="ratings: [('ana', 'b')]",
    ),
]


@pytest.fixture(scope="module")
def lab():
    import importlib.util, os
    if importlib.util.find_spec("jupyterlab") is None:  # a dev requirement: in CI (tests/run.sh) missing is a failure
        if os.environ.get("CI") == "true" or os.environ.get("ALIGNLAB_REQUIRE_BROWSER") == "1": pytest.fail("jupyterlab is not installed")
        pytest.skip("jupyterlab is not installed (pip install -e '.[dev]')")
    from alignlab.lab import serve_jupyterlab
    # no PANEL_INLINE for the kernels, as in a user's JupyterLab: each widget must load Panel's JS inline itself (offline here)
    with serve_jupyterlab(panel_inline=False) as server: yield server


@pytest.mark.parametrize("w", WIDGETS, ids=[w.name.replace(" ", "_") for w in WIDGETS])
def test_widget_renders_and_answers_through_the_kernel(w, lab, page, tmp_path):
    from playwright.sync_api import expect
    from alignlab.lab import write_notebook, open_notebook, run_cell
    name = re.sub(r"\W+", "_", w.name) + ".ipynb"
    write_notebook(lab.root/name, [w.build, w.check])
    try:
        open_notebook(page, lab, name)
        out = run_cell(page, 0, timeout=w.timeout)
        expect(out.get_by_text(w.ready).first).to_be_visible(timeout=60000)  # the widget is drawn by Panel's JS
        before = w.probe(out)
        w.interact(out)
        for _ in range(60):  # the kernel recomputes the view and sends it back
            if w.probe(out) != before: break
            page.wait_for_timeout(500)
        assert w.probe(out) != before, f"{w.name}: the view did not change after the interaction ({before!r})"
        said = run_cell(page, 1).inner_text()
        assert w.expect in said, f"{w.name}: the kernel says {said!r}, expected {w.expect!r}"
    except Exception:
        page.screenshot(path=str(tmp_path/"lab.png"))
        print(f"screenshot: {tmp_path/'lab.png'}\nJupyterLab log:\n{lab.log_tail()}")
        raise
