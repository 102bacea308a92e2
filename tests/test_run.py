"""One path from settings to a trained run: the CLI, the quickstart and `Experiment.fit` all train through `alignlab.run.train`."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after


def _adapter(d):
    from safetensors.torch import load_file
    return load_file(str(Path(d) / "final" / "adapter_model.safetensors"))


def _same(a, b) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_quickstart_and_experiment_give_identical_adapters(tmp_path):
    # one thread (the module's fixture): the CLI below runs with one thread too, and a thread count can change float sums
    from alignlab.quickstart import quickstart
    from alignlab.experiment import Experiment
    qs = quickstart(tmp_path / "qs", steps=6, progress=False, log=lambda *a: None)
    cfg = tmp_path / "qs" / "experiment.json"  # the settings the quickstart ran, as train wrote them
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "alignlab", "train_sft", "--experiment_settings_path", str(cfg), "--log_path",
                        str(tmp_path / "cli"), "--no_progress"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    fit = Experiment.from_settings(cfg).run_dir(tmp_path / "exp").fit(progress=False)
    a, b, c = _adapter(tmp_path / "qs"), _adapter(tmp_path / "cli"), _adapter(tmp_path / "exp")
    assert _same(a, b) and _same(a, c)
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert cli["objective"] == fit["objective"] == "sft" and cli["steps"] == fit["steps"] == qs["steps"] == 6
    assert cli["train_loss_last"] == fit["train_loss_last"] and round(fit["train_loss_last"], 4) == qs["last_loss"]
    # negative control: the comparison sees a difference when there is one (another seed, another LoRA initialization)
    Experiment.from_settings(cfg).run_dir(tmp_path / "seed1").seed(1).fit(progress=False)
    assert not _same(a, _adapter(tmp_path / "seed1"))


def test_every_door_reads_the_one_table():
    """The CLI's train and inference commands and the inference kinds come from RECIPES; a new row is a new command."""
    from alignlab.cli import parser
    from alignlab.recipes import RECIPES, recipe
    commands = set(parser()._subparsers._group_actions[0].choices)
    assert {r.command for r in RECIPES} <= commands
    assert {f"inference_{r.inference}" for r in RECIPES if r.inference} <= commands
    assert all(recipe(command=r.command) is r and recipe(dataset_type=r.dataset_type).dataset_type == r.dataset_type for r in RECIPES)


def test_fit_reuses_the_planned_datasets_and_trains_the_same(tmp_path, monkeypatch):
    """plan() tokenizes once; fit() trains on those datasets, with the same adapter as a fit that builds its own."""
    import alignlab.datasets
    from alignlab.quickstart import experiment
    planned = experiment(tmp_path / "a", steps=4)
    planned.plan()
    ds = planned._cache["ds"]
    builds = []
    real = alignlab.datasets.build_dataset  # run.train imports it from alignlab.datasets when it runs
    monkeypatch.setattr(alignlab.datasets, "build_dataset", lambda *a, **k: builds.append(k.get("name")) or real(*a, **k))
    a = planned.fit(progress=False)
    assert builds == []  # negative control below: a fit without plan() builds its own
    assert a["train_samples"] == len(ds[0])
    experiment(tmp_path / "b", steps=4).fit(progress=False)
    assert builds[:1] == ["train"]
    assert _same(_adapter(tmp_path / "a"), _adapter(tmp_path / "b"))


