"""RAG: settings contract, the question encoder (real MiniLM and the zoo's tiny one), the faiss index (both layouts), retrieval's bad inputs."""
import json, os
from pathlib import Path
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from alignlab import zoo
from alignlab.data import DataError
from alignlab.settings import SettingsError, load_settings
from alignlab.retrieval import (RAGModelSettings, RetrievalSettings, IndexSettings, QuestionEncoder, PassageIndex, Retriever,
                                load_index, open_index, read_passages, save_turbo_layout, with_documents, question_of)


@pytest.fixture(scope="module")
def tiny():
    return QuestionEncoder("tiny-encoder")


@pytest.fixture(scope="module")
def rag():
    return zoo.get("rag")


def _other_encoder(tiny):
    "The tiny encoder with perturbed weights: the same width and tokenizer, different embeddings."
    import copy, torch
    m = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for p in m.parameters(): p.add_(torch.randn_like(p) * 0.5)
    return QuestionEncoder("perturbed-tiny", model=m, tokenizer=tiny.tokenizer)


def test_settings_have_turbos_fields_and_defaults():
    rs = RetrievalSettings()
    assert rs.model_dump() == dict(n_docs=1, title_sep=" / ", doc_sep=" // ", prefix="", max_doc_length=300, retrieval_vector_size=768,
                                   retrieval_batch_size=8, query_encoder_max_length=512, encoder_learning_rate=None)
    base = {"generator_settings": {"model_path": "tiny-llama", "model_type": "causal"},
            "question_encoder_settings": {"model_path": "tiny-encoder", "model_type": "encoder"},
            "index_settings": {"index_path": "i.faiss", "passages_path": "p.jsonl"}, "retrieval_settings": {}}
    assert load_settings(RAGModelSettings, base).question_encoder_settings.model_type == "encoder"
    with pytest.raises(SettingsError, match="did you mean 'n_docs'"):
        load_settings(RAGModelSettings, {**base, "retrieval_settings": {"ndocs": 2}})
    with pytest.raises(SettingsError, match="generator_settings.model_type"):
        load_settings(RAGModelSettings, {**base, "generator_settings": {"model_path": "x", "model_type": "seq_cls"}})


def test_real_minilm_paraphrase_beats_unrelated():
    enc = QuestionEncoder("all-MiniLM-L6-v2")
    assert enc.dim == 384
    E = enc.encode(["How old is the Eiffel tower?", "What is the age of the Eiffel tower?", "My cat likes to sleep on the sofa.",
                    "Paris is the capital of France.", "Which city is France's capital?"])
    assert np.allclose(np.linalg.norm(E, axis=1), 1, atol=1e-4)
    assert E[0] @ E[1] > E[0] @ E[2] + 0.3  # paraphrase vs unrelated (MiniLM: ~0.9 vs ~0.0)
    assert E[3] @ E[4] > E[3] @ E[2] + 0.3


def test_index_saved_and_reloaded_without_rebuilding(tmp_path, tiny, rag, monkeypatch):
    ist = IndexSettings(index_path=str(tmp_path / "p.faiss"), passages_path=str(rag / "passages.jsonl"))
    ix = open_index(ist, tiny, log=lambda m: None)
    assert len(ix) == 80 and Path(ist.index_path).exists() and json.loads(Path(ist.index_path + ".json").read_text())["count"] == 80
    monkeypatch.setattr(PassageIndex, "build", classmethod(lambda *a, **k: pytest.fail("rebuilt")))
    ix2 = open_index(ist, tiny)
    q = tiny.encode(["Where does Ardone live?", "What pet does Beko keep?"])
    assert (ix.index.search(q, 5)[1] == ix2.index.search(q, 5)[1]).all()


def test_mismatch_count_dimension_encoder(tmp_path, tiny, rag):
    ist = IndexSettings(index_path=str(tmp_path / "p.faiss"), passages_path=str(rag / "passages.jsonl"))
    PassageIndex.build(ist.passages_path, tiny).save(ist.index_path)
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join((rag / "passages.jsonl").read_text().splitlines()[:50]))
    with pytest.raises(SettingsError, match="holds 80 vectors but .* has 50 passages"):
        load_index(ist.index_path, fewer, tiny)
    with pytest.raises(SettingsError, match="dimension 64, but encoder .* gives 384"):
        load_index(ist.index_path, ist.passages_path, QuestionEncoder("all-MiniLM-L6-v2"))
    with pytest.raises(SettingsError, match="embeds differently") as e:
        load_index(ist.index_path, ist.passages_path, _other_encoder(tiny))
    assert "\n" not in str(e.value)


