"""GPU check: the same prompts through Hugging Face `generate` (alignlab.generate.generate, batched) and vLLM
(alignlab.vllm_backend.VLLMGenerator); compares greedy outputs and reports the speed ratio.

Needs a CUDA machine with the official vLLM and alignlab in one environment (vLLM pins its transformers, so install alignlab
without deps next to it):

    python -m venv vllm-env && . vllm-env/bin/activate
    pip install vllm && pip install -e /path/to/alignlab --no-deps && pip install peft accelerate pydantic safetensors pyyaml jinja2 tqdm
    python bench/gpu_vllm_parity.py --model /path/to/hf_model [--adapter /path/to/lora] [--dtype bfloat16] [--n 256]

Defaults: the zoo's tiny Llama and the zoo's chat test prompts (built offline by alignlab), float32, greedy, 64 new tokens.
Output: one JSON line (and --out FILE): exact-match rate of the greedy token ids, where the first divergences are, the score
difference on matching answers, and time / tokens per second of each backend (HF first, its GPU memory freed before vLLM starts).
Greedy outputs in bfloat16 can legitimately diverge after a near-tie (different kernels); use --min-match to turn the rate
into an exit status (default: report only).
"""
import argparse, gc, json, os, sys, time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_prompts(tok, records_path, n, template_from=None):
    "Prompt ids as the trainer/inference pipeline builds them (Llama-3 template unless --dataset-settings is given)."
    from alignlab.datasets import build_dataset
    from alignlab.generate import prompt_ids
    if template_from:
        st = json.loads(open(template_from).read())
        st = {**st, "sources": [{"name": "bench", "records_path": str(records_path), "num_samples": n}]}
    else:
        from alignlab.quickstart import chat_settings
        st = chat_settings(records_path)
        st["sources"][0] = {**st["sources"][0], "sample_rate": None, "num_samples": n}
    ds = build_dataset(st, tok, inference=True)
    pairs = prompt_ids(ds)
    return [p for _, p in pairs], [ds.records[i]["id"] for i, _ in pairs]


def sync():
    import torch
    if torch.cuda.is_available(): torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llama", help="local HF model directory (or an alignlab zoo name)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    ap.add_argument("--adapter", default=None, help="a LoRA adapter directory, served by both backends")
    ap.add_argument("--records", default=None, help="chat JSONL (default: the zoo's chat test set)")
    ap.add_argument("--dataset-settings", default=None, help="a dataset_settings JSON whose prompt_template to use")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32, help="HF generate batch size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8)
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-match", type=float, default=None, help="exit 1 when the exact-match rate is below this")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    import torch
    from alignlab.models import resolve_path, load_tokenizer
    from alignlab.generate import generate
    from alignlab.vllm_backend import VLLMGenerator, import_vllm
    import_vllm()  # fail early, with the install hint
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_path(a.model)
    tok = load_tokenizer({"tokenizer_path": a.tokenizer} if a.tokenizer else None, path)
    if a.records: records = a.records
    else:
        from alignlab import zoo
        records = zoo.get("chat") / "test.jsonl"
    prompts, ids = build_prompts(tok, records, a.n, a.dataset_settings)
    ts = {"max_new_tokens": a.max_new_tokens, "do_sample": False}

    # Hugging Face
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a.dtype)).to(dev).eval()
    if a.adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, a.adapter).eval()
    generate(model, tok, prompts[:2], ts, {"batch": 2}, ids=ids[:2])  # warm-up (CUDA context, kernels)
    hf_t, hf = float("inf"), None
    for _ in range(a.repeats):
        sync(); t = time.perf_counter(); hf = generate(model, tok, prompts, ts, {"batch": a.batch}, ids=ids); sync()
        hf_t = min(hf_t, time.perf_counter() - t)
    del model; gc.collect()
    if dev == "cuda": torch.cuda.empty_cache()

    # vLLM, the same prompt ids
    es = {"tensor_parallel_size": a.tensor_parallel_size, "gpu_memory_utilization": a.gpu_memory_utilization,
          **({"max_model_len": a.max_model_len} if a.max_model_len else {})}
    t0 = time.perf_counter()
    gen = VLLMGenerator(path, tok, es, adapter_path=a.adapter, dtype=a.dtype)
    start = time.perf_counter() - t0
    gen.generate(prompts[:2], ts, ids=ids[:2])  # warm-up
    v_t, vl = float("inf"), None
    for _ in range(a.repeats):
        t = time.perf_counter(); vl = gen.generate(prompts, ts, ids=ids); v_t = min(v_t, time.perf_counter() - t)

    # compare
    same, firsts, dscore = 0, [], []
    for h, v in zip(hf, vl):
        x, y = h[0]["answer_token_ids"], v[0]["answer_token_ids"]
        if x == y:
            same += 1
            if v[0]["sequence_score"] is not None: dscore.append(abs(h[0]["sequence_score"] - v[0]["sequence_score"]))
        else: firsts.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    hf_tok = sum(len(h[0]["answer_token_ids"]) for h in hf); v_tok = sum(len(v[0]["answer_token_ids"]) for v in vl)
    r = {"model": str(path), "adapter": a.adapter, "dtype": a.dtype, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
         "prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "hf_batch": a.batch,
         "exact_match": round(same / max(1, len(prompts)), 4), "first_divergence_positions": sorted(firsts)[:20],
         "max_abs_score_diff_on_matches": round(max(dscore), 5) if dscore else None,
         "hf_s": round(hf_t, 3), "vllm_s": round(v_t, 3), "vllm_engine_start_s": round(start, 1),
         "hf_tokens_per_s": round(hf_tok / hf_t, 1), "vllm_tokens_per_s": round(v_tok / v_t, 1),
         "speedup_vllm_over_hf": round(hf_t / v_t, 2)}
    line = json.dumps(r)
    print(line)
    if a.out: open(a.out, "w").write(line + "\n")
    print(f"greedy exact match {r['exact_match']:.1%}; vLLM {r['speedup_vllm_over_hf']}x faster than batched HF generate "
          f"({r['hf_s']} s -> {r['vllm_s']} s)", file=sys.stderr)
    if a.min_match is not None and r["exact_match"] < a.min_match: sys.exit(1)


if __name__ == "__main__":
    main()
