import subprocess, sys


def _run(*args, **kw):
    return subprocess.run([sys.executable, "-m", "alignlab", *args], capture_output=True, text=True, timeout=120, **kw)


def test_help_lists_commands_and_imports_nothing_heavy():
    r = _run("--help")
    assert r.returncode == 0 and "quickstart" in r.stdout and "zoo" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import sys, alignlab, alignlab.cli; print(sorted(m for m in ('torch','transformers','peft','panel') if m in sys.modules))"],
                       capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout


def test_console_script_is_installed():
    import shutil
    exe = shutil.which("alignlab")
    assert exe, "pip install -e . registers the alignlab command"
    assert subprocess.run([exe, "--help"], capture_output=True).returncode == 0


def test_bad_input_is_one_line_and_non_zero():
    r = _run("zoo", "card", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown zoo item 'nope'" in r.stderr


def test_zoo_list_and_path(tiny_llama):
    r = _run("zoo", "list")
    assert "tiny-llama" in r.stdout and "built" in r.stdout
    assert _run("zoo", "path", "tiny-llama").stdout.strip() == str(tiny_llama)


def test_merge_command_reports_bad_settings_in_one_line(tmp_path):
    cfg = tmp_path / "merge.json"
    cfg.write_text('{"model_settings": {"model_path": "/no/such/model"}, "adapter_path": "/no/adapter", "save_path": "%s"}' % (tmp_path / "out"))
    r = _run("merge_adapters_to_base", "--settings_path", str(cfg))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "model_path" in r.stderr or "/no/such/model" in r.stderr


def test_inference_commands_chain_train_generate_score(tmp_path):
    """train_sft -> inference_chat (model + adapter) -> inference_rm on its output: the guide's loop, through the CLI."""
    import json
    from alignlab import zoo
    from alignlab.data import chat_settings
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    chat = zoo.get("chat")
    train = {"log_path": str(tmp_path / "sft"), "seed": 1,
             "model_settings": {"model_path": "tiny-llama", "peft_settings": {"name": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"]}},
             "train_dataset_settings": {**chat_settings(chat / "train.jsonl", 96), "sources": [{"name": "t", "records_path": str(chat / "train.jsonl"), "num_samples": 16}]},
             "trainer_settings": {"max_steps": 2, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "save_strategy": "no"}}
    (tmp_path / "train.json").write_text(json.dumps(train))
    r = _run("train_sft", "--experiment_settings_path", str(tmp_path / "train.json"), "--no_progress", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    ds = {**chat_settings(chat / "test.jsonl", 96), "sources": [{"name": "test", "records_path": str(chat / "test.jsonl"), "num_samples": 4}]}
    gen = [{"transformers_settings": {"max_new_tokens": 6, "stop_strings": ["<|eot_id|>", "."]}, "custom_settings": {"batch": 4}}]
    inf = {"inference_settings": [{"model_settings": {"model_path": "tiny-llama", "adapter_path": str(tmp_path / "sft" / "final")},
                                   "generation_settings": gen}],
           "dataset_settings": ds, "save_path": str(tmp_path / "gen")}
    (tmp_path / "inf.json").write_text(json.dumps(inf))
    r = _run("inference_chat", "--inference_settings_path", str(tmp_path / "inf.json"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((tmp_path / "gen" / "info.json").read_text())
    (name, entry), = info.items()
    rows = [json.loads(l) for l in (tmp_path / "gen" / name).read_text().splitlines()]
    assert entry["complete"] and entry["records"] == len(rows) == 4 and all(len(x["answers"]) == 1 for x in rows)
    rm = {"inference_settings": [{"model_settings": {"model_path": "tiny-llama", "model_type": "seq_cls", "num_labels": 1}}],
          "dataset_settings": {**ds, "dataset_type": "sampling", "sources": [{"name": "gen", "records_path": str(tmp_path / "gen" / name), "sample_rate": 1}]},
          "save_path": str(tmp_path / "rm")}
    (tmp_path / "rm.json").write_text(json.dumps(rm))
    r = _run("inference_rm", "--inference_settings_path", str(tmp_path / "rm.json"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "rm" / "info.json").read_text())
    scored = [json.loads(l) for l in (tmp_path / "rm" / next(iter(out))).read_text().splitlines()]
    assert len(scored) == 4 and all(set(x["rewards"]) == {a["id"] for a in x["answers"]} for x in scored)
    # wrong command for the data: one line, exit 2
    r = _run("inference_classification", "--inference_settings_path", str(tmp_path / "inf.json"), env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "expects 'classification'" in r.stderr, r.stderr
