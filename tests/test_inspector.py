"""The token inspector, served by `panel serve` and driven in headless Chromium; and its static export."""
import re
import pytest

APP = """
from transformers import AutoTokenizer
from alignlab import zoo
from alignlab.inspect.tokens import token_inspector, _records
tok = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
recs = _records(zoo.get("chat") / "val.jsonl")[:10]
token_inspector(recs, tok).servable()
"""


def n_loss(text): return int(re.search(r"(\d+) carry loss", text).group(1))


def text_when(locator, pred, timeout=30.0):
    """The locator's text once `pred` holds: Panel replaces the pane's DOM on every update, so read until it settles."""
    import time
    t, s = time.time(), ""
    while time.time() - t < timeout:
        try: s = locator.first.inner_text(timeout=2000)
        except Exception: s = ""
        if pred(s): return s
        time.sleep(0.2)
    raise AssertionError(f"timed out; last text: {s!r}")


def test_inspector_mask_changes_live_in_chromium(serve_app, page, tiny_llama):
    from playwright.sync_api import expect
    page.goto(serve_app(APP))
    summary = page.locator(".summary")
    before = text_when(summary, lambda s: "carry loss" in s)
    assert n_loss(before) > 0
    expect(page.locator(".tok.loss")).to_have_count(n_loss(before))
    boxes = page.locator("input[type=checkbox]")  # Bokeh's checkbox: <input> followed by its label <div>
    names = [boxes.nth(i).evaluate("e => e.nextElementSibling.textContent") for i in range(boxes.count())]
    box = boxes.nth(names.index("only_answer_loss"))
    assert box.is_checked()
    box.click()  # off: the user's messages train too
    after = text_when(summary, lambda s: "carry loss" in s and s != before)
    assert n_loss(after) > n_loss(before)
    expect(page.locator(".tok.loss")).to_have_count(n_loss(after))
    assert "<|eot_id|>" in page.locator(".tok").last.inner_text()  # special tokens shown as text, escaped


def test_static_export_renders_offline(page, tok, tmp_path):
    from playwright.sync_api import expect
    from alignlab import zoo
    from alignlab.inspect.tokens import export_html, _records
    p = export_html(_records(zoo.get("chat") / "val.jsonl")[:2], tok, tmp_path / "inspector.html", n_records=2)
    text = p.read_text()
    assert 'src="https://cdn.bokeh.org' not in text and 'src="https://cdn.holoviz.org' not in text
    page.goto(p.as_uri())
    expect(page.locator(".summary")).to_contain_text("carry loss", timeout=30000)


SEAM_APP = """
from transformers import AutoTokenizer
from alignlab import zoo
from alignlab.inspect.tokens import token_inspector
from alignlab.templates import ChatTemplate
tok = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
plain = ChatTemplate({"system": "system", "user": "user", "bot": "bot"}, "[{role}] ", "\\n")  # plain tags, a trailing space
recs = [{"id": "hello", "messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello there."}]}]
token_inspector(recs, tok, template=plain).servable()
"""


def test_inspector_marks_seam_tokens_in_chromium(serve_app, page, tiny_llama):
    """The seam is marked on the token: a red outline and the reason on hover, in the training sample and in the served prompt."""
    from playwright.sync_api import expect
    page.goto(serve_app(SEAM_APP))
    summary = page.locator(".summary")
    before = text_when(summary, lambda s: "1 seam tokens" in s)
    seam = page.locator(".tok.seam")
    expect(seam).to_have_count(1)
    assert seam.first.inner_text() == "·H"  # `ĠH`: the prefix's space merged into the answer's first token
    assert "the served prompt ends `]` `Ġ`, training has `ĠH`" in seam.first.get_attribute("title")
    assert seam.first.evaluate("e => getComputedStyle(e).outlineStyle") == "solid"
    boxes = page.locator("input[type=checkbox]")
    names = [boxes.nth(i).evaluate("e => e.nextElementSibling.textContent") for i in range(boxes.count())]
    boxes.nth(names.index("inference prompt")).click()  # the prompt the generator is served: its lone space is the seam
    text_when(summary, lambda s: "inference prompt" in s and s != before)
    expect(page.locator(".tok.seam")).to_have_count(1)
    assert page.locator(".tok.seam").first.inner_text() == "·" and page.locator(".tok").last.inner_text() == "·"
