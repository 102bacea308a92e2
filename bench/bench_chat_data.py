"""Chat dataset build speed and memory: alignlab vs TRL's SFT preparation vs the bare batched tokenizer.

Run: HF_HUB_OFFLINE=1 python bench/bench_chat_data.py [--sizes 1000,10000,100000] [--no-trl]
Each measurement runs in a fresh subprocess so peak RSS is its own; the best of 3 runs is kept (one run at 100k).
"bare" is `tokenizer(texts)` on the pre-rendered texts (the transformers batched call); "bare_rust" is
`tokenizer.backend_tokenizer.encode_batch(texts)`, the Rust call with no Python lists (a stricter floor).
alignlab's time includes rendering the messages, the offsets and the loss mask; TRL's is `SFTTrainer._prepare_dataset`
(conversational records, an equivalent Llama-3 Jinja template with {% generation %} blocks, assistant_only_loss=True);
its ids and loss mask are checked equal to alignlab's on the first 200 records.
"""
import argparse, json, os, random, resource, subprocess, sys, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_records(n, seed=0):
    "n multi-turn chats (2-4 turns, some with a system prompt) from the zoo's chat generator."
    from alignlab.sample_data import chat_turn
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Answer with the category only."}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(2, 4)):
            _, q, a = chat_turn(rng)
            msgs += [{"role": "user", "content": q}, {"role": "bot", "content": a}]
        out.append({"id": str(i), "messages": msgs})
    return out


