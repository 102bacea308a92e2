"""Multimodal cherry-picks (issue 16, nbs/18i_vlm_cherry_picks): a `train_multimodal` run with `cherry_pick_settings` stores, at
each evaluation, greedy answers on held-out images with their resolved image paths and metrics; the review store reads them;
the review app's static export shows each image (an <img> with a data: URI) beside the answers; the served app shows it in
Chromium; the fluent chain gives the JSON's settings; bad settings are one line; a resumed VLM run ends where an uninterrupted
one does.

One real run (the zoo's tiny LLaMA + tiny CLIP + c_abs projector, 2 steps, an evaluation after each) is shared by the tests."""
import base64, io, json, re, subprocess, sys
from pathlib import Path
import pytest

from alignlab import zoo
from alignlab.settings import SettingsError, load_settings
from alignlab.vlm_cherry_picks import vlm_train_settings


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from transformers import TrainerCallback
    from alignlab.run import train
    class Logs(TrainerCallback):
        seen = []
        def on_log(self, args, state, control, logs=None, **kw): self.seen.append({"step": state.global_step, **(logs or {})})
    d = tmp_path_factory.mktemp("vlm_cherry")
    train(vlm_train_settings(d, steps=2, eval_steps=1), progress=False, callbacks=[Logs()])
    return d, Logs.seen


def _val_records():
    return [json.loads(l) for l in (zoo.get("multimodal") / "val.jsonl").read_text().splitlines()]


def test_each_evaluation_stores_answers_with_image_paths_and_metrics(run):
    from alignlab.review_store import read_review_store
    d, logs = run
    rows = read_review_store(d)
    assert rows.skipped == 0 and len(rows) == 8  # 4 held-out images × 2 evaluations
    assert sorted({r["step"] for r in rows}) == [1, 2]
    val = {r["id"]: r for r in _val_records()}
    assert len({r["record_id"] for r in rows}) == 4 and {r["record_id"] for r in rows} <= set(val)  # num_samples 4 of the 20
    for r in rows:
        assert set(r) == {"step", "dataset", "record_id", "prompt", "label", "answer_id", "answer", "metrics", "time", "image_paths"}
        src = val[r["record_id"]]
        # resolved as the dataset resolves them: relative to the records file, absolute, the file itself
        want = [str((zoo.get("multimodal") / m["content"]).resolve()) for m in src["messages"] if m["type"] == "image"]
        assert r["image_paths"] == want and all(Path(p).is_file() for p in want)
        assert r["label"] == {"role": "bot", "content": src["messages"][-1]["content"]}
        assert r["prompt"] == src["messages"][:-1] and r["dataset"] == "val"
        assert isinstance(r["metrics"]["length"], int) and r["metrics"]["accuracy"] in (0, 1)
        assert r["metrics"]["accuracy"] == int(r["answer"].strip() == src["messages"][-1]["content"])
    # the averages were logged through the trainer at each evaluation
    logged = {h["step"]: h for h in logs if "cherry_pick/val/length" in h}
    assert sorted(logged) == [1, 2]
    for step, h in logged.items():  # the logged averages are the stored values' means
        mine = [r for r in rows if r["step"] == step]
        assert h["cherry_pick/val/accuracy"] == pytest.approx(sum(r["metrics"]["accuracy"] for r in mine) / 4)
        assert h["cherry_pick/val/length"] == pytest.approx(sum(r["metrics"]["length"] for r in mine) / 4)
    # experiment.json keeps the multimodal blocks whole: it reads back as the same settings
    from alignlab.run import ExperimentSettings
    s = load_settings(ExperimentSettings, json.loads((d / "experiment.json").read_text()))
    assert type(s.cherry_pick_settings).__name__ == "MultimodalCherryPickSettings"
    assert s.cherry_pick_settings.dataset_settings.n_modality_embeddings == 4 and s.train_dataset_settings.n_modality_embeddings == 4


def _thumbs(page_html):
    return re.findall(r"<img class='rv-image' src='data:image/png;base64,([A-Za-z0-9+/=]+)' alt='([^']*)'", page_html)


def test_static_export_embeds_each_image_beside_the_answers(run, tmp_path):
    from PIL import Image
    import numpy as np
    from alignlab.review import Review
    from alignlab.review_app import export_review
    d, _ = run
    rv = Review(d)
    assert len(rv.prompts) == 4 and len(rv.versions) == 2 and all(p["image_paths"] for p in rv.prompts.values())
    out = export_review(d, tmp_path / "review.html")
    page = out.read_text()
    thumbs = _thumbs(page)
    assert len(thumbs) == 4
    for b64, alt in thumbs:  # the embedded PNG is the image itself (64 px: under the thumbnail size, not resized)
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))
        assert np.array_equal(got, np.asarray(Image.open(alt).convert("RGB")))
    for item in re.findall(r"<details class='rv-item'>.*?</details>", page, flags=re.S):  # beside: one flex row, images then the grid
        side = item[item.index("<div class='rv-side'>"):]
        assert side.index("rv-images") < side.index("rv-grid") < side.index("rv-answer")
    # negative control: a chat store (no image paths) exports no image and no side-by-side row
    from alignlab.review_store import append_records, STORE_NAME
    chat = tmp_path / "chat"
    append_records(chat / STORE_NAME, [{k: v for k, v in r.items() if k != "image_paths"} for r in rv.cells.values()])
    plain = export_review(chat, tmp_path / "plain.html").read_text()
    assert _thumbs(plain) == [] and "<div class='rv-side'>" not in plain and "<img" not in plain


