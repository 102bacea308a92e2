"""The Experiment: two doors (fluent chain, guide JSON) to one run; the CLI train commands."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after

from alignlab import zoo
from alignlab.experiment import Experiment
from alignlab.run import ExperimentSettings
from alignlab.settings import SettingsError

TPL = {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
       "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n", "suffix_template": "<|eot_id|>"}


def sft_json(run_dir):
    chat = zoo.get("chat")
    return {"log_path": str(run_dir), "seed": 7,
            "model_settings": {"model_path": "tiny-llama", "model_type": "causal",
                               "peft_settings": {"name": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                                 "target_modules": ["q_proj", "v_proj"]}},
            "train_dataset_settings": {"sources": [{"name": "train", "records_path": str(chat / "train.jsonl"), "num_samples": 48}],
                                       "prompt_template": TPL, "dataset_type": "chat", "max_tokens_count": 96, "only_answer_loss": True},
            "val_dataset_settings": {"sources": [{"name": "val", "records_path": str(chat / "val.jsonl"), "num_samples": 8}],
                                     "prompt_template": TPL, "dataset_type": "chat", "max_tokens_count": 96},
            "trainer_settings": {"max_steps": 4, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                                 "learning_rate": 3e-3, "eval_strategy": "steps", "eval_steps": 4, "save_steps": 4,
                                 "logging_steps": 1, "lr_scheduler_type": "constant"}}


def fluent(run_dir):
    chat = zoo.get("chat")
    return (Experiment(run_dir=run_dir, seed=7)
            .model("tiny-llama")
            .chat_dataset(chat / "train.jsonl", val=chat / "val.jsonl", template=TPL, max_tokens_count=96, num_samples=48,
                          val_num_samples=8)
            .lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
            .trainer(max_steps=4, per_device_train_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-3,
                     eval_strategy="steps", eval_steps=4, save_steps=4, logging_steps=1, lr_scheduler_type="constant"))


def _adapter(d):
    from safetensors.torch import load_file
    return load_file(str(Path(d) / "final" / "adapter_model.safetensors"))


def test_fluent_chain_and_json_are_one_experiment(tmp_path):
    import torch
    a = fluent(tmp_path / "a")
    cfg = sft_json(tmp_path / "b")
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    b = Experiment.from_settings(tmp_path / "cfg.json")
    sa, sb = a.settings(), b.settings()
    assert sa.model_copy(update={"log_path": "x"}) == sb.model_copy(update={"log_path": "x"})
    ra, rb = a.fit(progress=False), b.fit(progress=False)
    assert ra["final_loss"] == rb["final_loss"] and ra["steps"] == rb["steps"] == 4
    assert ra["training"] == rb["training"] and ra["training"]["warnings"] == []  # the run summary carries the budget
    assert (ra["training"]["rows_per_step"], ra["training"]["rows"], ra["epochs"]) == (8, 32, ra["training"]["epochs"])
    wa, wb = _adapter(tmp_path / "a"), _adapter(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run directory keeps the settings it ran; they load back as the same experiment
    again = Experiment.from_settings(tmp_path / "a" / "experiment.json").settings()
    assert again == sa


def test_to_settings_round_trips_and_keeps_guide_keys():
    e = fluent("runs/x").cherry_picks({"dataset_settings": {"sources": [{"name": "cp", "records_path": str(zoo.get("chat") / "test.jsonl"), "num_samples": 4}],
                                                            "prompt_template": TPL, "dataset_type": "chat", "max_tokens_count": 96},
                                       "metric_settings": [{"type": "length", "parameters": {"need_average": [True]}}]})
    j = e.to_settings()
    assert {"model_settings", "train_dataset_settings", "val_dataset_settings", "trainer_settings", "cherry_pick_settings", "log_path", "seed"} <= set(j)
    assert Experiment.from_settings(j).to_settings() == j
    assert json.loads(json.dumps(j)) == j  # plain JSON


def test_settings_are_validated_when_set():
    with pytest.raises(SettingsError, match="lora_alpha"): Experiment().lora(r=4, alpha=8)
    with pytest.raises(SettingsError, match="num_train_epochs"): Experiment().trainer(num_train_epoch=1)
    with pytest.raises(SettingsError, match="model_type"):
        Experiment().model("tiny-llama", model_type="causal").classification_dataset("classification")
    e = Experiment().model("tiny-llama").chat_dataset("chat")
    before = e.to_settings()
    with pytest.raises(SettingsError): e.packing(True).cherry_picks({"metric_settings": []})
    with pytest.raises(SettingsError, match="model_settings: not set"): Experiment().chat_dataset("chat").settings()


def test_objective_follows_the_data():
    assert Experiment().model("tiny-llama").chat_dataset("chat").settings().objective == "sft"
    c = Experiment().model("tiny-llama-cls").classification_dataset("classification").settings()
    assert (c.objective, c.model_settings.model_type, c.model_settings.model_kwargs["num_labels"]) == ("classification", "seq_cls", 2)
    r = Experiment().model("tiny-llama").preference_dataset("preferences").settings()
    assert (r.objective, r.model_settings.model_type, r.model_settings.model_kwargs["num_labels"]) == ("rm", "seq_cls", 1)


def test_plan_shows_model_data_and_schedule_without_training(tmp_path):
    e = fluent(tmp_path / "run")
    p = e.plan()
    assert "trainable of" in p["parameters"] and p["parameters"].startswith("16,384 trainable")  # 4 layers x (q, v) x r=4 x (256 + 256)
    assert p["training"] == "4 steps of 8 rows (8 per device × 1 accumulation × 1 process) = 32 rows, 0.67 epochs of 48 records"
    assert p.warnings == [] and "warning" not in repr(p)  # the chain set its accumulation: nothing to warn about
    h = e._repr_html_()
    assert "Experiment plan" in h and 'class="tok loss"' in h  # the sample with its loss mask
    assert not (tmp_path / "run").exists()  # nothing ran, nothing written


def test_plan_names_an_inherited_accumulation():
    """.trainer(max_steps=400, per_device_train_batch_size=16) inherits turbo's accumulation of 32: the plan says 512 rows a step."""
    trap = Experiment().model("tiny-llama").chat_dataset("chat", max_tokens_count=256, val_num_samples=8)  # the 2000 training chats
    p = trap.trainer(max_steps=400, per_device_train_batch_size=16, learning_rate=5e-3).plan()
    assert p["train"].startswith("2000 samples")
    assert p["training"] == "400 steps of 512 rows (16 per device × 32 accumulation × 1 process) = 200000 rows, 100 epochs of 2000 records"
    assert len(p.warnings) == 1
    w = p.warnings[0]
    assert w.startswith("trainer_settings.gradient_accumulation_steps: 32 inherited") and "512 rows, not 16" in w
    assert ".trainer(gradient_accumulation_steps=1)" in w and f"warning: {w}" in repr(p) and "<b>warning</b>" in p._repr_html_()
    p = trap.trainer(gradient_accumulation_steps=1).plan()  # said explicitly: the run it reads as, no warning
    assert p["training"] == "400 steps of 16 rows (16 per device × 1 accumulation × 1 process) = 6400 rows, 3.2 epochs of 2000 records"
    assert p.warnings == [] and "warning" not in repr(p)


