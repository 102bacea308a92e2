"""RAG retrieval speed: alignlab's `Retriever` vs the bare encoder + bare faiss on the same queries, index build time, and the share
of RAG inference time spent in retrieval vs generation, at 1k / 10k / 100k synthetic passages.

Run: HF_HUB_OFFLINE=1 python bench/bench_rag.py [--sizes 1000,10000,100000] [--encoder tiny-encoder] [--queries 256] [--out rag.json]
"bare" is the same encoder weights called directly (`AutoModel` forward, mean pooling, L2 normalisation, the same batch size and
max_length) and `faiss.Index.search` on the same vectors: the floor alignlab's wrapper (prefix, length checks, hit dicts) is measured
against (target: alignlab <= 1.2x bare). Build = encoding every passage + adding it to the index (flat up to FLAT_MAX, HNSW above).
Inference share: 32 questions retrieved (n_docs=2) and answered by the zoo's tiny Llama (greedy, 16 new tokens), timed apart.
Timings are the best of 5, alignlab and bare interleaved (one run for builds).
"""
import argparse, json, os, random, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def passages(n, seed=0):
    "n synthetic passages in the zoo's RAG style: invented people, their town, job and pet."
    from alignlab.corpus import CATEGORIES, invented_names
    rng = random.Random(seed)
    names, towns = invented_names(rng, min(n, 5000)), invented_names(random.Random(seed + 1), 400)
    out = []
    for i in range(n):
        p = f"{names[i % len(names)]}{'' if i < len(names) else i // len(names)}"
        out.append({"id": f"p{i}", "title": "", "text": f"{p} lives in {rng.choice(towns)}. {p} works as a {rng.choice(CATEGORIES['a person'])} "
                                                         f"and keeps a {rng.choice(CATEGORIES['an animal'])}."})
    return out


def best(f, k=3):
    ts = []
    for _ in range(k):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)


def interleaved(fs, k=5):
    "The best of `k` timings of each of `fs`, run in turn (a, b, c, a, b, c, ...): timed one after the other, load drift shows as a difference."
    ts = [[] for _ in fs]
    for _ in range(k):
        for f, t in zip(fs, ts):
            t0 = time.perf_counter(); f(); t.append(time.perf_counter() - t0)
    return [min(t) for t in ts]


def bare_encode(enc, texts, bs):
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), bs):
            b = enc.tokenizer(texts[i:i + bs], padding=True, truncation=True, max_length=enc.max_length, return_tensors="pt")
            h = enc.model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
    import numpy as np
    return np.concatenate(out)


def run(n, encoder, n_queries, gen):
    import numpy as np
    from alignlab.retrieval import QuestionEncoder, PassageIndex, Retriever, RetrievalSettings, with_documents
    d = Path(tempfile.mkdtemp())
    ps = passages(n)
    (d/"p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in ps))
    enc = QuestionEncoder(encoder)
    t = time.perf_counter(); ix = PassageIndex.build(d/"p.jsonl", enc); build = time.perf_counter() - t
    ix.save(d/"p.faiss")
    rng = random.Random(1)
    qs = [f"Where does {ps[rng.randrange(n)]['text'].split(' ')[0]} live?" for _ in range(n_queries)]
    bs = 64
    r = Retriever(enc, ix, RetrievalSettings(n_docs=5, retrieval_batch_size=bs))
    Q = bare_encode(enc, qs, bs)
    t_al, t_enc, t_search = interleaved([lambda: r.retrieve(qs), lambda: bare_encode(enc, qs, bs), lambda: ix.index.search(Q, 5)])
    ours = [[h["row"] for h in x] for x in r.retrieve(qs[:16])]
    assert ours == ix.index.search(Q[:16], 5)[1].tolist(), "alignlab and bare faiss disagree"
    out = dict(passages=n, index=type(ix.index).__name__, dim=ix.dim, build_s=round(build, 2), queries=n_queries,
               alignlab_s=round(t_al, 4), bare_encoder_s=round(t_enc, 4), bare_faiss_s=round(t_search, 4),
               ratio=round(t_al / (t_enc + t_search), 3), alignlab_qps=round(n_queries / t_al, 1))
    if gen is not None:  # the share of one RAG inference batch spent retrieving vs generating
        from alignlab.generate import generate
        model, tok = gen
        r2 = Retriever(enc, ix, RetrievalSettings(n_docs=2))
        recs = [{"id": str(i), "messages": [{"role": "user", "content": q}]} for i, q in enumerate(qs[:32])]
        t = time.perf_counter(); hits = r2.retrieve([x["messages"][0]["content"] for x in recs]); t_r = time.perf_counter() - t
        texts = [tok.apply_chat_template(with_documents(x, h, r2.settings, tok)["messages"], add_generation_prompt=True, tokenize=False)
                 for x, h in zip(recs, hits)]
        prompts = [tok(x, add_special_tokens=False)["input_ids"] for x in texts]
        t = time.perf_counter()
        generate(model, tok, prompts, {"max_new_tokens": 16, "do_sample": False, "stop_strings": None}, {"batch": 32})
        t_g = time.perf_counter() - t
        out.update(infer_retrieval_s=round(t_r, 3), infer_generation_s=round(t_g, 3), retrieval_share=round(t_r / (t_r + t_g), 3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--encoder", default="tiny-encoder", help="tiny-encoder (zoo) or all-MiniLM-L6-v2")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--no_generation", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    gen = None
    if not a.no_generation:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from alignlab import zoo
        p = zoo.get("tiny-llama")
        gen = (AutoModelForCausalLM.from_pretrained(p).eval(), AutoTokenizer.from_pretrained(p))
    rows = []
    for n in map(int, a.sizes.split(",")):
        rows.append(run(n, a.encoder, a.queries, gen))
        print(json.dumps(rows[-1]), flush=True)
    if a.out: Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
