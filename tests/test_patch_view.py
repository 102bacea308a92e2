"""The patch-projection view, served by `panel serve` and clicked in headless Chromium; and its count check on a wrong setting."""
import pytest

APP = "from alignlab.patch_view import demo_view\ndemo_view('c_abs').servable()\n"


def _click_cell(page, detail, row, col, s=2, canvas="canvas"):
    """Click the centre of output cell (row, col) of the s×s grid (the plot's frame is the canvas' left square; the colour bar
    sits right of it) and wait for the detail panel to show that embedding. Bokeh reads two clicks within its double-tap
    interval as one double tap, which the tap tool ignores: the click waits 0.7 s after the last one, as a person's would."""
    from playwright.sync_api import expect
    box = page.locator(canvas).first.bounding_box()
    page.wait_for_timeout(700)
    page.mouse.click(box["x"] + (col + 0.5) * box["height"] / s, box["y"] + (row + 0.5) * box["height"] / s)
    expect(detail).to_have_attribute("data-output", str(row * s + col), timeout=30000)


def test_served_patch_view_click_changes_the_detail_panel(page, tmp_path):
    from playwright.sync_api import expect
    from alignlab.browser import serve_panel
    with serve_panel(APP, timeout=300) as url:  # the first answer builds the view (loads CLIP and the LM): slow on a loaded machine
        _drive(page, url, tmp_path, expect)


def _drive(page, url, tmp_path, expect):
    page.goto(url, timeout=120000)
    detail = page.locator(".patch-detail").first
    expect(detail).to_have_attribute("data-output", "0", timeout=120000)
    expect(page.get_by_text("ok: the projector gives 4 embeddings per image")).to_be_visible()
    expect(page.get_by_text("image 0:\u00a04\u00a0×\u00a0<img>", exact=False)).to_be_visible()  # the image block: one box, not 4 tokens
    before = detail.inner_text()
    assert "embedding 0 of 4" in before and "row 0, col 0" in before and "logit lens: token" in before and "nearest input embedding" in before
    _click_cell(page, detail, 1, 1)  # bottom right: embedding 3
    after = detail.inner_text()
    assert after != before and "embedding 3 of 4" in after and "row 1, col 1" in after
    assert "pooling window: patch rows 2–3, cols 2–3" in after and "9 patch(es)" in after  # the measured mapping: window plus the conv's reach
    _click_cell(page, detail, 0, 1)  # top right: embedding 1
    assert "row 0, col 1" in detail.inner_text()
    shot = tmp_path / "patch_view.png"
    page.screenshot(path=str(shot))
    from PIL import Image
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100, "the screenshot is not blank"


def test_wrong_n_modality_embeddings_is_shown_with_the_correct_value():
    from alignlab.patch_view import demo_view
    v = demo_view("llava", n_modality_embeddings=9)  # the llava stand-in gives one embedding per patch: 16
    check = v[1]
    assert check.alert_type == "danger"
    assert "n_modality_embeddings=9" in check.object and check.object.endswith("The correct value is n_modality_embeddings=16")


# In JupyterLab (offline, a click through the kernel's comm): tests/test_lab.py's WIDGETS, with the other widgets.
