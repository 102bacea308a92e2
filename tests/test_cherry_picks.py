"""alignlab.cherry_pick_settings, .cherry_pick_metrics, .review_store and .cherry_picks: settings, the append-only review store (crash-safe), and the callback inside a real transformers.Trainer
(tiny Llama + LoRA) with TensorBoard logging read back from the event files; the classification and reward-model cherry-picks
(scored, not generated) through alignlab.run.train, checked against the model's own unbatched outputs."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest, torch
from alignlab import zoo
from alignlab.settings import SettingsError, load_settings
from alignlab.trainers import CherryPickCallback
from alignlab.cherry_pick_settings import CherryPickSettings, MetricSettings
from alignlab.cherry_pick_metrics import compute_metrics
from alignlab.review_store import append_records, read_review_store, STORE_NAME


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after


def _cp(n=6, metrics=("length",), **gen):
    return {"dataset_settings": {"sources": [{"name": "chat_test", "records_path": str(zoo.get("chat") / "test.jsonl"), "num_samples": n}],
                                 "dataset_type": "chat", "max_tokens_count": 128},
            "metric_settings": [m if isinstance(m, dict) else {"type": m} for m in metrics],
            "generator_transformers_settings": {"max_new_tokens": 6, "do_sample": False, **gen}, "custom_generation_settings": {"batch": 8}}


# ---- settings ----

@pytest.mark.parametrize("bad,msg", [
    ({"type": "dist_n", "parameters": {"ngram": 0}}, "ngram"),
    ({"type": "diversity", "parameters": {"topk": 3}}, "did you mean 'top_k'"),
    ({"type": "rouge", "parameters": {"need_compute_rouge_l": "maybe"}}, "need_compute_rouge_l"),
    ({"type": "length", "parameters": {"need_average": True}}, "need_average"),
    ({"type": "tool_call_metrics"}, "never implemented"),
    ({"type": "perplexty"}, "did you mean 'perplexity'"),
    ({"type": "reward", "parameters": {"model_settings": {"model_path": "x", "model_type": "seq2seq"}}}, "model_type"),
])
def test_metric_settings_errors_are_one_line(bad, msg):
    with pytest.raises(SettingsError, match=msg) as e: load_settings(MetricSettings, bad)
    assert "\n" not in str(e.value)


def test_turbo_style_metric_settings_load():
    # turbo-alignment configs give need_average on every metric; all of these load as they are
    ms = [{"type": "length", "parameters": {"need_average": [True]}},
          {"type": "dist_n", "parameters": {"ngram": 5, "need_average": [True, False]}},
          {"type": "kl", "parameters": {"ref_logits_type": "sft", "need_average": [True]}},
          {"type": "rouge", "parameters": {"need_compute_rouge_n": [1], "need_compute_rouge_l": True, "need_average": [True]}},
          {"type": "reward", "parameters": {"model_settings": {"model_path": "tiny-llama", "model_type": "seq_cls", "model_kwargs": {"num_labels": 1}},
                                            "prompt_template": {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
                                                                "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n",
                                                                "suffix_template": "<|eot_id|>"},
                                            "max_tokens_count": 128, "micro_batch": 2, "name": "x", "need_average": [True]}}]
    s = load_settings(CherryPickSettings, {**_cp(metrics=ms), "generator_transformers_settings": {"num_beams": 3, "max_new_tokens": 5}})
    assert [m.type for m in s.metric_settings] == ["length", "dist_n", "kl", "rouge", "reward"]
    assert s.metric_settings[1].params.need_average == [True, False]
    with pytest.raises(SettingsError, match="num_return_sequences > 1"): load_settings(CherryPickSettings, _cp(metrics=["self_bleu"]))
    d = _cp(); d["dataset_settings"]["sources"].append(dict(d["dataset_settings"]["sources"][0]))
    with pytest.raises(SettingsError, match="used twice"): load_settings(CherryPickSettings, d)


# ---- the review store ----

def test_store_torn_line_by_hand(tmp_path):
    append_records(tmp_path / STORE_NAME, [{"i": 0}, {"i": 1}])
    with open(tmp_path / STORE_NAME, "ab") as f: f.write(b'{"i": 2, "x": "unfinis')
    r = read_review_store(tmp_path)
    assert [x["i"] for x in r] == [0, 1] and r.skipped == 1
    append_records(tmp_path / STORE_NAME, [{"i": 3}])
    r = read_review_store(tmp_path / STORE_NAME)
    assert [x["i"] for x in r] == [0, 1, 3] and r.skipped == 1
    assert read_review_store(tmp_path / "nowhere") == [] and read_review_store(tmp_path / "nowhere").skipped == 0


def test_store_survives_sigkill(tmp_path):
    """A writer process appending large records is SIGKILLed at a random moment: every line before the last is intact, the
    records read back are exactly 0..n-1 in order, and appending afterwards works."""
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r})
        from alignlab.review_store import append_records
        i = 0
        while True:
            append_records({str(tmp_path / STORE_NAME)!r}, [{{"i": i + k, "pad": "x" * 200000}} for k in range(3)]); i += 3
    """)
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and (not (tmp_path / STORE_NAME).exists() or (tmp_path / STORE_NAME).stat().st_size < 3_000_000):
            time.sleep(0.05)
        time.sleep(0.0137)
    finally: os.kill(p.pid, signal.SIGKILL); p.wait()
    r = read_review_store(tmp_path)
    assert len(r) >= 10 and [x["i"] for x in r] == list(range(len(r))) and r.skipped <= 1
    append_records(tmp_path / STORE_NAME, [{"i": -1}])
    r2 = read_review_store(tmp_path)
    assert [x["i"] for x in r2] == [x["i"] for x in r] + [-1] and r2.skipped == r.skipped


