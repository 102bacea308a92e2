"""Inference pipelines: several models x several generation settings, outputs that feed the next step, classification and
reward inference, and bad input."""
import json
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after

from alignlab import zoo
from alignlab.datasets import build_dataset
from alignlab.inference import run_inference, OutputLog, check_adapter_fits, _meta_model
from alignlab.settings import SettingsError
from alignlab.data import chat_settings


def _chat(n=6):
    st = chat_settings(zoo.get("chat") / "test.jsonl")
    st["sources"][0] = {**st["sources"][0], "sample_rate": None, "num_samples": n}
    return st


F32 = {"transformers_settings": {"torch_dtype": "float32"}}  # scores are compared to float32 forward passes (the default is turbo's bfloat16)
GREEDY = {"transformers_settings": {"max_new_tokens": 8, "do_sample": False}}  # turbo's default samples
SAMPLED = {"transformers_settings": {"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 2}, "custom_settings": {"batch": 3}}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                        LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.mul_(4.0)
    out = tmp_path_factory.mktemp("adapter"); pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, adapter):
    save = tmp_path_factory.mktemp("chat")
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}, "generation_settings": [GREEDY, SAMPLED]},
                                  {"model_settings": {**F32, "model_path": "tiny-llama", "adapter_path": str(adapter)},
                                   "generation_settings": [GREEDY]}],
           "dataset_settings": _chat(6), "save_path": str(save), "seed": 3}
    (save.parent / "cfg.json").write_text(json.dumps(cfg))
    return run_inference(save.parent / "cfg.json", "chat"), cfg


def _rows(p): return [json.loads(l) for l in p.read_text().splitlines()]


def test_one_file_per_model_and_generation(chat_run):
    out, cfg = chat_run
    info = json.loads((out / "info.json").read_text())
    assert sorted(info) == ["chat_m0_g0.jsonl", "chat_m0_g1.jsonl", "chat_m1_g0.jsonl"]
    assert info["chat_m1_g0.jsonl"]["model_settings"]["adapter_path"] == cfg["inference_settings"][1]["model_settings"]["adapter_path"]
    assert info["chat_m0_g1.jsonl"]["generation_settings"]["transformers_settings"]["num_return_sequences"] == 2
    assert all(v["complete"] and v["records"] == 6 and v["errors"] == [] for v in info.values())
    g0, g1, a0 = (_rows(out / n) for n in sorted(info))
    assert all(len(r["answers"]) == 2 for r in g1) and all(len(r["answers"]) == 1 for r in g0)
    # the adapter is honoured: different greedy answers from the same prompts
    by_id = {r["id"]: r["answers"][0]["content"] for r in g0}
    assert any(by_id[r["id"]] != r["answers"][0]["content"] for r in a0)
    r = g0[0]
    assert set(r) >= {"id", "dataset_name", "messages", "answers"} and r["dataset_name"] == "test"
    assert r["answers"][0]["id"] == f"{r['id']}-0" and isinstance(r["answers"][0]["sequence_score"], float)


def test_seeded_runs_repeat(chat_run, tmp_path):
    out, cfg = chat_run
    again = run_inference({**cfg, "inference_settings": cfg["inference_settings"][:1], "save_path": str(tmp_path)}, "chat")
    key = lambda rows: sorted((r["id"], [a["content"] for a in r["answers"]]) for r in rows)
    assert key(_rows(again / "chat_m0_g1.jsonl")) == key(_rows(out / "chat_m0_g1.jsonl"))


def test_output_loads_as_sampling_and_feeds_rm(chat_run, tok, tmp_path, tiny_llama):
    out, cfg = chat_run
    src = {"name": "gen", "records_path": str(out / "chat_m0_g1.jsonl"), "sample_rate": 1}
    samp = build_dataset({**cfg["dataset_settings"], "dataset_type": "sampling", "sources": [src]}, tok)
    assert len(samp) == 6 and len(samp[0]["inputs"]) == 2
    # reward inference on it: two reward models -> two files (turbo-alignment overwrote one)
    from transformers import AutoModelForSequenceClassification
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=1)
        d = tmp_path / f"rm{seed}"; m.save_pretrained(d); tok.save_pretrained(d); paths.append(d)
    rm_cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": str(p), "model_type": "seq_cls", "num_labels": 1}, "batch": b}
                                     for p, b in zip(paths, (1, 16))],
              "dataset_settings": {**cfg["dataset_settings"], "dataset_type": "sampling", "sources": [src]}, "save_path": str(tmp_path / "rm")}
    res = run_inference(rm_cfg, "rm")
    r0, r1 = _rows(res / "rm_m0.jsonl"), _rows(res / "rm_m1.jsonl")
    assert len(r0) == len(r1) == 6
    assert r0[0]["rewards"] != r1[0]["rewards"]
    # a score equals a plain forward pass of that answer's training-style input
    m = AutoModelForSequenceClassification.from_pretrained(paths[0]).eval()
    k = [r["id"] for r in samp.records].index(r0[0]["id"])
    x = samp[k]["inputs"][0]["input_ids"]
    with torch.no_grad(): ref = float(m(torch.as_tensor(x)[None]).logits[0, 0])
    assert abs(r0[0]["rewards"][r0[0]["answers"][0]["id"]] - ref) < 1e-4
    # and the rm output is again a valid sampling record
    again = build_dataset({**cfg["dataset_settings"], "dataset_type": "sampling",
                           "sources": [{"name": "rm", "records_path": str(res / "rm_m0.jsonl"), "sample_rate": 1}]}, tok)
    assert again[0]["rewards"] is not None