def _cli(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "alignlab", *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_trains_the_three_objectives(tmp_path):
    cls_data, prefs = zoo.get("classification"), zoo.get("preferences")
    base_tr = {"max_steps": 3, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-3,
               "eval_strategy": "no", "save_strategy": "no", "logging_steps": 1}
    cfgs = {
        "train_sft": sft_json(tmp_path / "sft"),
        "train_classification": {  # the guide's classification snippet: seq_cls, num_labels in model_kwargs, peft task SEQ_CLS
            "log_path": str(tmp_path / "cls"),
            "model_settings": {"model_path": "tiny-llama-cls", "model_type": "seq_cls",
                               "model_kwargs": {"num_labels": 2, "return_dict": True, "problem_type": "single_label_classification"},
                               "peft_settings": {"name": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "train_dataset_settings": {"sources": [{"name": "train", "records_path": str(cls_data / "train.jsonl"), "num_samples": 32}],
                                       "prompt_template": TPL, "dataset_type": "classification", "max_tokens_count": 64},
            "trainer_settings": {**base_tr, "loss_settings": {"alpha": "auto", "gamma": 2.0}}},
        "train_rm": {  # the guide's RM snippet: add_labels false, pair_preferences, seq_cls with num_labels 1
            "log_path": str(tmp_path / "rm"),
            "model_settings": {"model_path": "tiny-llama", "model_type": "seq_cls", "num_labels": 1,
                               "peft_settings": {"name": "LORA", "task_type": "SEQ_CLS", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "train_dataset_settings": {"sources": [{"name": "train", "records_path": str(prefs / "train.jsonl"), "num_samples": 32}],
                                       "prompt_template": TPL, "add_labels": False, "dataset_type": "pair_preferences", "max_tokens_count": 96},
            "trainer_settings": base_tr},
    }
    cfgs["train_sft"]["trainer_settings"] = {**base_tr}
    for cmd, cfg in cfgs.items():
        path = tmp_path / f"{cmd}.json"; path.write_text(json.dumps(cfg))
        r = _cli(cmd, "--experiment_settings_path", str(path), "--no_progress")
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
        out = Path(cfg["log_path"])
        assert (out / "final" / "adapter_config.json").exists() and (out / "summary.json").exists(), cmd
        s = json.loads((out / "summary.json").read_text())
        assert s["steps"] == 3 and s["objective"] == {"train_sft": "sft", "train_classification": "classification", "train_rm": "rm"}[cmd]


def test_cli_bad_settings_are_one_line_errors(tmp_path):
    cfg = sft_json(tmp_path / "run")
    cfg["trainer_settings"]["lerning_rate"] = 1e-3
    p = tmp_path / "bad.json"; p.write_text(json.dumps(cfg))
    r = _cli("train_sft", "--experiment_settings_path", str(p))
    assert r.returncode == 2 and "did you mean 'learning_rate'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    good = tmp_path / "good.json"; good.write_text(json.dumps(sft_json(tmp_path / "run")))
    r = _cli("train_rm", "--experiment_settings_path", str(good))
    assert r.returncode == 2 and "'pair_preferences'" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("train_sft", "--experiment_settings_path", str(tmp_path / "missing.json"))
    assert r.returncode == 2 and "no such settings file" in r.stderr


def test_fit_in_jupyter_shows_a_progress_bar_and_a_live_loss_plot(tmp_path):
    """A real Jupyter kernel (ipykernel through nbclient): the notebook progress bar and the loss plot redrawn in place."""
    import nbformat
    from nbclient import NotebookClient
    cfg = sft_json(tmp_path / "run")
    cfg["val_dataset_settings"] = None
    cfg["trainer_settings"] = {**cfg["trainer_settings"], "eval_strategy": "no", "save_strategy": "no", "max_steps": 3}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import torch; torch.set_num_threads(1)\n"
        "from alignlab.experiment import Experiment\n"
        f"summary = Experiment.from_settings({str(tmp_path / 'cfg.json')!r}).fit()\n"
        "summary['steps']")])
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = nb.cells[0].outputs
    kinds = [o.get("data", {}).keys() for o in outs if o.output_type in ("display_data", "execute_result")]
    assert any("image/png" in k for k in kinds), [o.output_type for o in outs]  # the live plot, last redraw
    assert any("application/vnd.jupyter.widget-view+json" in k or "text/html" in k for k in kinds)  # transformers' notebook progress bar
    assert outs[-1].output_type == "execute_result" and outs[-1]["data"]["text/plain"] == "3"


def test_packing_through_the_experiment(tmp_path):
    e = (Experiment(run_dir=tmp_path / "run").model("tiny-llama").chat_dataset("chat", max_tokens_count=128, num_samples=64, val_num_samples=8)
         .lora(r=4).packing()
         .trainer(max_steps=2, per_device_train_batch_size=4, gradient_accumulation_steps=1, save_strategy="no", eval_strategy="no"))
    p = e.plan()
    assert p.notes[0].startswith("packing: 64 chats in ") and "of 4 rows" in p["training"]
    assert p["validation"].startswith("8 samples")  # a zoo dataset brings its val split
    s = e.fit(progress=False)
    assert s["steps"] == 2 and any("PackedDataset: 64 samples" in n for n in s["notes"])
    with pytest.raises(SettingsError, match="packing"):
        Experiment().model("tiny-llama-cls").classification_dataset("classification").packing()


def test_cherry_picks_through_the_experiment_land_in_the_store(tmp_path):
    from alignlab.review_store import read_review_store
    cp = {"dataset_settings": {"sources": [{"name": "cp", "records_path": str(zoo.get("chat") / "test.jsonl"), "num_samples": 4}],
                               "prompt_template": TPL, "dataset_type": "chat", "max_tokens_count": 96},
          "metric_settings": [{"type": "length", "parameters": {"need_average": [True]}}, {"type": "accuracy"}, {"type": "perplexity"}],
          "generator_transformers_settings": {"max_new_tokens": 8}}
    s = fluent(tmp_path / "run").trainer(max_steps=4, eval_steps=2, save_steps=2).cherry_picks(cp).fit(progress=False)
    recs = read_review_store(tmp_path / "run")
    assert sorted({r["step"] for r in recs}) == [2, 4] and len(recs) == 8  # 4 prompts x 1 answer x 2 evaluations
    assert all({"length", "accuracy", "perplexity"} <= set(r["metrics"]) for r in recs), recs[0]
    logged = [h for h in json.loads((tmp_path / "run" / "trainer" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
              if any(k.startswith("cherry_pick/") for k in h)]
    assert [h["step"] for h in logged] == [2, 4]


@pytest.mark.parametrize("method,kw", [("lora", {"r": 4}), ("prefix_tuning", {"num_virtual_tokens": 8}),
                                       ("p_tuning", {"num_virtual_tokens": 8}), ("prompt_tuning", {"num_virtual_tokens": 8}), (None, {})])
def test_plan_counts_parameters_as_the_loaded_model_has_them(method, kw):
    """Counted on the meta device (no weights read), with new tokens; equal to what load_model builds."""
    from alignlab.models import load_model
    e = (Experiment().model("tiny-llama").chat_dataset("chat", max_tokens_count=64, num_samples=8)
         .new_tokens({"<doc_sep>": "<|eot_id|>", "<x>": "the best bot"}))
    if method: e = getattr(e, method)(**kw)
    m, _ = load_model(e.settings().model_settings)
    t, n = m.get_nb_trainable_parameters() if method else (sum(p.numel() for p in m.parameters() if p.requires_grad), sum(p.numel() for p in m.parameters()))
    assert e.plan()["parameters"].startswith(f"{t:,} trainable of {n:,}")


def test_plan_counts_a_classifier_head():
    from alignlab.models import load_model
    e = Experiment().model("tiny-llama-cls").classification_dataset("classification", num_samples=8).lora(r=4)
    m, _ = load_model(e.settings().model_settings)
    t, n = m.get_nb_trainable_parameters()
    assert e.plan()["parameters"].startswith(f"{t:,} trainable of {n:,}")