# ---- the callback ----

@pytest.fixture(scope="module")
def policy():
    from alignlab.models import load_model
    torch.manual_seed(0)
    return load_model({"transformers_settings": {"torch_dtype": "float32"}, "model_path": "tiny-llama", "peft_settings": {"name": "LORA", "r": 8, "lora_alpha": 16,
                                                                     "target_modules": ["q_proj", "v_proj", "o_proj"]}})


def test_run_restores_mode_and_labels_random_cut(policy, tmp_path):
    model, tok = policy
    multi = [{"id": f"m{k}", "messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": f"Hello {k}!"},
                                           {"role": "user", "content": "Name the white cup."}, {"role": "bot", "content": "It is a thing."},
                                           {"role": "user", "content": "And?"}, {"role": "bot", "content": "Done."}]} for k in range(8)]
    cp = {**_cp(metrics=["length", "accuracy"]),
          "dataset_settings": {"sources": [{"name": "multi", "records_data": multi, "num_samples": 8}], "random_cut": True, "seed": 1}}
    cb = CherryPickCallback(cp, tok, tmp_path)
    for mode in (True, False):
        model.train(mode); cb.run(model, step=int(mode))
        assert model.training is mode
    recs = read_review_store(tmp_path)
    assert len(recs) == 16
    for r in recs:
        m = next(x for x in multi if x["id"] == r["record_id"])["messages"]
        k = len(r["prompt"])
        assert r["prompt"] == [{"role": x["role"], "content": x["content"]} for x in m[:k]]
        assert r["label"] == {"role": "bot", "content": m[k]["content"]}  # the drawn bot message
    assert {len(r["prompt"]) for r in recs} == {1, 3, 5}  # the cut moves between records ...
    by_id = {}
    for r in recs: by_id.setdefault(r["record_id"], set()).add(len(r["prompt"]))
    assert all(len(v) == 1 for v in by_id.values())  # ... but not between evaluations
    # without random_cut the label is the record's last message
    cb2 = CherryPickCallback({**cp, "dataset_settings": {**cp["dataset_settings"], "random_cut": False}}, tok, tmp_path / "b")
    cb2.run(model, step=0)
    assert {r["label"]["content"] for r in read_review_store(tmp_path / "b")} == {"Done."}


