"""Shared-prompt packing for DPO, measured (bench_dpo.py's last section; runnable alone).

A pair is usually trained as two rows, context + chosen and context + rejected, so the context is computed twice. Packed: one
row holds the context once, then the chosen answer, then the rejected answer, with a 4-D attention mask so each answer sees the
context and itself but not the other answer, and position ids that restart after the context (the rejected answer sits at the
same positions as it would in its own row). Each answer's tokens are then scored from the right positions: an answer's first
token from the context's last position, the rest from their own predecessors.

Correctness first: the per-answer log-probs of the packed forward equal the unpacked (two-row) ones within a float tolerance,
and so do the LoRA gradients; negative controls (no 4-D mask; positions not restarted) must differ. Then speed: forward + DPO
loss + backward of a LoRA model, packed vs the concatenated two-row batch, on the zoo's pairs and on synthetic pairs whose
context is 64 / 256 / 1024 tokens (answers 32 tokens each).

Run alone: HF_HUB_OFFLINE=1 python bench/packing_bench.py [--models tiny,50m] [--threads 1] [--contexts zoo,64,256,1024]
Columns: two rows (full LM head) = alignlab's step before `batch_logps` (on the zoo pairs only); two rows = `batch_logps` (the
LM head only where an answer token is predicted); packed = `packed_logps` (the same restriction); the speedup compares the last
two, so it is what packing alone buys. Synthetic pairs: 50m 4 / 1 / 1 pairs, tiny 16 / 6 / 2 at context 64 / 256 / 1024.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOL = dict(logp_abs=2e-3, logp_rel=1e-5, grad_rel=1e-3)  # see check(): float32 sums over up to ~1000 positions in another order


def items_synthetic(n, context, answer, vocab, seed, special=16):
    "n pairs as dataset items: random context of `context` tokens, two random answers of `answer` tokens (all scored)."
    import numpy as np
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        c = rng.integers(special, vocab, context)
        rows = {}
        for side in ("w", "l"):
            a = rng.integers(special, vocab, answer)
            ids = np.concatenate([c, a])
            rows["inputs_" + side] = {"input_ids": ids, "labels": np.concatenate([np.full(context, -100), a])}
        out.append(rows)
    return out


def items_zoo(tok, n):
    "The first n pairs of the zoo's preferences train split, as alignlab's PairPreferenceDataset items."
    from alignlab import zoo
    from alignlab.datasets import build_dataset
    recs = [json.loads(l) for l in (zoo.get("preferences") / "train.jsonl").read_text().splitlines()][:n]
    ds = build_dataset({"sources": [{"name": "train", "records_data": recs, "sample_rate": 1}], "dataset_type": "pair_preferences",
                        "max_tokens_count": 4096}, tok, name="train")
    return [ds[i] for i in range(len(ds))]


def step(model, batch_fn, logps_fn, beta=0.1):
    "One forward + sigmoid DPO loss (reference log-probs 0) + backward; the log-probs."
    lp = logps_fn(model, batch_fn)
    n = lp.shape[0] // 2
    import torch.nn.functional as F
    loss = -F.logsigmoid(beta * (lp[:n] - lp[n:])).mean()
    loss.backward()
    return lp.detach()


def unpacked_logps(model, batch):
    "Two rows a pair, the LM head on every position (alignlab's DPOTrainer before `batch_logps`)."
    from alignlab.preferences import sequence_logps
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logps(logits, batch["input_ids"], batch["labels"])


def unpacked_answer_head(model, batch):
    "Two rows a pair, the LM head only on the columns that predict an answer token (`batch_logps`, as `packed_logps` does)."
    from alignlab.preferences import batch_logps
    return batch_logps(model, batch)


def grads(model):
    import torch
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def check(model, items, pad_id):
    "Packed vs unpacked log-probs and LoRA gradients on `items`; the negative controls' errors. Returns the errors."
    import torch
    from alignlab.preferences import PreferenceCollator, pack_pairs, packed_logps
    un = PreferenceCollator(pad_id)(items)
    pk = pack_pairs(items, pad_id)
    model.zero_grad(); a = step(model, un, unpacked_logps); ga = grads(model)
    model.zero_grad(); b = step(model, pk, packed_logps); gb = grads(model)
    model.zero_grad()
    err = dict(logp_abs=float((a - b).abs().max()), logp_rel=float(((a - b).abs() / a.abs().clamp(min=1)).max()),
               grad_rel=float((ga - gb).norm() / ga.norm()), logp_mag=float(a.abs().max()))
    with torch.no_grad():  # negative controls: the same packed row without the 4-D mask (plain causal), or positions not restarted
        causal = dict(pk, attention_mask=torch.ones(pk["input_ids"].shape, dtype=torch.long))
        flat = dict(pk, position_ids=torch.arange(pk["input_ids"].shape[1]).expand_as(pk["input_ids"]))
        err["control_no_mask"] = float((a - packed_logps(model, causal)).abs().max())
        err["control_positions"] = float((a - packed_logps(model, flat)).abs().max())
    return err


def timed_steps(model, batch, fn, reps):
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        model.zero_grad(set_to_none=True)
        t = time.perf_counter(); step(model, batch, fn); times.append(time.perf_counter() - t)
    return min(times[1:])


def child(a):
    import torch
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_dpo import load_policy
    from transformers import AutoTokenizer
    from alignlab.preferences import PreferenceCollator, pack_pairs, packed_logps
    model, shape = load_policy(a)
    model.train()
    tok = AutoTokenizer.from_pretrained(a.model_path)
    V, pad_id = model.config.vocab_size, tok.pad_token_id
    out = []
    for ctx in a.contexts.split(","):
        if ctx == "zoo": items, name = items_zoo(tok, 16), "zoo pairs (16)"
        else:
            c = int(ctx); n = max(1, 512 // (c + 64)) if shape["params"] > 2e7 else max(2, 2048 // (c + 64))
            items, name = items_synthetic(n, c, 32, V, a.seed), f"context {c} (+2x32), {n} pairs"
        err = check(model, items, pad_id)
        ok = err["logp_abs"] <= TOL["logp_abs"] + TOL["logp_rel"] * err["logp_mag"] and err["grad_rel"] <= TOL["grad_rel"]
        assert ok, (name, err)
        assert err["control_no_mask"] > 10 * err["logp_abs"] and err["control_positions"] > 10 * err["logp_abs"], (name, err)
        un, pk = PreferenceCollator(pad_id)(items), pack_pairs(items, pad_id)
        t_full = timed_steps(model, un, unpacked_logps, a.reps) if ctx == "zoo" else float("nan")  # the LM head's share: once, on the real pairs
        t_un = timed_steps(model, un, unpacked_answer_head, a.reps)
        t_pk = timed_steps(model, pk, packed_logps, a.reps)
        out.append(dict(model=a.model, params=shape["params"], threads=a.threads, context=name, pairs=len(items),
                        slots_unpacked=int(un["input_ids"].numel()), slots_packed=int(pk["input_ids"].numel()),
                        ms_pair_full_head=1e3 * t_full / len(items), ms_pair_unpacked=1e3 * t_un / len(items),
                        ms_pair_packed=1e3 * t_pk / len(items), speedup=t_un / t_pk, speedup_vs_full_head=t_full / t_pk, **err))
        print("RESULT " + json.dumps(out[-1]), flush=True)


def _ms(x): return "–" if x != x else f"{x:.1f}"  # NaN: not measured


def table(rows):
    lines = ["| model | threads | data | token slots, two rows → packed | ms / pair, two rows (full LM head) | ms / pair, two rows | ms / pair, packed | packed vs two rows | max Δ log-p (nats) | grad rel. diff | controls: no mask / flat positions |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['threads']} | {r['context']} | {r['slots_unpacked']:,} → {r['slots_packed']:,} "
                     f"({r['slots_unpacked'] / r['slots_packed']:.2f}x) | {_ms(r['ms_pair_full_head'])} | {r['ms_pair_unpacked']:.1f} | {r['ms_pair_packed']:.1f} | **{r['speedup']:.2f}x** | "
                     f"{r['logp_abs']:.1e} | {r['grad_rel']:.1e} | {r['control_no_mask']:.2g} / {r['control_positions']:.2g} |")
    return "\n".join(lines)


def run(a, tmp, paths, threads, peaks=None):
    "The micro-benchmark for each of `a.packing_models`, one fresh process each (bench_dpo.py calls this)."
    rows = []
    for m in a.packing_models.split(","):
        if m not in paths: continue
        cmd = [sys.executable, __file__, "--child", "--model", m, "--model_path", paths[m], f"--threads={threads}",
               f"--contexts={a.packing_contexts}", f"--seed={a.seed}", f"--reps={getattr(a, 'packing_reps', 2)}"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode: sys.exit(f"packing child {m} failed:\n{p.stderr[-4000:]}")
        for l in p.stdout.splitlines():
            if l.startswith("RESULT "):
                rows.append(json.loads(l[7:]))
                r = rows[-1]
                print(f"packing {m} {r['context']:32s} {_ms(r['ms_pair_full_head']):>8s} (full head) / {r['ms_pair_unpacked']:8.1f} -> {r['ms_pair_packed']:8.1f} ms/pair  {r['speedup']:.2f}x  "
                      f"(slots {r['slots_unpacked']} -> {r['slots_packed']}; max d logp {r['logp_abs']:.1e})", flush=True)
    print(); print(table(rows))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", dest="packing_models", default="tiny,50m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", dest="packing_contexts", default="zoo,64,256,1024")
    ap.add_argument("--reps", dest="packing_reps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("model", "model_path"): ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a, _ = ap.parse_known_args()
    if a.child:
        a.contexts, a.reps = a.packing_contexts, a.packing_reps
        return child(a)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_dpo import prepare
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_pack_"))
    a.models, a.pairs = a.packing_models, 16
    run(a, tmp, prepare(tmp, a), a.threads)


if __name__ == "__main__":
    main()
