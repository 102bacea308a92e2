"""Batched vs per-record generation (turbo-alignment's default was one record at a time, `custom_settings.batch: 1`).

Run: HF_HUB_OFFLINE=1 python bench/bench_generate.py [--n 64] [--max-new-tokens 32] [--batch 16] [--threads 1] [--repeats 2]
Same prompts (the zoo's chat test set, built with build_dataset(..., inference=True)), same greedy settings, same model (the zoo's
tiny Llama, float32, CPU). Prints the time of each and the ratio; the greedy answers of both are checked identical.
Both runs include the sequence-score pass (one teacher-forced forward per batch), as `generate` always computes it.
"""
import argparse, json, os, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="tiny-llama", help="a local HF model dir or a zoo name")
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM
    from alignlab import zoo
    from alignlab.models import resolve_path, load_tokenizer
    from alignlab.datasets import build_dataset
    from alignlab.generate import generate, prompt_ids
    from alignlab.quickstart import chat_settings
    path = resolve_path(a.model)
    tok = load_tokenizer(None, path)
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    st = chat_settings(zoo.get("chat") / "train.jsonl")
    st["sources"][0] = {**st["sources"][0], "sample_rate": None, "num_samples": a.n}
    prompts = [p for _, p in prompt_ids(build_dataset(st, tok, inference=True))]
    ts = {"max_new_tokens": a.max_new_tokens}
    generate(model, tok, prompts[:2], ts, {"batch": 2})  # warm-up
    res = {}
    for name, b in (("per_record", 1), ("batched", a.batch)):
        best, out = float("inf"), None
        for _ in range(a.repeats):
            t = time.perf_counter(); out = generate(model, tok, prompts, ts, {"batch": b}); best = min(best, time.perf_counter() - t)
        res[name] = (best, out)
    same = [x[0]["answer_token_ids"] for x in res["per_record"][1]] == [x[0]["answer_token_ids"] for x in res["batched"][1]]
    toks = sum(len(x[0]["answer_token_ids"]) for x in res["batched"][1])
    r = {"prompts": len(prompts), "max_new_tokens": a.max_new_tokens, "batch": a.batch, "threads": a.threads,
         "generated_tokens": toks, "per_record_s": round(res["per_record"][0], 3), "batched_s": round(res["batched"][0], 3),
         "ratio": round(res["per_record"][0] / res["batched"][0], 2), "same_greedy_answers": same,
         "torch": torch.__version__}
    print(json.dumps(r))
    print(f"batched (batch={a.batch}) is {r['ratio']}x faster than per-record on {len(prompts)} prompts "
          f"({r['per_record_s']} s -> {r['batched_s']} s, {toks} tokens; greedy answers identical: {same})")


if __name__ == "__main__":
    main()