def test_kl_needs_a_reference(tmp_path, tok, tiny_llama):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments
    plain = AutoModelForCausalLM.from_pretrained(tiny_llama)
    cb = CherryPickCallback(_cp(metrics=["kl"]), tok, tmp_path)
    from transformers import TrainerCallback
    assert isinstance(cb, TrainerCallback) and isinstance(cb, CherryPickCallback)  # transformers is mixed in on first use
    tr = Trainer(model=plain, args=TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True))
    with pytest.raises(SettingsError, match="kl needs a reference model"): cb.attach(tr)
    with pytest.raises(SettingsError, match="reward needs a reward model"): CherryPickCallback(_cp(metrics=["reward"]), tok, tmp_path)


def test_trainer_writes_store_logs_and_tensorboard(policy, tmp_path):
    """tiny Llama + LoRA in a real transformers.Trainer: evaluation every 2 steps; the callback stores every generation with
    its step and metrics, and the averages reach log_history and the TensorBoard event files."""
    from transformers import Trainer, TrainingArguments
    from alignlab.datasets import build_dataset
    from alignlab.collate import Collator
    from alignlab.models import load_model
    model, tok = policy
    rm, rm_tok = load_model({"transformers_settings": {"torch_dtype": "float32"}, "model_path": "tiny-llama", "model_type": "seq_cls", "model_kwargs": {"num_labels": 1}})
    chat = zoo.get("chat")
    ds = lambda f, n: build_dataset({"sources": [{"name": f, "records_path": str(chat / f"{f}.jsonl"), "num_samples": n}],
                                     "dataset_type": "chat", "max_tokens_count": 128}, tok)
    train, val = ds("train", 64), ds("val", 8)
    metrics = ["length", "perplexity", "accuracy", {"type": "rouge", "parameters": {"need_compute_rouge_n": [1]}},
               {"type": "dist_n", "parameters": {"ngram": 2}}, "diversity", "self_bleu", "kl", "reward"]
    cp = _cp(n=6, metrics=metrics, do_sample=True, num_return_sequences=2)
    cb = CherryPickCallback(cp, tok, tmp_path, reward_model=(rm, rm_tok))
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=4, per_device_train_batch_size=8, learning_rate=5e-3,
                             eval_strategy="steps", eval_steps=2, logging_steps=2, save_strategy="no", report_to=["tensorboard"],
                             use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    tr = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=Collator(tok.pad_token_id))
    tr.add_callback(cb); cb.attach(tr)
    tr.train()
    recs = read_review_store(tmp_path)
    assert recs.skipped == 0 and len(recs) == 2 * 6 * 2  # two evaluations x 6 prompts x 2 answers
    assert sorted({r["step"] for r in recs}) == [2, 4]
    keys = {"length", "perplexity", "accuracy", "rouge1_fmeasure", "rougeL_recall", "dist_1", "ead_dist_2", "diversity", "self_bleu",
            "kl_with_reference", "reward"}
    for r in recs:
        assert keys <= set(r["metrics"]) and r["dataset"] == "chat_test" and r["answer_id"].startswith(r["record_id"] + "-")
        assert r["label"]["role"] == "bot" and r["prompt"][-1]["role"] == "user" and isinstance(r["answer"], str)
        assert r["metrics"]["length"] >= 1 and r["metrics"]["perplexity"] > 1
    # the averages reached the trainer's logs, at the evaluation steps
    logged = [h for h in tr.state.log_history if any(k.startswith("cherry_pick/") for k in h)]
    assert [h["step"] for h in logged] == [2, 4]
    for h in logged:
        mine = [r["metrics"]["length"] for r in recs if r["step"] == h["step"]]
        assert h["cherry_pick/chat_test/length"] == pytest.approx(sum(mine) / len(mine))
    # the adapter moved away from the base model: the KL estimate is no longer 0 (a fresh LoRA adapter is the identity)
    assert abs(logged[-1]["cherry_pick/chat_test/kl_with_reference"]) > 1e-4
    # TensorBoard event files, read offline (transformers 5 has no logging_dir: they go to output_dir/runs/<time_host>)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ev = [EventAccumulator(str(p.parent)).Reload() for p in (tmp_path / "trainer").rglob("events.out.tfevents.*")]
    tags = {t: e for e in ev for t in e.Tags()["scalars"]}
    tag = "train/cherry_pick/chat_test/reward"
    assert tag in tags, sorted(tags)
    pts = tags[tag].Scalars(tag)
    assert [p.step for p in pts] == [2, 4]
    assert [p.value for p in pts] == pytest.approx([h["cherry_pick/chat_test/reward"] for h in logged], rel=1e-6)
    assert "train/cherry_pick/chat_test/kl_with_reference" in tags and "eval/loss" in tags


