"""Offline RAG (doc_sep chat records) and the attention-over-documents view: SFT on the records, the view served by `panel serve`
and driven in headless Chromium."""
import json
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after


def test_attention_mass_is_exact_on_a_constructed_tensor():
    import torch
    from alignlab.attention_view import attention_mass
    A = torch.zeros(1, 2, 6, 6)
    A[0, 0, 4, :5] = torch.tensor([.1, .2, .3, .0, .4])  # head 0, row 4: doc (1, 3) = .2 + .3, doc (3, 5) = .0 + .4
    A[0, 1, 4, :5] = torch.tensor([.0, .0, .0, 1., .0])  # head 1, row 4: all on the second document
    A[0, :, 5, :] = torch.tensor([1 / 6] * 6)            # row 5: uniform
    m = attention_mass(A, [(1, 3), (3, 5)], [4, 5])
    assert torch.allclose(m[0, :, :, 0], torch.tensor([[.5, .4], [.0, 1.]]))
    assert torch.allclose(m[0, :, :, 1], torch.full((2, 2), 2 / 6))
    # negative control: every weight on tokens outside the documents gives exactly zero
    Q = torch.zeros(1, 2, 6, 6); Q[..., 0] = 1
    assert attention_mass(Q, [(1, 3), (3, 5)], [4, 5]).abs().sum() == 0


@pytest.fixture(scope="module")
def rag_run(tmp_path_factory):
    """A short full fine-tune of the zoo's tiny Llama on doc_sep records (the new token from DOC_SEP_INIT), through Experiment."""
    from alignlab.experiment import Experiment
    from alignlab.rag_records import DOC_SEP_INIT, write_rag_records, zoo_rag_triples
    d = tmp_path_factory.mktemp("rag")
    write_rag_records(zoo_rag_triples("train", 3)[:64], d / "train.jsonl")
    write_rag_records(zoo_rag_triples("val", 3, seed=9)[:4], d / "val.jsonl")
    fit = (Experiment(d / "run").model("tiny-llama", transformers_settings={"dtype": "float32"}).new_tokens(DOC_SEP_INIT)
           .chat_dataset(train=d / "train.jsonl", val=d / "val.jsonl", max_tokens_count=160)
           .trainer(max_steps=8, learning_rate=1e-3, per_device_train_batch_size=8, gradient_accumulation_steps=1, logging_steps=1,
                    save_strategy="no", eval_strategy="no", lr_scheduler_type="constant")
           .fit(progress=False))
    return d, fit


def test_sft_on_doc_sep_records_trains_the_new_token(rag_run):
    import torch
    from alignlab.attention_view import load_run
    from alignlab.models import load_model
    from alignlab.rag_records import DOC_SEP, DOC_SEP_INIT
    d, fit = rag_run
    assert fit["steps"] == 8
    # the first loss is ~6 nats (invented names, a new format); 8 steps of full fine-tuning take off well over 1
    assert fit["train_loss_last"] < fit["train_loss_first"] - 1.0, (fit["train_loss_first"], fit["train_loss_last"])
    trained, tok, tpl, val = load_run(d / "run")
    base, btok = load_model({"model_path": "tiny-llama", "model_type": "causal", "transformers_settings": {"dtype": "float32"}},
                            embeddings_initialization_strategy=DOC_SEP_INIT)
    sid = tok.convert_tokens_to_ids(DOC_SEP)
    assert sid == btok.convert_tokens_to_ids(DOC_SEP) and len(val) == 4 and DOC_SEP in val[0]["messages"][0]["content"]
    w, w0 = trained.get_input_embeddings().weight[sid], base.get_input_embeddings().weight[sid]
    assert not torch.allclose(w, w0)  # the <doc_sep> row trained (from its "Document" initialization)


def test_attention_view_in_chromium_layer_and_head_change_the_heatmap(rag_run, page):
    from playwright.sync_api import expect
    from alignlab.browser import serve_panel
    d, _ = rag_run
    app = f"from alignlab.attention_view import attention_app\nattention_app({str(d / 'run')!r}, record=1).servable()\n"
    with serve_panel(app) as url:  # served, the app answers at once and fills the view in after the page loads
        page.goto(url)
        _drive(page)


def _drive(page):
    from playwright.sync_api import expect
    heat = page.locator("div.tokens-heatmap")
    # loading the run (torch, the model) and one eager forward: seconds, minutes on a 2-core machine running other jobs
    expect(heat).to_have_attribute("data-layer", "mean", timeout=240000)
    expect(page.get_by_text("retrieval utility")).to_be_visible()
    expect(page.locator("sup.group", has_text="doc 3")).to_be_visible()  # the documents as spans
    before = heat.locator("td.cell").evaluate_all("cs => cs.map(c => c.dataset.value)")
    selects = page.locator("select")
    selects.nth(0).select_option("2")
    expect(heat).to_have_attribute("data-layer", "2", timeout=20000)
    selects.nth(1).select_option("1")
    expect(heat).to_have_attribute("data-head", "1", timeout=20000)
    after = heat.locator("td.cell").evaluate_all("cs => cs.map(c => c.dataset.value)")
    assert len(after) == len(before) > 8 and after != before  # one head of one layer is not the mean over all of them
    expect(page.locator("div.head-grid td.picked")).to_have_count(1)  # the grid outlines layer 2, head 1
    title = heat.locator("td.cell").first.get_attribute("title")
    assert title.startswith("answer token 0") and "(layer 2, head 1)" in title and "on doc 1" in title  # hover text


def test_an_adapter_run_dir_loads_and_its_attention_is_read_with_eager_then_restored(rag_run):
    """A LoRA run (the adapter on the base, <doc_sep> added again by the run's embeddings_initialization_strategy)."""
    from alignlab.attention_view import attention_report, load_run
    from alignlab.experiment import Experiment
    from alignlab.rag_records import DOC_SEP_INIT
    d, _ = rag_run
    (Experiment(d / "lora").model("tiny-llama", transformers_settings={"dtype": "float32"}).new_tokens(DOC_SEP_INIT)
     .lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).chat_dataset(train=d / "train.jsonl", val=d / "val.jsonl")
     .trainer(max_steps=1, per_device_train_batch_size=4, gradient_accumulation_steps=1, save_strategy="no", eval_strategy="no")
     .fit(progress=False))
    model, tok, tpl, val = load_run(d / "lora")
    assert type(model).__name__.startswith("PeftModel") and any("adapter loaded" in l for l in model.alignlab_report)
    r = attention_report(val[0], model, tok, tpl)
    assert r["mass"].shape[:3] == (4, 4, 3) and r["cost"]["impl"] == "sdpa"  # eager for one forward, sdpa again after
    assert r["cost"]["attention_bytes"] == 4 * 4 * r["cost"]["tokens"] ** 2 * 4
    assert set(r["utility"]) == {"none", "all", "doc 1", "doc 2", "doc 3"}