def _sft_cfg(run_dir, trainer_settings, num_samples=48):
    from alignlab import zoo
    tpl = {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
           "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n", "suffix_template": "<|eot_id|>"}
    return {"log_path": str(run_dir), "seed": 3,
            "model_settings": {"model_path": "tiny-llama", "model_type": "causal",
                               "peft_settings": {"name": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
            "train_dataset_settings": {"sources": [{"name": "train", "records_path": str(zoo.get("chat") / "train.jsonl"), "num_samples": num_samples}],
                                       "prompt_template": tpl, "dataset_type": "chat", "max_tokens_count": 64, "only_answer_loss": True},
            "trainer_settings": {"save_strategy": "no", "logging_steps": 1, "learning_rate": 1e-3, **trainer_settings}}


def test_training_budget_counts_as_the_trainer_does():
    """Rows per step = batch x accumulation x processes; an epoch is ceil(batches / accumulation) steps, its last one partial."""
    from alignlab.run import training_budget
    from alignlab.settings import load_settings
    from alignlab.train import TrainerSettings
    ts = lambda **kw: load_settings(TrainerSettings, kw)
    b = training_budget(ts(max_steps=400, per_device_train_batch_size=16, gradient_accumulation_steps=1), 2000)
    assert b["line"] == "training: 400 steps of 16 rows (16 per device × 1 accumulation × 1 process) = 6400 rows, 3.2 epochs of 2000 records"
    assert (b["rows_per_step"], b["steps"], b["rows"], b["epochs"], b["warnings"]) == (16, 400, 6400, 3.2, [])
    # the trap: accumulation inherited (32) under a batch and max_steps that were set
    b = training_budget(ts(max_steps=400, per_device_train_batch_size=16, learning_rate=5e-3), 2000)
    assert (b["rows_per_step"], b["rows"], b["epochs"]) == (512, 200_000, 100)
    assert len(b["warnings"]) == 1 and b["warnings"][0].startswith("trainer_settings.gradient_accumulation_steps: 32 inherited")
    assert "16 × 32 × 1 = 512 rows, not 16" in b["warnings"][0] and ".trainer(gradient_accumulation_steps=1)" in b["warnings"][0]
    # the same 32, set: no warning; nothing set at all: turbo's whole default run, its accumulation not warned about
    assert training_budget(ts(max_steps=400, per_device_train_batch_size=16, gradient_accumulation_steps=32), 2000)["warnings"] == []
    b = training_budget(ts(), 2000)
    assert (b["rows_per_step"], b["steps"], b["epochs"]) == (128, 48, 3)  # 16 steps an epoch (the last of 80 rows)
    assert not any("gradient_accumulation_steps" in w for w in b["warnings"])
    # epoch-based: 3 inherited epochs on a large set
    b = training_budget(ts(per_device_train_batch_size=8, gradient_accumulation_steps=1), 50_000)
    assert b["steps"] == 18_750 and b["warnings"][0].startswith("trainer_settings.num_train_epochs: 3 inherited")
    assert training_budget(ts(per_device_train_batch_size=8, gradient_accumulation_steps=1, num_train_epochs=3), 50_000)["warnings"] == []
    # processes multiply; a partial last step: 100 rows, 13 batches of 8 a process-pair, 7 steps an epoch
    b = training_budget(ts(max_steps=20, gradient_accumulation_steps=2, eval_steps=5, save_steps=5), 100, world_size=2)
    assert "(4 per device × 2 accumulation × 2 processes)" in b["line"]
    assert (b["rows_per_step"], b["rows"], b["epochs"], b["warnings"]) == (16, 296, round(2 + 12 / 13, 4), [])
    # a short run that inherits evaluation and checkpoints every 150 steps
    b = training_budget(ts(max_steps=20, gradient_accumulation_steps=1), 100)
    assert b["warnings"] == ["trainer_settings.eval_steps 150 and save_steps 150: inherited (turbo-alignment's defaults; not set), more "
                             "than the run's 20 steps: no evaluation and no checkpoint before the end. Set them: .trainer(eval_steps=10, save_steps=10)"]
    assert training_budget(ts(max_steps=20, gradient_accumulation_steps=1, save_strategy="no"), 100, evaluates=False)["warnings"] == []


def test_train_says_its_budget_once_and_keeps_it_in_the_summary(tmp_path, capsys, caplog):
    """The start of a run prints rows per step, steps and epochs once; the summary carries them, and they are the Trainer's."""
    import logging
    from alignlab.run import train
    # the trap: a batch and max_steps set, the accumulation inherited (32): 12 batches of 4 cover the 48 chats, one epoch a step
    with caplog.at_level(logging.WARNING, logger="alignlab.run"):
        s = train(_sft_cfg(tmp_path / "trap", {"max_steps": 2, "per_device_train_batch_size": 4}), progress=False)
    err = capsys.readouterr().err
    line = ("training: 2 steps of 128 rows (4 per device × 32 accumulation × 1 process; more than the 48 records, so a step reads "
            "at most one epoch) = 96 rows, 2 epochs of 48 records")
    assert err.count("training: ") == 1 and line in err, err[-2000:]
    warned = [r.getMessage() for r in caplog.records if "gradient_accumulation_steps" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("trainer_settings.gradient_accumulation_steps: 32 inherited")
    t = s["training"]
    assert (t["rows_per_step"], t["steps"], t["rows"], t["epochs"], t["train_rows"], t["line"]) == (128, 2, 96, 2, 48, line)
    assert (s["steps"], s["epochs"]) == (2, 2.0) and warned[0] in s["notes"]
    assert json.loads((tmp_path / "trap" / "summary.json").read_text())["training"] == t
    # said explicitly: no warning; 12 batches, 3 steps an epoch (5, 5, 2): 4 steps are 1 + 5/12 epochs, as the Trainer counts
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="alignlab.run"):
        s = train(_sft_cfg(tmp_path / "said", {"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 5}), progress=False)
    err = capsys.readouterr().err
    assert "training: 4 steps of 20 rows (4 per device × 5 accumulation × 1 process) = 68 rows, 1.42 epochs of 48 records" in err
    assert not [r for r in caplog.records if r.getMessage().startswith("trainer_settings.")]
    assert s["training"]["warnings"] == [] and (s["steps"], s["epochs"]) == (4, s["training"]["epochs"]) == (4, round(1 + 5 / 12, 4))