def test_second_evaluate_at_same_step_is_skipped(policy, tmp_path):
    from transformers import TrainerState, TrainerControl, TrainingArguments
    model, tok = policy
    cb = CherryPickCallback(_cp(n=4), tok, tmp_path)
    state = TrainerState(); state.global_step = 7
    args = TrainingArguments(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True)
    cb.on_evaluate(args, state, TrainerControl(), model=model)
    cb.on_evaluate(args, state, TrainerControl(), model=model)  # e.g. a second eval dataset at the same step
    assert len(read_review_store(tmp_path)) == 4 and len(cb.history) == 1


def test_compute_metrics_need_average_false_stores_but_does_not_log(tok):
    ans = [[{"content": "a b", "answer_token_ids": [1, 2], "sequence_score": -1.0}]]
    vals, avg, _ = compute_metrics([{"type": "length", "parameters": {"need_average": [False]}}, {"type": "perplexity"}], [[3]], ans, [None], tok)
    assert vals[0][0]["length"] == 2 and "length" not in avg
    assert avg["perplexity"] == pytest.approx(2.718281828 ** 0.5)  # exp(-(-1) / 2)


def test_settings_round_trip():
    """The Experiment stores cherry_pick_settings as JSON (model_dump) and loads them back: nothing is lost."""
    d = _cp(metrics=[{"type": "dist_n", "parameters": {"ngram": 2, "need_average": [True, False]}}, "self_bleu", "kl"],
            do_sample=True, num_return_sequences=3)
    s = load_settings(CherryPickSettings, d)
    back = load_settings(CherryPickSettings, json.loads(json.dumps(s.model_dump(mode="json", exclude_unset=True))))
    assert back == s and back.metric_settings[0].params.ngram == 2 and back.generator_transformers_settings.num_return_sequences == 3


# ---- classification and reward-model cherry-picks: scored, not generated ----

def _scored_settings(kind, tmp_path, cp_metrics=None):
    """A tiny classification (tiny Llama, 2-label head) or reward-model (1-label head) run through alignlab.run.train, with a
    cherry-pick set of its own kind: 4 steps, an evaluation every 2."""
    item, n_labels = {"classification": ("classification", 2), "pair_preferences": ("preferences", 1)}[kind]
    ds = lambda split, n, name=None: {"sources": [{"name": name or f"{item}-{split}", "records_path": str(zoo.get(item) / f"{split}.jsonl"),
                                                   "num_samples": n}], "dataset_type": kind, "max_tokens_count": 64}
    cp = {"dataset_settings": ds("val", 12, "held_out")}
    if cp_metrics is not None: cp["metric_settings"] = cp_metrics
    return {"log_path": str(tmp_path / "run"), "seed": 0,
            "model_settings": {"model_path": "tiny-llama", "model_type": "seq_cls", "model_kwargs": {"num_labels": n_labels},
                               "transformers_settings": {"torch_dtype": "float32"}},
            "train_dataset_settings": ds("train", 32), "val_dataset_settings": ds("val", 8),
            "trainer_settings": {"max_steps": 4, "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1,
                                 "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2, "logging_steps": 2, "learning_rate": 3e-3,
                                 "lr_scheduler_type": "constant", "load_best_model_at_end": False, "report_to": [], "disable_tqdm": True, "fp16": False},
            "cherry_pick_settings": cp}