def test_turbo_layout_loads_and_checks_the_encoder(tmp_path, tiny, rag):
    ps, _ = read_passages(rag / "passages.jsonl")
    ps = [{**p, "title": p["id"]} for p in ps[:30]]
    save_turbo_layout(ps, tiny, tmp_path / "fake_wiki", tmp_path / "fake_wiki.faiss")
    ix = load_index(tmp_path / "fake_wiki.faiss", tmp_path / "fake_wiki", tiny)
    assert len(ix) == 30 and ix.passages[4]["title"] == ps[4]["title"] and ix.passages[4]["id"] == "4"
    assert Retriever(tiny, ix).retrieve([ps[7]["title"] + " " + ps[7]["text"]])[0][0]["row"] == 7
    with pytest.raises(SettingsError, match="stored embeddings differ"):
        load_index(tmp_path / "fake_wiki.faiss", tmp_path / "fake_wiki", _other_encoder(tiny))


def test_bad_inputs_are_one_line_errors(tmp_path, tiny, rag):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no passages"):
        open_index(IndexSettings(index_path=str(tmp_path / "e.faiss"), passages_path=str(tmp_path / "empty.jsonl")), tiny)
    (tmp_path / "notext.jsonl").write_text('{"id": "a", "text": "ok"}\n{"id": "b", "title": "T", "text": ""}\n')
    with pytest.raises(DataError, match=r"notext.jsonl:2: text: ''; expected"):
        read_passages(tmp_path / "notext.jsonl")
    with pytest.raises(SettingsError, match="no such file"):
        read_passages(tmp_path / "missing.jsonl")
    ix = PassageIndex.build(rag / "passages.jsonl", tiny)
    with pytest.raises(SettingsError, match="n_docs: 81, but the index holds 80 passages; expected at most 80"):
        Retriever(tiny, ix, RetrievalSettings(n_docs=81))
    r = Retriever(tiny, ix, RetrievalSettings(n_docs=80))
    assert len(r.retrieve(["where"])[0]) == 80  # the whole index is fine
    with pytest.raises(DataError, match="record 'q7': the question is [0-9]+ encoder tokens; expected at most 128"):
        r.retrieve(["short", "word " * 150], ids=["q1", "q7"])  # the tiny encoder has 128 positions
    with pytest.raises(SettingsError, match="retrieval_vector_size: 768, but the index and encoder are 64 wide"):
        Retriever(tiny, ix, RetrievalSettings(retrieval_vector_size=768))


def test_documents_go_into_the_last_user_message(tiny, rag):
    rec = {"id": "r", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Where does Ardone live?"},
                                   {"role": "bot", "content": "Ardone lives in Tamemo."}]}
    assert question_of(rec) == "Where does Ardone live?"
    docs = [{"title": "A", "text": "one two three"}, {"title": "", "text": "four"}]
    out = with_documents(rec, docs, RetrievalSettings(doc_sep="<doc_sep>"))
    assert out["messages"][1]["content"] == "A / one two three<doc_sep>four<doc_sep>Where does Ardone live?"
    assert rec["messages"][1]["content"] == "Where does Ardone live?" and out["messages"][2] == rec["messages"][2]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
    cut = with_documents(rec, [{"title": "", "text": "alpha beta gamma delta epsilon zeta eta theta"}], RetrievalSettings(max_doc_length=3), tok)
    assert len(tok(cut["messages"][1]["content"].split(" // ")[0], add_special_tokens=False)["input_ids"]) <= 3


# --- online inference (17b_rag_inference) ---

def _rag_inference_settings(tmp_path, rag, n_docs=2):
    import json
    recs = [json.loads(l) for l in (rag / "val.jsonl").read_text().splitlines()[:6]]
    recs = [{**r, "messages": r["messages"][:-1]} for r in recs]
    recs.append({"id": "too-long", "messages": [{"role": "user", "content": "why " * 200}]})
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    from alignlab.data import chat_settings
    return {"inference_settings": [{
                "model_settings": {"generator_settings": {"model_path": "tiny-llama", "model_type": "causal",
                                                          "transformers_settings": {"torch_dtype": "float32"}},
                                   "question_encoder_settings": {"model_path": "tiny-encoder", "model_type": "encoder"},
                                   "index_settings": {"index_path": str(tmp_path / "p.faiss"), "passages_path": str(rag / "passages.jsonl")},
                                   "retrieval_settings": {"n_docs": n_docs, "doc_sep": " // "}},
                "tokenizer_settings": {}, "batch": 1,
                "generation_settings": [{"transformers_settings": {"do_sample": False, "max_new_tokens": 8, "stop_strings": None}}]}],
            "dataset_settings": chat_settings(tmp_path / "q.jsonl", max_tokens_count=512), "save_path": str(tmp_path / "out")}