def rss_mb(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_one(kind, n):
    "One measurement in this process: prints a JSON line."
    from transformers import AutoTokenizer
    from alignlab import zoo
    from alignlab.templates import LLAMA3
    from alignlab.encoding import encode_chats
    tok = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
    recs = make_records(n)
    chats = [r["messages"] for r in recs]
    texts = [LLAMA3.render(c)[0] for c in chats]
    tok(texts[:64]); encode_chats(LLAMA3, tok, chats[:64])  # warm up
    import gc; gc.collect()
    before = rss_mb(); t = time.perf_counter(); extra = {}
    if kind == "bare":
        enc = tok(texts)
        n_tok = sum(map(len, enc["input_ids"]))
    elif kind == "bare_rust":  # the Rust batch call alone, no Python lists (a stricter floor than the transformers call)
        enc = tok.backend_tokenizer.encode_batch(texts)
        n_tok = sum(map(len, enc))
    elif kind == "alignlab":
        store, kept, status = encode_chats(LLAMA3, tok, chats)
        n_tok = store.n_tokens(); extra = dict(store_mb=store.nbytes / 2**20, int32_ids_mb=n_tok * 4 / 2**20)
    elif kind == "alignlab_render":  # alignlab including its own rendering (bare gets pre-rendered texts)
        store, kept, status = encode_chats(LLAMA3, tok, chats); n_tok = store.n_tokens()
    elif kind == "trl":
        from datasets import Dataset
        from trl import SFTConfig
        from trl.trainer.sft_trainer import SFTTrainer
        tok.chat_template = TRL_TEMPLATE
        ds = Dataset.from_list([{"messages": [{"role": "assistant" if m["role"] == "bot" else m["role"], "content": m["content"]} for m in c]} for c in chats])
        args = SFTConfig(output_dir="/tmp/trl_bench", assistant_only_loss=True, dataset_num_proc=None, max_length=None,
                         report_to=[], use_cpu=True)
        trainer = SFTTrainer.__new__(SFTTrainer)  # only the dataset preparation, not a model
        trainer._tokenizer, trainer.chat_template, trainer.completion_only_loss = tok, None, False
        out = SFTTrainer._prepare_dataset(trainer, ds, tok, args, packing=False, formatting_func=None, dataset_name="train")
        n_tok = sum(map(len, out["input_ids"]))
        # the same ids and the same trained tokens as alignlab? (checked outside the timing)
        dt = time.perf_counter() - t
        store, _, _ = encode_chats(LLAMA3, tok, chats[:200])
        cols = out.column_names
        same_ids = all(out[i]["input_ids"] == store[i][0].tolist() for i in range(200))
        trl_mask = (lambda r: [int(l != -100) for l in r["labels"]]) if "labels" in cols else (lambda r: list(r["assistant_masks"]))
        same_mask = all(trl_mask(out[i]) == store[i][1].tolist() for i in range(200))
        extra = dict(columns=cols, same_ids_as_alignlab=same_ids, same_loss_mask_as_alignlab=bool(same_mask))
        print(json.dumps(dict(kind=kind, n=n, seconds=dt, tokens=n_tok, rss_growth_mb=rss_mb() - before, **extra))); return
    dt = time.perf_counter() - t
    print(json.dumps(dict(kind=kind, n=n, seconds=dt, tokens=n_tok, rss_growth_mb=rss_mb() - before, **extra)))


# TRL's assistant_only_loss needs {% generation %} blocks around what is trained: the Llama-3 template, content + suffix
TRL_TEMPLATE = ("{{- bos_token -}}{%- for m in messages -%}{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' -}}"
                "{%- if m['role'] == 'assistant' -%}{%- generation -%}{{- m['content'] + '<|eot_id|>' -}}{%- endgeneration -%}"
                "{%- else -%}{{- m['content'] + '<|eot_id|>' -}}{%- endif -%}{%- endfor -%}"
                "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}")


def measure(kind, n):
    p = subprocess.run([sys.executable, __file__, "--one", kind, str(n)], capture_output=True, text=True)
    line = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode or not line: return dict(kind=kind, n=n, error=(p.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(line[-1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--one", nargs=2); ap.add_argument("--sizes", default="1000,10000,100000"); ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if a.one: run_one(a.one[0], int(a.one[1])); sys.exit()
    rows = {}
    for n in [int(x) for x in a.sizes.split(",")]:
        for kind in ["bare", "bare_rust", "alignlab"] + ([] if a.no_trl or n > 10000 else ["trl"]):
            runs = [measure(kind, n) for _ in range(a.repeat if n <= 10000 else 1)]
            if kind == "trl" and runs and "error" not in runs[0]: assert runs[0]["same_ids_as_alignlab"] and runs[0]["same_loss_mask_as_alignlab"], runs[0]
            ok = [r for r in runs if "error" not in r]
            rows[kind, n] = min(ok, key=lambda r: r["seconds"]) if ok else runs[0]
            r = rows[kind, n]
            print(f"{kind:>9} n={n:>6}: " + (f"{r['seconds']:.3f} s, {n / r['seconds']:,.0f} records/s, {r['tokens']:,} tokens, "
                  f"peak RSS growth {r['rss_growth_mb']:.1f} MB" + (f", same ids/mask as alignlab: {r['same_ids_as_alignlab']}/{r['same_loss_mask_as_alignlab']}" if "same_ids_as_alignlab" in r else "") + (f", store {r['store_mb']:.1f} MB (int32 ids {r['int32_ids_mb']:.1f} MB)" if "store_mb" in r else "")
                  if "error" not in r else f"FAILED: {r['error']}"), flush=True)
        b, br, al, trl = rows.get(("bare", n)), rows.get(("bare_rust", n)), rows.get(("alignlab", n)), rows.get(("trl", n))
        if b and al and "error" not in al:
            print(f"  n={n}: alignlab / bare tokenizer time = {al['seconds'] / b['seconds']:.2f}x (target <= 1.5x)")
            print(f"  n={n}: alignlab / bare Rust encode_batch time = {al['seconds'] / br['seconds']:.2f}x")
            print(f"  n={n}: alignlab peak RSS growth / int32 token ids = {al['rss_growth_mb'] / al['int32_ids_mb']:.2f}x (target <= 2x)")
        if trl and "error" not in trl and al:
            print(f"  n={n}: alignlab records/s / TRL records/s = {trl['seconds'] / al['seconds']:.1f}x (target >= 3x)")
