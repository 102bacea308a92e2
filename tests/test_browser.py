"""The browser harness: a real Panel app served on 127.0.0.1, loaded in headless Chromium."""
import pytest


def test_zoo_card_served_by_panel_renders_in_chromium(serve_app, page, tmp_path, tiny_llama):
    from playwright.sync_api import expect
    url = serve_app("from alignlab import zoo\nzoo.card_pane('tiny-llama').servable()\n")
    page.goto(url)
    heading = page.get_by_role("heading", name="tiny-llama")
    expect(heading).to_be_visible(timeout=30000)
    expect(page.get_by_text("pre-trained on a synthetic corpus until it knows its category facts")).to_be_visible()
    shot = tmp_path / "card.png"
    page.screenshot(path=str(shot))
    from PIL import Image
    im = Image.open(shot).convert("L")
    lo, hi = im.getextrema()
    assert hi - lo > 100, "the screenshot is not blank"