def test_inference_rag_cli_equals_python_entry(tmp_path, rag):
    import json
    from alignlab.cli import main
    from alignlab.data import read_records
    from alignlab.rag_inference import RAGPipeline, RAGInferenceSettings
    st = _rag_inference_settings(tmp_path, rag)
    (tmp_path / "rag.json").write_text(json.dumps(st))
    assert main(["inference_rag", "--inference_settings_path", str(tmp_path / "rag.json")]) == 0
    out = [json.loads(l) for l in (tmp_path / "out" / "rag_m0_g0.jsonl").read_text().splitlines()]
    info = json.loads((tmp_path / "out" / "info.json").read_text())["rag_m0_g0.jsonl"]
    assert len(out) == 6 and [e["id"] for e in info["errors"]] == ["too-long"] and "encoder tokens" in info["errors"][0]["error"]
    for o in out:
        assert len(o["doc_ids"]) == 2 and len(o["doc_scores"]) == 2 and o["doc_scores"][0] >= o["doc_scores"][1]
        assert o["doc_ids"][0].startswith("doc-") and o["documents"][0] and "//" not in o["messages"][-1]["content"]
    s = RAGInferenceSettings.model_validate(st)  # the Python entry, same settings: identical answers, documents and scores
    pipe = RAGPipeline(s.inference_settings[0])
    errors = []
    py = pipe.generate(read_records(s.dataset_settings, inference=True), s.inference_settings[0].generation_settings[0], errors=errors)
    assert [e["id"] for e in errors] == ["too-long"]
    key = lambda o: (o["id"], o["answers"][0]["content"], o["doc_ids"], o["doc_scores"], o["documents"], o["messages"])
    assert [key(o) for o in py] == [key(o) for o in out]


def test_the_prompt_holds_the_documents_through_the_template(tmp_path, rag):
    "The generator's prompt is the chat template's rendering of the record with its documents (what the inspector shows)."
    from alignlab.data import read_records
    from alignlab.datasets import build_dataset
    from alignlab.rag_inference import RAGPipeline, RAGInferenceSettings, records_with_documents
    s = RAGInferenceSettings.model_validate(_rag_inference_settings(tmp_path, rag, n_docs=1))
    pipe = RAGPipeline(s.inference_settings[0])
    recs = read_records(s.dataset_settings, inference=True)
    aug, hits, errs = records_with_documents(recs, pipe.retriever, pipe.tokenizer)
    ds = build_dataset(s.dataset_settings, pipe.tokenizer, inference=True, records=aug)
    text = pipe.tokenizer.decode(ds.store[0][0].tolist())
    assert hits[0][0]["text"] in text and text.index(hits[0][0]["text"]) < text.index(recs[0]["messages"][-1]["content"])
    assert len(aug) == len(recs) - 1 and errs[0]["id"] == "too-long"


# --- end-to-end training (17c_rag_training) ---

def test_rag_loss_shift_and_marginal():
    import torch
    from alignlab.rag_training import answer_logprobs, rag_sequence_loss, IGNORE_INDEX
    logits = torch.full((1, 3, 5), -30.); logits[0, 1, 3] = 30.  # position 1 predicts token 3, the label at position 2
    lp, n = answer_logprobs(logits, torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3]]))
    assert abs(lp.item()) < 1e-4 and n.item() == 1
    s = torch.tensor([[2., 0.]], requires_grad=True)
    loss = rag_sequence_loss(s, torch.tensor([[-1., -5.]]))
    assert abs(loss.item() - 1.1242) < 1e-3
    loss.backward(); assert s.grad[0, 0] < 0 < s.grad[0, 1]
    s1 = torch.tensor([[2.]], requires_grad=True)
    rag_sequence_loss(s1, torch.tensor([[-1.]])).backward()
    assert s1.grad.abs().sum() == 0  # one document: nothing reaches the scores (turbo's n_docs=1)


def test_question_encoder_gets_gradient_and_changes_through_train_rag(tmp_path):
    import torch
    from alignlab.run import train, ExperimentSettings
    from alignlab.rag_training import rag_train_settings
    st = rag_train_settings(tmp_path / "run", n_docs=2, steps=2, batch_size=4)
    assert ExperimentSettings.model_validate(st).objective == "rag"
    before = {k: v.clone() for k, v in QuestionEncoder("tiny-encoder").model.state_dict().items()}
    s = train(st, progress=False)
    out = Path(s["model_dir"])
    after = QuestionEncoder(out / "question_encoder").model.state_dict()
    assert max((after[k] - before[k]).abs().max().item() for k in before) > 1e-5
    saved = json.loads((out / "rag_model_settings.json").read_text())
    assert saved["question_encoder_settings"]["model_path"] == str(out / "question_encoder")
    # the trained question encoder is accepted for the index its passage encoder built; the original is too
    ist = IndexSettings(**saved["index_settings"])
    assert len(open_index(ist, QuestionEncoder(out / "question_encoder"))) == 80


