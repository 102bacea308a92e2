"""One path from settings to a trained run: the CLI, the quickstart and `Experiment.fit` all train through `alignlab.run.train`."""
import json, os, subprocess, sys
from pathlib import Path


def _adapter(d):
    from safetensors.torch import load_file
    return load_file(str(Path(d) / "final" / "adapter_model.safetensors"))


def _same(a, b) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_quickstart_and_experiment_give_identical_adapters(tmp_path):
    import torch
    torch.set_num_threads(1)  # the CLI below runs with one thread too: a thread count can change float sums
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
    import torch
    torch.set_num_threads(1)
    import alignlab.data
    from alignlab.quickstart import experiment
    planned = experiment(tmp_path / "a", steps=4)
    planned.plan()
    ds = planned._cache["ds"]
    builds = []
    real = alignlab.data.build_dataset  # run.train imports it from alignlab.data when it runs
    monkeypatch.setattr(alignlab.data, "build_dataset", lambda *a, **k: builds.append(k.get("name")) or real(*a, **k))
    a = planned.fit(progress=False)
    assert builds == []  # negative control below: a fit without plan() builds its own
    assert a["train_samples"] == len(ds[0])
    experiment(tmp_path / "b", steps=4).fit(progress=False)
    assert builds[:1] == ["train"]
    assert _same(_adapter(tmp_path / "a"), _adapter(tmp_path / "b"))
