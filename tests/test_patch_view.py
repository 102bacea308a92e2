"""The patch-projection view on a real alignlab.vlm VLM: served by `panel serve` and clicked in headless Chromium; a
`train_multimodal` run directory read through `alignlab patches`, its embeddings those the inference loader feeds the LM; the
count check on a wrong setting."""
import os, subprocess, sys
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


def _drive(page, url, tmp_path, expect, fed="16 patch(es)"):
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
    # the measured mapping: alignlab's c_abs mixes the pooled 2x2 cells in its second conv stage, so every patch feeds every output
    assert "pooling window: patch rows 2–3, cols 2–3" in after and fed in after
    _click_cell(page, detail, 0, 1)  # top right: embedding 1
    assert "row 0, col 1" in detail.inner_text()
    page.wait_for_timeout(700)  # the click's round trip settles (a person reads the panel first)
    page.locator("select").first.select_option(index=2)  # the box picks too: embedding 2
    expect(detail).to_have_attribute("data-output", "2", timeout=30000)
    shot = tmp_path / "patch_view.png"
    page.screenshot(path=str(shot))
    from PIL import Image
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 100, "the screenshot is not blank"


def test_wrong_n_modality_embeddings_is_shown_with_the_correct_value():
    from alignlab.patch_view import demo_view
    v = demo_view("llava", n_modality_embeddings=9)  # the llava VLM gives one embedding per patch: 16
    check = v[1]
    assert check.alert_type == "danger"
    assert "n_modality_embeddings=9" in check.object and check.object.endswith("The correct value is n_modality_embeddings=16")
    assert "image block 0 has 9 placeholders" in check.object  # the record as a dataset with the setting 9 tokenizes it


def test_static_page_a_tap_and_a_pick_change_the_detail(page, tmp_path):
    """The view saved as the docs save it (a static page, no kernel): a tap on a cell and a pick in the box still change the
    detail panel (precomputed states switched in the browser: widgets.js_states)."""
    from playwright.sync_api import expect
    from alignlab.docs_exec import save_widget
    from alignlab.patch_view import demo_view
    out = tmp_path / "patch.html"
    save_widget(demo_view("c_abs"), out)
    page.goto(out.as_uri())
    detail = page.locator(".patch-detail").first
    expect(detail).to_have_attribute("data-output", "0", timeout=60000)
    _click_cell(page, detail, 1, 1)
    assert "embedding 3 of 4" in detail.inner_text()
    page.locator("select").first.select_option(index=1)
    expect(detail).to_have_attribute("data-output", "1", timeout=10000)


@pytest.fixture(scope="module")
def mm_run(tmp_path_factory):
    """A real `train_multimodal` run (LoRA on tiny Llama, tiny CLIP, c_abs with 4 embeddings): 3 steps, enough to move the
    projector and the adapter away from their init; the view only needs the files a run writes."""
    from alignlab.patch_view import zoo_mm_settings
    from alignlab.run import train
    d = tmp_path_factory.mktemp("mm") / "run"
    tpl = {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
           "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n", "suffix_template": "<|eot_id|>"}
    mm = lambda split: {**zoo_mm_settings(4, split).model_dump(exclude_unset=True), "prompt_template": tpl}
    enc = {"modality_encoder_type": "clip", "encoder_path": "tiny-clip"}
    train({"log_path": str(d), "seed": 3, "model_settings": {"model_path": "tiny-llama", "transformers_settings": {"torch_dtype": "float32"},
           "peft_settings": {"name": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
           "train_dataset_settings": mm("train"), "val_dataset_settings": mm("val"),
           "modality_encoder_settings_mapping": {"image": enc, "audio": None}, "modality_projector_mapping": {"image": "c_abs", "audio": None},
           "modality_projector_initialization_mapping": {"image": None, "audio": None},
           "trainer_settings": {"save_strategy": "no", "eval_strategy": "no", "learning_rate": 1e-2, "max_steps": 3, "per_device_train_batch_size": 4,
                                "gradient_accumulation_steps": 1, "warmup_steps": 0, "lr_scheduler_type": "constant", "report_to": []}}, progress=False)
    return d, enc


def test_run_dir_view_reads_what_the_inference_loader_feeds_the_lm(mm_run):
    import torch
    from alignlab.images import ClipReader
    from alignlab.patch_view import demo_vlm, load_patch_run, patch_app, read_patches
    from alignlab.settings import load_settings
    from alignlab.vlm_inference import MultimodalModelInferenceSettings, load_vlm_for_inference
    run, enc = mm_run
    vlm, tok, st, tpl, recs = load_patch_run(run)
    ivlm, _ = load_vlm_for_inference(load_settings(MultimodalModelInferenceSettings, {
        "model_settings": {"model_path": "tiny-llama", "adapter_path": str(run / "final"), "projections_path": str(run / "final/projections"),
                           "n_modality_embeddings": 4, "transformers_settings": {"torch_dtype": "float32"}},
        "modality_encoder_settings_mapping": {"image": enc, "audio": None}, "modality_projector_mapping": {"image": "c_abs", "audio": None},
        "generation_settings": [{}]}), st)
    x = ClipReader("tiny-clip").read([recs[0]["image_paths"][0]])
    r = read_patches(x, vlm.encoder, vlm.projector, vlm.language_model, tok)
    with torch.no_grad():
        fed = ivlm.encode_images(x)[0].float()
        assert torch.allclose(r.outputs, fed, atol=1e-5)  # the same embeddings the LM gets at inference
        fresh = demo_vlm("c_abs", seed=3)[0].encode_images(x)[0]  # negative control: the run's own seed, untrained
        assert (r.outputs - fresh).abs().max() > 1e-3, "the view read an untrained projector"
    v = patch_app(run, record=recs[1]["id"])
    assert v[1].alert_type == "success" and "4 embeddings" in v[1].object
    assert f"record {recs[1]['id']}: loss mask" in v[3].object


def test_cli_patches_serves_a_run_and_a_click_changes_the_detail(mm_run, page, tmp_path):
    from playwright.sync_api import expect
    from alignlab.browser import _wait_http, free_port
    run, _ = mm_run
    bad = subprocess.run([sys.executable, "-m", "alignlab", "patches", str(run), str(tmp_path / "no.png")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no.png' is not a file" in bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "alignlab", "patches", str(run), "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "BOKEH_RESOURCES": "server"})
    try:
        _wait_http(f"http://127.0.0.1:{port}/", proc, 300)
        _drive(page, f"http://127.0.0.1:{port}/", tmp_path, expect)
    finally:
        proc.terminate(); proc.wait(10)


# In JupyterLab (offline, a click through the kernel's comm): tests/test_lab.py's WIDGETS, with the other widgets.
# On the docs page (a static page, no kernel): tests/test_docs.py's DOC_WIDGETS.
