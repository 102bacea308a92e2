"""`accelerate launch --num_processes 2` runs alignlab SFT on a CPU box: two gloo ranks, one process group, one final adapter."""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest

SCRIPT = Path(__file__).parent/"scripts"/"train_sft.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_accelerate_two_cpu_processes(tmp_path):
    accelerate = Path(sys.executable).parent/"accelerate"
    if not accelerate.exists(): pytest.fail("accelerate CLI not installed next to this python")
    run = tmp_path/"run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HOME=str(tmp_path/"hf"))  # no user accelerate config is read
    env.setdefault("ALIGNLAB_HOME", "/tmp/alhome1")
    # `--multi_gpu` is accelerate's torchrun-style multi-process launcher; on a machine without GPUs alignlab's
    # use_cpu default makes each rank join a gloo process group (accelerate's MULTI_CPU); `--cpu` would start ONE process.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPT), str(run), "--steps", "12", "--save_steps", "6", "--batch", "4", "--dropout", "0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "RANK 0 of 2 done, steps 12" in out and "RANK 1 of 2 done, steps 12" in out, out[-3000:]
    summary = json.loads((run/"train_summary.json").read_text())  # written by rank 0
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["epochs"] == pytest.approx(12 * 4 * 2 / 200)  # each step consumed 2 ranks x 4 samples
    final = run/"final"
    assert (final/"adapter_model.safetensors").exists() and not (run/".final.tmp").exists()
    ck = run/"trainer"/"checkpoint-12"
    assert (ck/"rng_state_0.pth").exists() and (ck/"rng_state_1.pth").exists()  # both ranks wrote their part
    assert (ck/"alignlab_checkpoint.json").exists()  # ... before the marker, which rank 0 wrote once


def _configs(tmp_path):
    "One small guide-style train config per objective of the table (recipes.RECIPES)."
    from alignlab import zoo
    from alignlab.recipes import RECIPES
    tpl = {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
           "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n", "suffix_template": "<|eot_id|>"}
    from alignlab.preferences import unpair
    kto = tmp_path / "kto" / "train.jsonl"  # the zoo's pairs as unpaired kto records
    kto.parent.mkdir(parents=True, exist_ok=True)
    kto.write_text("\n".join(json.dumps(r) for r in unpair(json.loads(l) for l in (zoo.get("preferences") / "train.jsonl").read_text().splitlines()[:16])))
    data = {"chat": ("chat", {}), "classification": ("classification", {}), "pair_preferences": ("preferences", {"add_labels": False}), "kto": (kto.parent, {})}
    models = {"sft": {"model_path": "tiny-llama", "model_type": "causal"},
              "classification": {"model_path": "tiny-llama-cls", "model_type": "seq_cls", "num_labels": 2},
              "rm": {"model_path": "tiny-llama", "model_type": "seq_cls", "num_labels": 1},
              "dpo": {"model_path": "tiny-llama", "model_type": "causal"}, "kto": {"model_path": "tiny-llama", "model_type": "causal"}}
    own = {"dpo": {"loss_settings": {"loss_type": "sigmoid", "beta": 0.1}}, "kto": {"beta": 0.1}}  # their trainer_settings' own keys
    out = {}
    for r in RECIPES:
        if r.name in ("rag", "multimodal"): continue  # tested single-process only (tests/test_rag.py, tests/test_multimodal.py): not yet under two ranks
        item, extra = data[r.dataset_type]
        lora = {"name": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
                **({"task_type": "SEQ_CLS"} if r.model_type == "seq_cls" else {})}
        out[r.command] = {
            "log_path": str(tmp_path / r.name), "seed": 3, "model_settings": {**models[r.name], "peft_settings": lora},
            "train_dataset_settings": {"sources": [{"name": "train", "records_path": str((zoo.get(item) if isinstance(item, str) else item) / "train.jsonl"),
                                                    "num_samples": 32}],
                                       "prompt_template": tpl, "dataset_type": r.dataset_type, "max_tokens_count": 96, **extra},
            "trainer_settings": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_strategy": "no",
                                 "logging_steps": 1, "disable_tqdm": True, **own.get(r.name, {})}}
    return out


def test_accelerate_two_cpu_processes_train_every_objective_through_the_recipe_path(tmp_path):
    """`accelerate launch -m alignlab train_<objective>`: the CLI's one path (alignlab.run.train) on two gloo ranks."""
    accelerate = Path(sys.executable).parent/"accelerate"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HOME=str(tmp_path/"hf"))
    env.setdefault("ALIGNLAB_HOME", "/tmp/alhome1")
    for cmd, cfg in _configs(tmp_path).items():
        path = tmp_path/f"{cmd}.json"; path.write_text(json.dumps(cfg))
        r = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                            "-m", "alignlab", cmd, "--experiment_settings_path", str(path), "--no_progress"],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (cmd, (r.stdout + r.stderr)[-3000:])
        s = json.loads((Path(cfg["log_path"])/"summary.json").read_text())
        assert s["world_size"] == 2 and s["steps"] == 3 and s["objective"] == cmd.removeprefix("train_"), (cmd, s)
        assert (Path(cfg["log_path"])/"final"/"adapter_model.safetensors").exists(), cmd


def test_deepspeed_and_fsdp_keys_reach_training_arguments():
    """The pass-through: what the guide's trainer_settings say about DeepSpeed / FSDP is what TrainingArguments gets."""
    from alignlab.run import ExperimentSettings
    from alignlab.settings import load_settings
    ds = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}
    cfg = _configs(Path("/tmp/unused"))["train_sft"]
    for extra in ({"deepspeed": ds}, {"fsdp": "full_shard auto_wrap", "fsdp_config": {"min_num_params": 1000}}):
        s = load_settings(ExperimentSettings, {**cfg, "trainer_settings": {**cfg["trainer_settings"], **extra}})
        kw = s.trainer_settings.hf_kwargs()
        assert all(kw[k] == v for k, v in extra.items()), (extra, kw)
