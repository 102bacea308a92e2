"""turbo-alignment-style configs, written as turbo's own test fixtures are (relative paths from the working directory,
`<RS>{role}` ... `</RS>` tags added as special tokens, `special_tokens_settings`, `evaluation_strategy`, `no_cuda`,
`logging_settings`), run unchanged apart from the paths: train SFT / classification / RM, then chat, classification and RM
inference on what was trained, and the adapter merge — all through the CLI, as a turbo user runs them."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

TAGS = {"role_tag_mapping": {"bot": "<bot>", "user": "<user>", "system": "<system>"}, "prefix_template": "<RS>{role}", "suffix_template": "</RS>"}
INIT = {"<RS>": "<|begin_of_text|>", "</RS>": "<|end_of_text|>", "<bot>": "the best bot ever", "<user>": "the user", "<system>": "the system"}
SPECIAL = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
TRAINER = {"evaluation_strategy": "steps", "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 1,
           "eval_steps": 2, "save_steps": 2, "logging_steps": 1, "learning_rate": 0.0003, "num_train_epochs": 1, "max_steps": 4,
           "lr_scheduler_type": "cosine", "warmup_steps": 1, "fp16": False, "bf16": False, "optim": "adamw_torch", "save_total_limit": 1,
           "no_cuda": True}
LOGGING = {"project_name": "alignment", "run_name": "turbo-style", "entity": "turbo-alignment"}
MODEL = "tests/fixtures/models/llama2_tiny"

def _src(name, path, n): return [{"name": name, "records_path": path, "num_samples": n}]

def _run(cwd, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "alignlab", *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)

@pytest.fixture(scope="module")
def turbo_tree(tmp_path_factory):
    "A working directory laid out like turbo-alignment's repository: tests/fixtures/{models,datasets}."
    from alignlab import zoo
    root = tmp_path_factory.mktemp("turbo")
    models, data = root / "tests/fixtures/models", root / "tests/fixtures/datasets"
    models.mkdir(parents=True)
    shutil.copytree(zoo.get("tiny-llama"), models / "llama2_tiny")
    for kind, item, name, n in (("chat", "chat", "train_chat.jsonl", 16), ("rm", "preferences", "train_preferences.jsonl", 16),
                                ("classification", "classification", "train_classification.jsonl", 16)):
        (data / kind).mkdir(parents=True, exist_ok=True)
        lines = (zoo.get(item) / "train.jsonl").read_text().splitlines()[:n]
        (data / kind / name).write_text("\n".join(lines) + "\n")
    return root

def _write(root, rel, cfg):
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(cfg, indent=2))
    return rel

def _train(root, command, rel, cfg):
    r = _run(root, command, "--experiment_settings_path", _write(root, rel, cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    return r

def _final(root, log_path): return root / log_path / "final"


def sft_config():
    chat = "tests/fixtures/datasets/chat/train_chat.jsonl"
    ds = lambda n: {"sources": _src("chat_test", chat, n), "prompt_template": TAGS, "dataset_type": "chat", "max_tokens_count": 64, "only_answer_loss": True}
    return {"train_dataset_settings": ds(12), "val_dataset_settings": ds(4),
            "model_settings": {"model_path": MODEL, "model_type": "causal", "transformers_settings": {}, "resize_token_embeddings": True,
                               "embeddings_initialization_strategy": INIT,
                               "peft_settings": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"],
                                                 "task_type": "CAUSAL_LM", "modules_to_save": ["embed_tokens", "lm_head"]}},
            "cherry_pick_settings": {"generator_transformers_settings": {"num_beams": 1, "do_sample": False, "stop_strings": "</RS>", "max_new_tokens": 8},
                                     "custom_generation_settings": {"skip_special_tokens": False},
                                     "dataset_settings": {**ds(2), "max_tokens_count": 150},
                                     "metric_settings": [{"type": "length", "parameters": {"need_average": [True]}}]},
            "tokenizer_settings": {}, "special_tokens_settings": SPECIAL, "trainer_settings": TRAINER, "logging_settings": LOGGING,
            "log_path": "test_llama_sft_output"}


def test_turbo_sft_then_chat_inference_and_merge(turbo_tree):
    root = turbo_tree
    _train(root, "train_sft", "tests/fixtures/configs/train/sft/base.json", sft_config())
    final = _final(root, "test_llama_sft_output")
    assert (final / "adapter_model.safetensors").exists()
    inf = {"inference_settings": [{"model_settings": {"model_path": MODEL, "adapter_path": str(final.relative_to(root)), "model_type": "causal",
                                                      "transformers_settings": {}, "embeddings_initialization_strategy": INIT},
                                   "tokenizer_settings": {"use_fast": False}, "special_tokens_settings": SPECIAL,
                                   "generation_settings": [{"transformers_settings": {"num_beams": 1, "max_new_tokens": 8, "repetition_penalty": 1.02,
                                                                                     "stop_strings": "</RS>", "do_sample": False},
                                                            "custom_settings": {"skip_special_tokens": False}}],
                                   "use_vllm": False, "batch": 1, "micro_batch": 1}],
           "dataset_settings": {"sources": _src("chat_test", "tests/fixtures/datasets/chat/train_chat.jsonl", 3), "prompt_template": TAGS,
                                "dataset_type": "chat", "max_tokens_count": 150},
           "save_path": "test_inference_chat_output"}
    r = _run(root, "inference_chat", "--inference_settings_path", _write(root, "tests/fixtures/configs/inference/sft/base.json", inf))
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "test_inference_chat_output"
    (name, entry), = json.loads((out / "info.json").read_text()).items()
    rows = [json.loads(l) for l in (out / name).read_text().splitlines()]
    assert entry["complete"] and len(rows) == 3 and all(len(x["answers"]) == 1 for x in rows)
    merge = {"model_settings": {"model_path": MODEL, "model_type": "causal", "transformers_settings": {}, "embeddings_initialization_strategy": INIT},
             "tokenizer_settings": {}, "special_tokens_settings": SPECIAL, "adapter_path": str(final.relative_to(root)), "save_path": "test_merge_output"}
    r = _run(root, "merge_adapters_to_base", "--settings_path", _write(root, "tests/fixtures/configs/utils/merge/merge.json", merge))
    assert r.returncode == 0, r.stderr[-3000:]
    assert any((root / "test_merge_output").glob("*.safetensors"))


def test_turbo_classification_then_inference(turbo_tree):
    root = turbo_tree
    cls = "tests/fixtures/datasets/classification/train_classification.jsonl"
    chat = {"prompt_template": TAGS, "max_tokens_count": 64, "only_answer_loss": False}  # turbo nests the chat part of a classification dataset
    ds = lambda n: {"sources": _src("classification_test", cls, n), "chat_settings": chat, "dataset_type": "classification"}
    cfg = {"train_dataset_settings": ds(12), "val_dataset_settings": ds(4),
           "model_settings": {"model_path": MODEL, "model_type": "seq_cls", "model_kwargs": {"num_labels": 2, "problem_type": "single_label_classification"},
                              "transformers_settings": {}, "embeddings_initialization_strategy": INIT,
                              "peft_settings": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}},
           "tokenizer_settings": {}, "special_tokens_settings": SPECIAL,
           "trainer_settings": {**TRAINER, "loss_settings": {"alpha": [1.0, 1.0], "gamma": 2.0}}, "logging_settings": LOGGING,
           "log_path": "test_classification_output"}
    _train(root, "train_classification", "tests/fixtures/configs/train/classification/base.json", cfg)
    final = _final(root, "test_classification_output")
    inf = {"inference_settings": [{"model_settings": {"model_path": MODEL, "adapter_path": str(final.relative_to(root)), "model_type": "seq_cls",
                                                      "model_kwargs": {"num_labels": 2}, "transformers_settings": {}, "embeddings_initialization_strategy": INIT},
                                   "tokenizer_settings": {}, "special_tokens_settings": SPECIAL, "batch": 1, "micro_batch": 1}],
           "dataset_settings": ds(4), "save_path": "test_inference_classification_output"}
    r = _run(root, "inference_classification", "--inference_settings_path", _write(root, "tests/fixtures/configs/inference/classification/base.json", inf))
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "test_inference_classification_output"
    (name, _), = json.loads((out / "info.json").read_text()).items()
    rows = [json.loads(l) for l in (out / name).read_text().splitlines()]
    assert len(rows) == 4 and all(x["predicted_label"] in (0, 1) for x in rows)


def test_turbo_rm_then_rm_inference(turbo_tree):
    root = turbo_tree
    prefs = "tests/fixtures/datasets/rm/train_preferences.jsonl"
    ds = lambda n: {"sources": _src("rm_test", prefs, n), "chat_settings": {"prompt_template": TAGS, "max_tokens_count": 64},
                    "add_labels": True, "dataset_type": "pair_preferences"}
    cfg = {"train_dataset_settings": ds(12), "val_dataset_settings": ds(4),
           "model_settings": {"model_path": MODEL, "model_type": "seq_cls", "model_kwargs": {"num_labels": 1}, "transformers_settings": {},
                              "embeddings_initialization_strategy": INIT,
                              "peft_settings": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"}},
           "tokenizer_settings": {}, "special_tokens_settings": SPECIAL, "trainer_settings": TRAINER, "logging_settings": LOGGING,
           "log_path": "test_rm_output"}
    _train(root, "train_rm", "tests/fixtures/configs/train/rm/base.json", cfg)
    final = _final(root, "test_rm_output")
    # the sampling records RM inference scores: a context and several answers
    recs = [{"id": f"s{i}", "dataset_name": "sampling", "messages": [{"role": "user", "content": "Name the category of the red fox."}],
             "answers": [{"id": "a", "content": "It is an animal."}, {"id": "b", "content": "It is a food."}]} for i in range(3)]
    (root / "tests/fixtures/datasets/sampling").mkdir(parents=True, exist_ok=True)
    (root / "tests/fixtures/datasets/sampling/inference_out.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    inf = {"inference_settings": [{"model_settings": {"model_path": MODEL, "adapter_path": str(final.relative_to(root)), "model_type": "seq_cls",
                                                      "model_kwargs": {"num_labels": 1}, "transformers_settings": {}, "embeddings_initialization_strategy": INIT},
                                   "tokenizer_settings": {}, "special_tokens_settings": SPECIAL, "batch": 1, "micro_batch": 1}],
           "dataset_settings": {"sources": [{"name": "sampling", "records_path": "tests/fixtures/datasets/sampling/inference_out.jsonl", "sample_rate": 1}],
                                "chat_dataset": {"prompt_template": TAGS, "max_tokens_count": 64}, "dataset_type": "sampling"},
           "save_path": "test_inference_rm_output"}
    r = _run(root, "inference_rm", "--inference_settings_path", _write(root, "tests/fixtures/configs/inference/rm/base.json", inf))
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "test_inference_rm_output"
    (name, _), = json.loads((out / "info.json").read_text()).items()
    rows = [json.loads(l) for l in (out / name).read_text().splitlines()]
    assert len(rows) == 3 and all(set(x["rewards"]) == {"a", "b"} for x in rows)