def test_served_review_app_shows_the_image(run, page, tmp_path):
    "`alignlab review RUN` in Chromium: the current prompt shows its image, decoded by the browser (natural width > 0)."
    from playwright.sync_api import expect
    sys.path.insert(0, str(Path(__file__).parent))
    from test_review import served
    d, _ = run
    with served([d], tmp_path / "ratings") as url:
        page.goto(url)
        img = page.locator("img.rv-image").first
        expect(img).to_be_visible(timeout=60000)
        assert page.evaluate("(e) => e.naturalWidth", img.element_handle()) == 64
        expect(page.locator(".rv-answer").first).to_be_visible()


def test_settings_errors_are_one_line(tmp_path):
    from alignlab.run import ExperimentSettings
    base = vlm_train_settings(tmp_path)
    cp = base["cherry_pick_settings"]
    cases = [
        ({**cp, "metric_settings": [{"type": "kl"}]}, "cherry_pick_settings.metric_settings[0].type: 'kl' is not available for multimodal cherry-picks"),
        ({**cp, "metric_settings": [{"type": "reward"}]}, "'reward' is not available for multimodal cherry-picks (reward scores prompt + answer with a text reward model"),
        ({**cp, "dataset_settings": {**cp["dataset_settings"], "n_modality_embeddings": 9}},
         "cherry_pick_settings.dataset_settings.n_modality_embeddings: 9, but the training data has 4; expected the same"),
        ({**cp, "dataset_settings": {**cp["dataset_settings"], "start_modality_token": "<S>"}},
         "cherry_pick_settings.dataset_settings: modality tokens ['<S>', '<img>', '</MS>'], but the training data's are ['<MS>', '<img>', '</MS>']"),
        ({**cp, "dataset_settings": {"sources": cp["dataset_settings"]["sources"], "dataset_type": "chat"}},
         "cherry_pick_settings.dataset_settings.dataset_type: 'chat', but multimodal data trains multimodal, whose cherry-picks read multimodal data; expected 'multimodal'"),
        ({**cp, "generator_transformers_settings": {"max_new_tokens": 8, "num_return_sequences": 1}, "metric_settings": [{"type": "self_bleu"}]},
         "needs generator_transformers_settings.num_return_sequences > 1"),
    ]
    for bad, msg in cases:
        with pytest.raises(SettingsError) as e: load_settings(ExperimentSettings, {**base, "cherry_pick_settings": bad})
        assert msg in str(e.value) and "\n" not in str(e.value), (msg, str(e.value))
    assert type(load_settings(ExperimentSettings, base).cherry_pick_settings).__name__ == "MultimodalCherryPickSettings"


def test_fluent_chain_gives_the_json_cherry_picks(tmp_path):
    "`.vision(...).multimodal_dataset(...).cherry_picks(dataset_settings=<held-out records>)` equals the JSON's cherry_pick_settings."
    from alignlab.experiment import Experiment
    from alignlab.run import ExperimentSettings
    js = load_settings(ExperimentSettings, vlm_train_settings(tmp_path)).cherry_pick_settings
    val = str(zoo.get("multimodal") / "val.jsonl")
    e = (Experiment(run_dir=tmp_path, seed=3).model("tiny-llama", transformers_settings={"torch_dtype": "float32"})
         .vision(encoder="tiny-clip", projector="c_abs", n_modality_embeddings=4).multimodal_dataset("multimodal", max_tokens_count=64)
         .cherry_picks(dataset_settings={"sources": [{"name": "val", "records_path": val, "num_samples": 4}]},
                       metric_settings=[{"type": "length"}, {"type": "accuracy"}],
                       generator_transformers_settings={"max_new_tokens": 8, "do_sample": False}, custom_generation_settings={"batch": 4}))
    got = e.settings().cherry_pick_settings
    assert type(got) is type(js)
    strip = lambda c: c.model_dump(mode="json")  # every field, defaults included
    assert strip(got) == strip(js)


def test_resumed_vlm_run_ends_where_an_uninterrupted_one_does(tmp_path):
    """2 steps straight vs 1 step, a checkpoint, and a resume to 2 (the same settings, a fresh model and trainer): the projector
    and the LM weights agree within 1e-5 (same CPU, same batches; the tolerance covers the optimizer state's round trip through
    disk). Controls: the second call did resume from checkpoint-1, and step 2 moved the weights (the comparison is not vacuous)."""
    import shutil
    from safetensors.torch import load_file
    from alignlab.run import train
    def cfg(d, steps):
        c = vlm_train_settings(d, steps=steps, eval_steps=100)
        c.pop("cherry_pick_settings"); c.pop("val_dataset_settings")
        c["trainer_settings"].update(eval_strategy="no", save_strategy="steps", save_steps=1)
        return c
    train(cfg(tmp_path / "straight", 2), progress=False)
    train(cfg(tmp_path / "resumed", 1), progress=False)
    mid = shutil.copytree(tmp_path / "resumed" / "trainer" / "checkpoint-1", tmp_path / "step1")  # rotation may remove it later
    s = train(cfg(tmp_path / "resumed", 2), resume=True, progress=False)
    assert s["resumed_from"] and Path(s["resumed_from"]).name == "checkpoint-1" and s["steps"] == 2
    for f in ("projections/modality_adapters.safetensors", "model.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / "final" / f)), load_file(str(tmp_path / "resumed" / "final" / f))
        assert a.keys() == b.keys()
        diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
        assert diff < 1e-5, (f, diff)
        moved = max(float((a[k].float() - c.float()).abs().max()) for k, c in load_file(str(mid / f)).items())
        assert moved > 1e-4, (f, moved)