def test_classification_inference(tmp_path):
    ds = {"sources": [{"name": "val", "records_path": str(zoo.get("classification") / "val.jsonl"), "num_samples": 24}],
          "dataset_type": "classification", "max_tokens_count": 64}
    ms = {**F32, "model_path": "tiny-llama-cls", "model_type": "seq_cls", "model_kwargs": {"num_labels": 2, "problem_type": "single_label_classification"}}
    cfg = {"inference_settings": [{"model_settings": ms, "batch": 1}, {"model_settings": ms, "batch": 8}], "dataset_settings": ds,
           "save_path": str(tmp_path)}
    out = run_inference(cfg, "classification")
    a, b = _rows(out / "classification_m0.jsonl"), _rows(out / "classification_m1.jsonl")
    assert len(a) == len(b) == 24
    for x, y in zip(a, b):  # batch 1 and batch 8 (padded) agree
        assert x["id"] == y["id"] and x["predicted_label"] == y["predicted_label"]
        assert max(abs(p - q) for p, q in zip(x["probabilities"], y["probabilities"])) < 1e-4
        assert abs(sum(x["probabilities"]) - 1) < 1e-4 and x["predicted_label"] == max(range(2), key=lambda c: x["probabilities"][c])
        assert x["label"] in (0, 1) and x["dataset_name"] == "val"


def test_failing_record_is_reported_and_the_rest_written(tmp_path):
    """A record that cannot be prompted (longer than max_tokens_count) is reported by id; the others are generated."""
    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"Name the category of the white cup {i}."}]} for i in range(5)]
    recs[3]["messages"][0]["content"] += " and the red box" * 20
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}, "generation_settings": [GREEDY, SAMPLED]}],
           "dataset_settings": {**_chat(), "max_tokens_count": 40, "sources": [{"name": "inline", "records_data": recs, "sample_rate": 1}]},
           "save_path": str(tmp_path / "out")}
    out = run_inference(cfg, "chat")
    for name in ("chat_m0_g0.jsonl", "chat_m0_g1.jsonl"):
        info = json.loads((out / "info.json").read_text())[name]
        assert info["complete"] and info["records"] == 4
        assert [e["id"] for e in info["errors"]] == ["r3"] and "max_tokens_count=40" in info["errors"][0]["error"]
        assert sorted(r["id"] for r in _rows(out / name)) == ["r0", "r1", "r2", "r4"]


def test_written_output_survives_a_crash(tmp_path):
    log = OutputLog(tmp_path)
    w = log.open("chat_m0_g0.jsonl", model_index=0)
    w([{"id": "a", "answers": []}])
    try:
        raise KeyboardInterrupt  # the run dies before the file is closed
    except KeyboardInterrupt: pass
    assert _rows(tmp_path / "chat_m0_g0.jsonl") == [{"id": "a", "answers": []}]
    info = json.loads((tmp_path / "info.json").read_text())["chat_m0_g0.jsonl"]
    assert info["complete"] is False


def test_adapter_for_another_base_is_one_line(tmp_path, tiny_llama):
    from transformers import LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    other = LlamaForCausalLM(LlamaConfig(vocab_size=2854, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "other")
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama", "adapter_path": str(tmp_path / "other")}}],
           "dataset_settings": _chat(2), "save_path": str(tmp_path / "out")}
    with pytest.raises(SettingsError, match=r"inference_settings\[0\]\.model_settings\.adapter_path: .*trained on this base") as e:
        run_inference(cfg, "chat")
    assert "\n" not in str(e.value)
    # the vLLM path checks on an empty (meta) copy of the base, before any engine starts
    with pytest.raises(SettingsError, match="trained on this base"):
        check_adapter_fits(tmp_path / "other", _meta_model(tiny_llama))