def _probe(cp_dataset_settings):
    """A trainer callback that, at each evaluation, runs the model on every cherry-pick record one at a time (no batching, no
    padding) and keeps the raw outputs by step; independent of the cherry-pick code, which scores in padded batches."""
    from transformers import TrainerCallback
    from alignlab.datasets import build_dataset

    class Probe(TrainerCallback):
        def __init__(self): self.outputs, self.records, self.history = {}, None, None
        def on_evaluate(self, args, state, control, model=None, processing_class=None, **kw):
            if self.records is None:
                ds = build_dataset(cp_dataset_settings, processing_class)
                self.records = [ds[k] for k in range(len(ds))]
            was = model.training; model.eval()
            one = lambda ids: model(input_ids=torch.as_tensor(np.asarray(ids, np.int64))[None]).logits[0].float().numpy()
            with torch.no_grad():
                if "inputs_w" in self.records[0]:
                    out = np.array([[one(r["inputs_w"]["input_ids"])[0], one(r["inputs_l"]["input_ids"])[0]] for r in self.records])
                else: out = np.stack([one(r["input_ids"]) for r in self.records])
            model.train(was)
            self.outputs.setdefault(state.global_step, out)
        def on_train_end(self, args, state, control, **kw): self.history = list(state.log_history)
    return Probe()