def test_rows_pair_questions_with_their_documents_and_n_docs_1_freezes_the_encoder(tmp_path):
    import torch
    from alignlab.data import read_records, chat_settings
    from alignlab.datasets import build_dataset
    from alignlab.rag_training import load_rag_model, rag_train_settings, _rag_inputs
    st = rag_train_settings(tmp_path, n_docs=3)
    model, tok = load_rag_model(st["model_settings"], log=lambda m: None)
    ds = build_dataset(st["train_dataset_settings"], tok)
    model.use_template(ds)
    recs = [ds.records[int(i)] for i in ds.rows[:2]]
    scores, rows, ids, attn, labels, ok = _rag_inputs(model, recs)
    assert scores.shape == (2, 3) and ids.shape[0] == 6 and ok.all()
    for r in range(6):
        b, k = divmod(r, 3)
        text = tok.decode(ids[r][attn[r].bool()].tolist())
        assert recs[b]["messages"][0]["content"] in text and model.retriever.index.passages[rows[b, k]]["text"] in text
        ans = tok.decode(ids[r][labels[r] != -100].tolist())
        assert recs[b]["messages"][-1]["content"] in ans  # the loss is on question b's own answer
    out = model(recs)
    out["loss"].backward()
    g = [p.grad for p in model.question_encoder.parameters()]
    assert any(x is not None and x.abs().sum() > 0 for x in g)
    st1 = rag_train_settings(tmp_path, n_docs=1)
    m1, _ = load_rag_model(st1["model_settings"], log=lambda m: None)
    assert not any(p.requires_grad for p in m1.question_encoder.parameters()) and not m1.train_encoder


def test_rag_cherry_picks_store_retrieved_documents(tmp_path):
    from alignlab.run import train
    from alignlab.rag_training import rag_train_settings
    from alignlab.data import chat_settings
    from alignlab.review_store import read_review_store
    rag = zoo.get("rag")
    st = rag_train_settings(tmp_path / "run", n_docs=2, steps=1, batch_size=4)
    st["val_dataset_settings"] = {**chat_settings(rag / "val.jsonl", max_tokens_count=384),
                                  "sources": [{"name": "val", "records_path": str(rag / "val.jsonl"), "num_samples": 4}]}
    st["trainer_settings"].update(eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=4)
    st["cherry_pick_settings"] = {"dataset_settings": {**chat_settings(rag / "val.jsonl", max_tokens_count=384),
                                                       "sources": [{"name": "rag_val", "records_path": str(rag / "val.jsonl"), "num_samples": 5}]},
                                  "metric_settings": [{"type": "length"}],
                                  "generator_transformers_settings": {"max_new_tokens": 4, "do_sample": False}, "custom_generation_settings": {"batch": 8}}
    s = train(st, progress=False)
    store = tmp_path / "run" / "cherry_picks.jsonl"
    rows = [json.loads(l) for l in store.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["doc_ids"]) == 2 and len(r["doc_scores"]) == 2 for r in rows)
    assert all(r["dataset"] == "rag_val" and r["doc_ids"][0].startswith("doc-") for r in rows)


def test_fluent_rag_equals_the_json_settings(tmp_path):
    from alignlab.experiment import Experiment
    from alignlab.run import ExperimentSettings
    from alignlab.rag_training import rag_train_settings
    rag = zoo.get("rag")
    j = ExperimentSettings.model_validate(rag_train_settings(tmp_path, n_docs=2, encoder_lr=1e-3))
    e = (Experiment(run_dir=tmp_path, seed=0).model("tiny-llama", transformers_settings={"torch_dtype": "float32"})
         .chat_dataset(rag / "train.jsonl", max_tokens_count=384)
         .rag("rag", encoder="tiny-encoder", index=tmp_path / "passages.faiss", n_docs=2, encoder_learning_rate=1e-3))
    s = e.settings()
    assert s.objective == "rag" and s.model_settings == j.model_settings
    back = Experiment.from_settings(e.to_settings()).settings()
    assert back.model_settings == s.model_settings and back.objective == "rag"
    with pytest.raises(SettingsError, match="expected .model"):
        Experiment().rag("rag")