@pytest.mark.parametrize("patch,match", [
    ({"use_vllm": True, "generation_settings": [{"transformers_settings": {"num_beams": 3, "do_sample": True}}]},
     r"generation_settings\[0\]\.transformers_settings\.num_beams: 3 \(beam search with sampling\) is not supported with use_vllm"),
    ({"generation_settings": [{"transformers_settings": {"stop_strings": ["ok", ""]}}]}, "stop_strings"),
    ({"generation_settings": [{"transformers_settings": {"num_beam": 2}}]}, "did you mean 'num_beams'"),
    ({"use_vlm": True}, "did you mean 'use_vllm'"),
    ({"use_vllm": True, "generation_settings": [{"vllm_settings": {"use_beam_search": True}}]}, "use_beam_search: true is not supported"),
    ({"use_vllm": True, "generation_settings": [{"vllm_settings": {"temperature": 3}}]}, "temperature: Input should be less than or equal to 2"),
])
def test_bad_settings_are_one_line(tmp_path, patch, match):
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}, **patch}], "dataset_settings": _chat(2),
           "save_path": str(tmp_path)}
    with pytest.raises(SettingsError, match=match) as e: run_inference(cfg, "chat")
    assert "\n" not in str(e.value)


def test_kind_must_match_dataset_type(tmp_path):
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}}], "dataset_settings": _chat(2), "save_path": str(tmp_path)}
    with pytest.raises(SettingsError, match="inference_rm expects 'sampling'"): run_inference(cfg, "rm")


def test_vllm_missing_is_a_clear_error(tmp_path):
    try:
        import vllm  # noqa
        pytest.skip("vllm is installed here")
    except ImportError: pass
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}, "use_vllm": True}], "dataset_settings": _chat(2),
           "save_path": str(tmp_path)}
    with pytest.raises(ImportError, match=r'vLLM is not installed.*pip install -e "\.\[vllm\]"'): run_inference(cfg, "chat")


def test_output_with_label_and_meta_loads_as_sampling(tmp_path, tok):
    recs = [{"id": "a", "messages": [{"role": "user", "content": "Name the category of the white cup."}], "label": "thing", "meta": {"k": 1}}]
    cfg = {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}, "generation_settings": [GREEDY]}],
           "dataset_settings": {**_chat(), "sources": [{"name": "inline", "records_data": recs, "sample_rate": 1}]}, "save_path": str(tmp_path)}
    out = run_inference(cfg, "chat")
    r = _rows(out / "chat_m0_g0.jsonl")[0]
    assert r["label"] == "thing" and r["meta"] == {"k": 1}
    samp = build_dataset({**_chat(), "dataset_type": "sampling",
                          "sources": [{"name": "o", "records_path": str(out / "chat_m0_g0.jsonl"), "sample_rate": 1}]}, tok)
    assert len(samp) == 1 and samp.records[0]["label"] == "thing" and samp.records[0]["answers"][0]["sequence_score"] < 0


def test_turbo_inference_keys(tmp_path):
    """turbo's micro_batch is the forward batch of classification inference (speed only: the same probabilities); with use_vllm,
    vllm_settings that give turbo's keys are the sampling, so transformers_settings vLLM could not serve are not checked."""
    from alignlab.inference import ModelInferenceSettings
    from alignlab.settings import load_settings
    ds = {"sources": [{"name": "val", "records_path": str(zoo.get("classification") / "val.jsonl"), "num_samples": 12}],
          "dataset_type": "classification", "chat_settings": {"max_tokens_count": 64}}
    ms = {**F32, "model_path": "tiny-llama-cls", "model_type": "seq_cls", "num_labels": 2}
    cfg = {"inference_settings": [{"model_settings": ms, "batch": 12, "micro_batch": 1}, {"model_settings": ms, "batch": 12}],
           "dataset_settings": ds, "save_path": str(tmp_path)}
    st = load_settings(ModelInferenceSettings, cfg["inference_settings"][0])
    assert (st.forward_batch, load_settings(ModelInferenceSettings, cfg["inference_settings"][1]).forward_batch) == (1, 12)
    out = run_inference(cfg, "classification")
    a, b = _rows(out / "classification_m0.jsonl"), _rows(out / "classification_m1.jsonl")
    assert len(a) == len(b) == 12
    assert all(x["predicted_label"] == y["predicted_label"] and max(abs(p - q) for p, q in zip(x["probabilities"], y["probabilities"])) < 1e-4
               for x, y in zip(a, b))
    g = {"transformers_settings": {"num_beams": 3}, "vllm_settings": {"n": 2, "max_tokens": 8, "best_of": 2}}
    ok = load_settings(ModelInferenceSettings, {"model_settings": {"model_path": "tiny-llama"}, "use_vllm": True, "generation_settings": [g]})
    assert ok.generation_settings[0].vllm_settings.turbo and not ok.generation_settings[0].vllm_settings.model_extra