def test_classification_cherry_picks_score_each_evaluation(tmp_path):
    from alignlab.run import train
    cfg = _scored_settings("classification", tmp_path)
    probe = _probe(cfg["cherry_pick_settings"]["dataset_settings"])
    train(cfg, progress=False, callbacks=[probe])
    labels = np.array([int(r["labels"]) for r in probe.records])
    ids = [r["id"] for r in probe.records]
    assert sorted(probe.outputs) == [2, 4] and len(ids) == 12
    logged = [h for h in probe.history if "cherry_pick/held_out/accuracy" in h]
    assert [h["step"] for h in logged] == [2, 4]
    store = read_review_store(tmp_path / "run")
    assert store.skipped == 0 and len(store) == 2 * 12 and sorted({r["step"] for r in store}) == [2, 4]
    for h in logged:
        out = probe.outputs[h["step"]]
        pred = out.argmax(-1)
        top2 = np.sort(out, -1)[:, -2:]
        near = np.abs(top2[:, 1] - top2[:, 0]) < 1e-4  # batched and unbatched forwards may order a near tie either way
        assert h["cherry_pick/held_out/accuracy"] == pytest.approx(np.mean(pred == labels), abs=near.mean() + 1e-9)
        recall = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
        if not near.any(): assert h["cherry_pick/held_out/balanced_accuracy"] == pytest.approx(np.mean(recall))
        assert {"cherry_pick/held_out/f1", "cherry_pick/held_out/precision", "cherry_pick/held_out/recall", "cherry_pick/held_out/roc_auc"} <= set(h)
        mine = {r["record_id"]: r for r in store if r["step"] == h["step"]}
        assert list(mine) == ids
        p = np.exp(out - out.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
        for k, rid in enumerate(ids):
            r = mine[rid]
            assert r["dataset"] == "held_out" and r["label"] == labels[k] and (near[k] or r["prediction"] == pred[k])
            assert r["probabilities"] == pytest.approx(p[k].tolist(), abs=1e-4)
            assert near[k] or r["metrics"] == {"accuracy": int(pred[k] == labels[k])}
            assert r["prompt"][-1]["role"] == "user" and isinstance(r["prompt"][-1]["content"], str)
    # training moved the head: the two evaluations saw different outputs
    assert not np.allclose(probe.outputs[2], probe.outputs[4])


def test_rm_cherry_picks_score_each_evaluation(tmp_path):
    from alignlab.run import train
    cfg = _scored_settings("pair_preferences", tmp_path, cp_metrics=[])  # turbo-alignment's RM configs have metric_settings: []
    probe = _probe(cfg["cherry_pick_settings"]["dataset_settings"])
    train(cfg, progress=False, callbacks=[probe])
    ids = [r["id"] for r in probe.records]
    logged = [h for h in probe.history if "cherry_pick/held_out/pair_accuracy" in h]
    assert [h["step"] for h in logged] == [2, 4] and len(ids) == 12
    store = read_review_store(tmp_path / "run")
    assert store.skipped == 0 and len(store) == 2 * 12
    for h in logged:
        w, l = probe.outputs[h["step"]].T
        ties = int(np.sum(np.abs(w - l) < 1e-4))  # batched and unbatched forwards may order a near tie either way
        assert h["cherry_pick/held_out/pair_accuracy"] == pytest.approx(np.mean(w > l), abs=ties / len(w) + 1e-9)
        assert h["cherry_pick/held_out/reward_margin"] == pytest.approx(np.mean(w - l), abs=1e-4)
        assert h["cherry_pick/held_out/reward_chosen"] == pytest.approx(np.mean(w), abs=1e-4)
        assert h["cherry_pick/held_out/reward_rejected"] == pytest.approx(np.mean(l), abs=1e-4)
        mine = {r["record_id"]: r for r in store if r["step"] == h["step"]}
        assert list(mine) == ids
        for k, rid in enumerate(ids):
            r = mine[rid]
            assert r["chosen_reward"] == pytest.approx(w[k], abs=1e-4) and r["rejected_reward"] == pytest.approx(l[k], abs=1e-4)
            assert r["metrics"]["reward_margin"] == pytest.approx(w[k] - l[k], abs=1e-4)
            if abs(w[k] - l[k]) >= 1e-4: assert r["metrics"]["pair_accuracy"] == int(w[k] > l[k])
            rec = next(x for x in map(json.loads, (zoo.get("preferences") / "val.jsonl").read_text().splitlines()) if x["id"] == rid)
            assert (r["chosen"], r["rejected"]) == (rec["answer_w"]["content"], rec["answer_l"]["content"])
            assert r["prompt"] == [{"role": m["role"], "content": m["content"]} for m in rec["context"]]
    assert not np.allclose(probe.outputs[2], probe.outputs[4])


def _one_line_error(cfg):
    from alignlab.run import ExperimentSettings
    with pytest.raises(SettingsError) as e: load_settings(ExperimentSettings, cfg)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_scored_cherry_picks_one_line_errors(tmp_path):
    cls, rm = _scored_settings("classification", tmp_path), _scored_settings("pair_preferences", tmp_path)
    chat_cp = _cp()
    # the cherry-pick data must be the training data's kind
    msg = _one_line_error({**cls, "cherry_pick_settings": chat_cp})
    assert msg == ("cherry_pick_settings.dataset_settings.dataset_type: 'chat', but classification data trains classification, "
                   "whose cherry-picks read classification data; expected 'classification'"), msg
    msg = _one_line_error({**rm, "cherry_pick_settings": cls["cherry_pick_settings"]})
    assert msg.startswith("cherry_pick_settings.dataset_settings.dataset_type: 'classification', but pair_preferences data trains rm") \
        and msg.endswith("expected 'pair_preferences'"), msg
    msg = _one_line_error({**cls, "cherry_pick_settings": {"dataset_settings": {**cls["cherry_pick_settings"]["dataset_settings"], "dataset_type": "sampling"}}})
    assert msg.startswith("cherry_pick_settings.dataset_settings.dataset_type: 'sampling' has no cherry-picks; expected one of"), msg
    # a metric that makes no sense for the kind: named, with the kind
    msg = _one_line_error({**cls, "cherry_pick_settings": {**cls["cherry_pick_settings"], "metric_settings": [{"type": "rouge"}]}})
    assert msg.startswith("cherry_pick_settings.metric_settings[0].type: 'rouge' makes no sense for classification cherry-picks") \
        and msg.endswith("expected 'accuracy'"), msg
    msg = _one_line_error({**rm, "cherry_pick_settings": {**rm["cherry_pick_settings"], "metric_settings": [{"type": "accuracy"}, {"type": "kl"}]}})
    assert msg.startswith("cherry_pick_settings.metric_settings[1].type: 'kl' makes no sense for pair_preferences cherry-picks"), msg
    # generation keys do nothing here: refused, not ignored
    msg = _one_line_error({**rm, "cherry_pick_settings": {**rm["cherry_pick_settings"], "generator_transformers_settings": {"max_new_tokens": 4}}})
    assert msg.startswith("cherry_pick_settings.generator_transformers_settings: pair_preferences cherry-picks score the records"), msg
    # and the chat cherry-picks of SFT still refuse a scoring kind for SFT data
    from alignlab.run import ExperimentSettings
    sft = {**cls, "model_settings": {"model_path": "tiny-llama", "model_type": "causal"},
           "train_dataset_settings": chat_cp["dataset_settings"], "val_dataset_settings": None}
    assert load_settings(ExperimentSettings, {**sft, "cherry_pick_settings": chat_cp}).cherry_pick_settings.kind == "chat"
    assert "expected 'chat'" in _one_line_error({**sft, "cherry_pick_settings": cls["cherry_pick_settings"]})


def test_scored_cherry_picks_check_the_model_and_labels(tmp_path):
    from types import SimpleNamespace
    from alignlab.models import load_model
    model, tok = load_model({"model_path": "tiny-llama", "model_type": "seq_cls", "model_kwargs": {"num_labels": 2},
                             "transformers_settings": {"torch_dtype": "float32"}})
    rec = lambda i, y: {"id": f"r{i}", "messages": [{"role": "user", "content": f"record {i}"}], "label": y}
    cp = lambda recs: {"dataset_settings": {"sources": [{"name": "h", "records_data": recs, "sample_rate": 1}], "dataset_type": "classification"}}
    with pytest.raises(SettingsError, match=r"cherry_pick_settings.dataset_settings \(h\): label 5 of record 'r1' is out of range for a "
                                            r"2-label model; expected labels 0..1"):
        CherryPickCallback(cp([rec(0, 1), rec(1, 5)]), tok, tmp_path).attach(SimpleNamespace(model=model))
    pairs = {"dataset_settings": {"sources": [{"name": "p", "records_path": str(zoo.get("preferences") / "val.jsonl"), "num_samples": 2}],
                                  "dataset_type": "pair_preferences"}}
    with pytest.raises(SettingsError, match="rm needs 1 output, the model has 2"):
        CherryPickCallback(pairs, tok, tmp_path).attach(SimpleNamespace(model=model))
    # without a trainer, run() checks the same and scores: the store gets one line per record
    cb = CherryPickCallback(cp([rec(0, 1), rec(1, 0), rec(2, 1)]), tok, tmp_path / "ok")
    logs = cb.run(model, step=7)
    recs = read_review_store(tmp_path / "ok")
    assert [r["record_id"] for r in recs] == ["r0", "r1", "r2"] and {r["step"] for r in recs} == {7}
    assert logs["cherry_pick/h/accuracy"] == pytest.approx(np.mean([r["prediction"] == r["label"] for r in recs]))
    assert cb.skipped == {} or all(k.startswith("h/") for k in cb.skipped)
