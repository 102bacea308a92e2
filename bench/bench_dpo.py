"""LoRA DPO training speed: alignlab's DPOTrainer vs TRL's DPOTrainer (default, and with precompute_ref_log_probs) on the same
model, data, LoRA and hyperparameters; MFU of both; and what shared-prompt packing would buy as contexts grow.

Run (main venv; TRL lives in its own venv):
    HF_HUB_OFFLINE=1 python bench/bench_dpo.py [--models tiny,50m] [--threads 1,2] [--steps 6] [--warmup 2] [--batch 16]
        [--repeats 1] [--trl-python /work/trl-venv/bin/python] [--packing-contexts zoo,64,256,1024] [--no-packing] [--profile]
    (about 8 minutes on 2 idle cores with the defaults; `--models tiny --threads 1 --steps 2 --no-packing` for a quick check)

Each (model, threads, mode) runs in a fresh subprocess with `torch.set_num_threads(threads)`, the modes interleaved, the fastest
of --repeats kept (run the whole bench twice to see how stable the ratios are); TRL runs under `--trl-python` (a venv with trl, same torch / transformers / peft versions: checked), alignlab
under this interpreter. Both read the same pairs from a temporary JSONL (the zoo's `preferences` train split) and the same model
directory (the zoo's tiny-llama, or a seeded random ~50M Llama saved once by this script), wrap it in the same LoRA (same seed:
same adapter init) and train the same steps: same batches (same sampler seed), same loss (sigmoid, beta 0.1), same optimizer.
TRL's own tokenization of the conversational records is asserted equal to alignlab's ids and answer masks, and the training
losses of the three modes agree (printed). TRL's CPU-unfriendly defaults (bf16, gradient checkpointing) are set to alignlab's.

Modes: `trl` = TRL DPOTrainer as it comes (the reference = the policy with its adapter disabled, one extra no-grad forward per
step); `trl_pre` = the same with `precompute_ref_log_probs=True` (one reference pass over the data before training); `alignlab`
= `alignlab.run.make_trainer("dpo", ...)` (reference = adapter disabled, computed once and cached on the dataset);
`alignlab_packed` = the same with `packing=True` (each pair in one row, its context once: `alignlab.preferences.pack_pairs`).
The last section (`packing_bench.py`) measures shared-prompt packing alone, correctness first, as contexts grow.

Time: wall clock from the end of the last warm-up step to the end of the last step (collation, forward, backward, optimizer,
and the reference forward where a mode does it per step). `ref s` = the one-time reference pass (precompute / cache), reported
apart and folded into `pairs/s (epoch)` = n / (ref s + n / pairs/s) over the n pairs of the data.
Memory: peak RSS (the kernel's VmHWM, reset through /proc/self/clear_refs right before the trainer is built, read after the
last step), so it covers the reference pass and training; torch keeps no CPU allocator statistics and tracemalloc does not see
torch's tensors, so RSS is the measure. MFU: model FLOPs of the policy's training step / time / the peak fp32 matmul rate of this
box at the same thread count (a 2048³ `torch.mm`, best of 10, measured in this run before and after the grid, the better kept).
Model FLOPs per token slot (pads included): 4·N for the frozen linear weights (forward + input gradients; LoRA's "≈4N"), 6·N_lora
for the adapters, attention 12·layers·d·T with T the padded row length (PaLM's convention); the LM head (4·N_head) is counted
only at the positions that predict an answer token, since all three trainers run it only there. The reference forward is not
counted (overhead a trainer can avoid), so a mode that runs it every step shows a lower MFU; a packed row holds fewer token
slots per pair, so packing raises pairs/s, not MFU.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FIFTY_M = dict(hidden_size=640, num_hidden_layers=10, intermediate_size=1728, num_attention_heads=10, num_key_value_heads=10,
               max_position_embeddings=2048)  # bench_sft.py's 50m
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES = {"trl": "TRL DPOTrainer (default)", "trl_pre": "TRL DPOTrainer, precompute_ref_log_probs", "alignlab": "alignlab DPOTrainer",
         "alignlab_packed": "alignlab DPOTrainer, packing (shared prompt)"}


# ---------------------------------------------------------------- shared by the children (no alignlab import: TRL's venv has none)
def rss_reset():
    try: open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError: pass

def rss_mb(key="VmHWM"):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"): return int(line.split()[1]) / 1024
    return float("nan")

def matmul_peak(threads, n=2048, reps=10):
    "Peak fp32 GFLOP/s of one large torch.mm at `threads` threads (best of `reps` after a warm-up)."
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9

def _timed(f):
    t = time.perf_counter(); f(); return time.perf_counter() - t

def load_policy(a):
    "The model of `a.model_path` in float32 wrapped in the bench's LoRA (seeded), and its FLOP-relevant sizes."
    import torch
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    model = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    n_lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    c = model.config
    shape = dict(params=sum(p.numel() for p in model.parameters()), n_linear=n_lin, n_head=model.get_output_embeddings().weight.numel(),
                 layers=c.num_hidden_layers,
                 attn_width=c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads))
    torch.manual_seed(a.seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    shape["n_lora"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, shape

def train_flops(shape, width, rows, scored):
    "Model FLOPs of one training step of the policy over `rows` right-padded rows of `width` with `scored` answer tokens (see the docstring)."
    body = 4 * (shape["n_linear"] - shape["n_head"]) + 6 * shape["n_lora"] + 12 * shape["layers"] * shape["attn_width"] * width
    return body * width * rows + 4 * shape["n_head"] * scored


def common_args(a, out):
    return dict(output_dir=out, per_device_train_batch_size=a.batch, max_steps=a.warmup + a.steps, learning_rate=a.lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=10_000, save_strategy="no", report_to=[],
                use_cpu=True, seed=a.seed, data_seed=a.seed, bf16=False, fp16=False, gradient_checkpointing=False, activation_checkpointing=False,
                gradient_accumulation_steps=1, dataloader_num_workers=0, disable_tqdm=True, max_grad_norm=1.0)

ARG_KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "activation_checkpointing",
            "bf16", "max_grad_norm", "seed", "data_seed", "dataloader_num_workers", "weight_decay", "optim")


class Counting:
    "Wraps a data collator; records the rows' lengths (attention mask sums) and the padded width of every batch."
    def __init__(self, inner): self.inner, self.log = inner, []
    def __call__(self, items):
        b = self.inner(items)
        m = b["attention_mask"]
        if m.ndim == 4: lens = (b["position_ids"] != 0).sum(-1) + 1  # a packed row: every token but the first has a position > 0; pads 0
        else: lens = m.sum(-1)
        scored = b["score_index"].shape[1] if "score_index" in b else int((b["labels"] != -100).sum()) if "labels" in b else int(b["completion_mask"].sum())
        self.log.append(dict(width=int(m.shape[-1]), lens=[int(x) for x in lens], pairs=len(items), scored=scored))
        return b


def profile(tr, model):
    "Per step, seconds in: the collator, the policy's forward + loss, the no-grad reference forwards, the backward (the rest of `training_step`)."
    phases = {k: [] for k in ("collate", "forward+loss", "reference forward", "backward")}
    net = model.get_base_model()
    acc = {"ref": 0.0, "col": 0.0}
    def pre(m, a, kw): acc["t"] = time.perf_counter()
    def post(m, a, kw, out):
        if not torch.is_grad_enabled(): acc["ref"] += time.perf_counter() - acc["t"]
    import torch
    net.register_forward_pre_hook(pre, with_kwargs=True); net.register_forward_hook(post, with_kwargs=True)
    col, loss, step = tr.data_collator, tr.compute_loss, tr.training_step
    def collate(items):
        t = time.perf_counter(); out = col(items); acc["col"] += time.perf_counter() - t; return out
    def compute_loss(*a, **kw):
        acc["ref"] = 0.0; t = time.perf_counter(); out = loss(*a, **kw); acc["fl"] = time.perf_counter() - t; return out
    def training_step(*a, **kw):
        t = time.perf_counter(); out = step(*a, **kw); total = time.perf_counter() - t
        phases["forward+loss"].append(acc["fl"] - acc["ref"]); phases["reference forward"].append(acc["ref"])
        phases["backward"].append(total - acc["fl"]); phases["collate"].append(acc["col"]); acc["col"] = 0.0
        return out
    tr.data_collator, tr.compute_loss, tr.training_step = collate, compute_loss, training_step
    return phases


def child(a):
    import torch
    torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer, TrainerCallback
    pairs = [json.loads(l) for l in open(a.data)]
    model, shape = load_policy(a)
    tok = AutoTokenizer.from_pretrained(a.model_path)
    out = tempfile.mkdtemp(prefix="bench_dpo_run_")
    times, ref_s = [], []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter())

    def clocked(f):
        def g(*args, **kw):
            t = time.perf_counter(); r = f(*args, **kw); ref_s.append(time.perf_counter() - t); return r
        return g

    rss_before = rss_mb("VmRSS"); rss_reset()
    if a.mode in ("trl", "trl_pre"):
        import trl
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
        trl.trainer.dpo_trainer.DPOTrainer._precompute_ref_logps = clocked(DPOTrainer._precompute_ref_logps)
        data = Dataset.from_list([{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs])
        cfg = DPOConfig(**common_args(a, out), beta=a.beta, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=a.mode == "trl_pre")
        tr = DPOTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        prep = tr.train_dataset  # TRL trains exactly alignlab's tokens, with the same answer mask
        assert len(prep) == len(pairs)
        for i in range(len(pairs)):
            x, p = prep[i], pairs[i]
            assert x["prompt_ids"] + x["chosen_ids"] == p["ids_w"] and x["prompt_ids"] + x["rejected_ids"] == p["ids_l"], i
            assert len(x["chosen_ids"]) == p["scored_w"] and len(x["rejected_ids"]) == p["scored_l"], i
    else:
        import alignlab.preferences
        from alignlab.datasets import build_dataset
        from alignlab.run import make_trainer
        alignlab.preferences.cache_reference = clocked(alignlab.preferences.cache_reference)
        recs = [p["record"] for p in pairs]
        ds = build_dataset({"sources": [{"name": "train", "records_data": recs, "sample_rate": 1}], "dataset_type": "pair_preferences",
                            "max_tokens_count": 4096}, tok, name="train")
        for i in range(len(pairs)):
            assert ds[i]["inputs_w"]["input_ids"].tolist() == pairs[i]["ids_w"] and ds[i]["inputs_l"]["input_ids"].tolist() == pairs[i]["ids_l"], i
        settings = {k: v for k, v in common_args(a, out).items() if k not in ("output_dir", "gradient_checkpointing")}
        settings.update(loss_settings={"loss_type": "sigmoid", "beta": a.beta}, use_ref_model=False)  # reference: the adapter disabled
        tr = make_trainer("dpo", model, tok, ds, None, settings, out, callbacks=[Clock()], seed=a.seed, packing=a.mode == "alignlab_packed")
        assert tr.alignlab_reference == "adapter-disabled", tr.alignlab_reference
    args = {k: getattr(tr.args, k) for k in ARG_KEYS}
    args["optim"] = str(args["optim"])
    tr.data_collator = counting = Counting(tr.data_collator)
    phases = profile(tr, model) if a.profile else None
    res = tr.train()
    peak = rss_mb()
    steps = a.warmup + a.steps
    assert len(times) == steps and len(counting.log) >= steps, (len(times), len(counting.log), steps)  # the loader may collate one ahead
    dt = times[-1] - times[a.warmup - 1] if a.warmup else times[-1] - times[0]
    timed = counting.log[a.warmup:steps]
    slots = sum(b["width"] * len(b["lens"]) for b in timed)
    useful = sum(sum(b["lens"]) for b in timed)
    flops = sum(train_flops(shape, b["width"], len(b["lens"]), b["scored"]) for b in timed)
    n_pairs = sum(b["pairs"] for b in timed)
    import torch, transformers, peft
    versions = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    if a.mode.startswith("trl"): versions["trl"] = trl.__version__
    print("RESULT " + json.dumps(dict(model=a.model, mode=a.mode, threads=a.threads, seconds=dt, steps=a.steps, pairs=n_pairs,
                                      pairs_s=n_pairs / dt, tokens_s=slots / dt, useful_s=useful / dt, pad_share=1 - useful / slots,
                                      flops_s=flops / dt, ref_seconds=sum(ref_s), n_data=len(pairs), train_loss=res.training_loss,
                                      rss_before_mb=rss_before, peak_rss_mb=peak, args=args, versions=versions,
                                      phases=phases and {k: sum(v[a.warmup:steps]) / a.steps for k, v in phases.items()},
                                      step_s=dt / a.steps, **shape)), flush=True)


# ---------------------------------------------------------------- the parent (main venv, alignlab importable)
def prepare(tmp, a):
    "The pairs (the zoo's preferences train split, first --pairs) as TRL's conversational records + alignlab's ids; the models' dirs."
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import torch
    from alignlab import zoo
    from alignlab.datasets import build_dataset
    from alignlab.templates import IGNORE_INDEX
    tiny = zoo.get("tiny-llama")
    tok = AutoTokenizer.from_pretrained(tiny)
    recs = [json.loads(l) for l in (zoo.get("preferences") / "train.jsonl").read_text().splitlines()][:a.pairs]
    ds = build_dataset({"sources": [{"name": "train", "records_data": recs, "sample_rate": 1}], "dataset_type": "pair_preferences",
                        "max_tokens_count": 4096}, tok, name="train")
    role = lambda m: {"role": "assistant" if m["role"] == "bot" else m["role"], "content": m["content"]}
    with open(tmp / "pairs.jsonl", "w") as f:
        for i, r in enumerate(recs):
            x = ds[i]
            w, l = x["inputs_w"], x["inputs_l"]
            f.write(json.dumps({"prompt": [role(m) for m in r["context"]], "chosen": [role(r["answer_w"])], "rejected": [role(r["answer_l"])],
                                "ids_w": w["input_ids"].tolist(), "ids_l": l["input_ids"].tolist(),
                                "scored_w": int((w["labels"] != IGNORE_INDEX).sum()), "scored_l": int((l["labels"] != IGNORE_INDEX).sum()),
                                "record": r}) + "\n")
    paths = {"tiny": str(tiny)}
    if "50m" in a.models.split(","):
        cfg = LlamaConfig.from_pretrained(tiny).to_dict()
        cfg.update(FIFTY_M); cfg.pop("head_dim", None)
        torch.manual_seed(a.seed)
        m = LlamaForCausalLM(LlamaConfig(**cfg))  # random init, seeded, saved once: both sides load the same weights
        m.save_pretrained(tmp / "50m"); tok.save_pretrained(tmp / "50m")
        paths["50m"] = str(tmp / "50m")
    return paths


def run_child(a, tmp, paths, model, threads, mode):
    py = a.trl_python if mode.startswith("trl") else sys.executable
    cmd = [py, __file__, "--child", "--model", model, "--mode", mode, "--model_path", paths[model], "--data", str(tmp / "pairs.jsonl"),
           f"--threads={threads}"] + [f"--{k}={getattr(a, k)}" for k in ("steps", "warmup", "batch", "lr", "beta", "seed")] + (["--profile"] * a.profile)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])} if not mode.startswith("trl") else \
        {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not line: sys.exit(f"bench child {model}/{threads}/{mode} failed:\n{p.stderr[-4000:]}")
    return json.loads(line[-1][7:])


def peak_in_child(threads):
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_dpo; print(bench_dpo.matmul_peak({threads}))"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])


def table(results, peaks, load):
    rows = ["| model | threads | mode | pairs/s | tokens/s | vs TRL default | vs TRL best | ref s (once) | pairs/s (epoch) | MFU | peak RSS (MB) | train loss |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        same = [x for x in results if x["model"] == r["model"] and x["threads"] == r["threads"]]
        trl = next(x for x in same if x["mode"] == "trl")
        best = max((x for x in same if x["mode"].startswith("trl")), key=lambda x: x["pairs_s"])
        epoch = r["n_data"] / (r["ref_seconds"] + r["n_data"] / r["pairs_s"])
        rows.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {r['threads']} | {MODES[r['mode']]} | {r['pairs_s']:.2f} | {r['tokens_s']:,.0f} | "
                    f"{r['pairs_s'] / trl['pairs_s']:.2f}x | {r['pairs_s'] / best['pairs_s']:.2f}x | {r['ref_seconds']:.1f} | {epoch:.2f} | "
                    f"{r['flops_s'] / 1e9 / peaks[r['threads']]:.1%} | {r['peak_rss_mb']:,.0f} | {r['train_loss']:.4f} |")
    rows.append("")
    rows.append("peak fp32 matmul (2048³ torch.mm): " + ", ".join(f"{t} thread(s) {g:.0f} GFLOP/s" for t, g in sorted(peaks.items()))
                + f"; load average during the run: {load}")
    return "\n".join(rows)


def loadavg(): return open("/proc/loadavg").read().split()[:3]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,50m")
    ap.add_argument("--modes", default="trl,trl_pre,alignlab,alignlab_packed")
    ap.add_argument("--threads", default="1,2", help="torch threads, comma-separated (the same on both sides)")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--pairs", type=int, default=128, help="pairs of the data (the zoo's preferences train split has 600)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per (model, threads, mode); the fastest is kept (for stability, run the bench twice)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-python", dest="trl_python", default="/work/trl-venv/bin/python", help="a python with trl installed")
    ap.add_argument("--packing-contexts", dest="packing_contexts", default="zoo,64,256,1024",
                    help="shared-prompt packing micro-benchmark: 'zoo' (the real pairs) and/or synthetic context lengths")
    ap.add_argument("--packing-models", dest="packing_models", default="tiny,50m")
    ap.add_argument("--packing-threads", dest="packing_threads", type=int, default=1, help="torch threads of the packing micro-benchmark")
    ap.add_argument("--no-packing", dest="packing", action="store_false")
    ap.add_argument("--profile", action="store_true", help="also time each step's phases (collate, forward, reference, backward, the rest)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for k in ("model", "mode", "model_path", "data"): ap.add_argument(f"--{k}", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        a.threads = int(a.threads); return child(a)
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    a.pairs = max(a.pairs, (a.warmup + a.steps) * a.batch)
    paths = prepare(tmp, a)
    threads = [int(t) for t in a.threads.split(",")]
    loads = [loadavg()]
    peaks = {t: peak_in_child(t) for t in threads}
    print("peak fp32 matmul GFLOP/s:", {t: round(g) for t, g in peaks.items()}, "load", loads[-1], flush=True)
    results, modes = [], a.modes.split(",")
    for m in a.models.split(","):
        for t in threads:
            best = {}
            for rep in range(a.repeats):  # modes interleaved: a burst of load elsewhere does not hit one mode only
                for mode in modes:
                    r = run_child(a, tmp, paths, m, t, mode)
                    loads.append(loadavg())
                    print(f"{m:4s} {t}t {mode:8s} {r['pairs_s']:7.2f} pairs/s {r['tokens_s']:8,.0f} tok/s  ref {r['ref_seconds']:5.1f} s  "
                          f"peak {r['peak_rss_mb']:6,.0f} MB  loss {r['train_loss']:.5f}  ({r['seconds']:.1f} s, load {loads[-1][0]})", flush=True)
                    if mode not in best or r["pairs_s"] > best[mode]["pairs_s"]: best[mode] = r
            results += [best[mode] for mode in modes]
    for t in threads: peaks[t] = max(peaks[t], peak_in_child(t))  # the box's peak: the better of before and after the grid
    for m in a.models.split(","):  # the same training settings and stack on both sides
        same = [r for r in results if r["model"] == m]
        assert len({json.dumps({k: v for k, v in r["args"].items() if k != "optim"}, sort_keys=True) for r in same}) == 1, [r["args"] for r in same]
        assert len({json.dumps({k: r["versions"][k] for k in ("torch", "transformers", "peft")}) for r in same}) == 1, [r["versions"] for r in same]
    load = f"{min(float(l[0]) for l in loads):.1f}–{max(float(l[0]) for l in loads):.1f} (1-min)"
    print(); print(table(results, peaks, load))
    for m in a.models.split(","):
        for t in threads:
            get = {r["mode"]: r for r in results if r["model"] == m and r["threads"] == t}
            if not any(k.startswith("trl") for k in get): continue
            best = max((get[k] for k in get if k.startswith("trl")), key=lambda x: x["pairs_s"])
            for k in [k for k in get if k.startswith("alignlab")]:
                print(f"{m} {t} thread(s): {MODES[k]} / TRL best ({best['mode']}) = {get[k]['pairs_s'] / best['pairs_s']:.2f}x pairs/s "
                      f"(target >= 1.3x); MFU {get[k]['flops_s'] / 1e9 / peaks[t]:.1%} vs TRL best {best['flops_s'] / 1e9 / peaks[t]:.1%}")
    if a.profile:
        print("\nper step, seconds: collate | forward + loss | reference forward | backward | the rest (optimizer, clipping, loader, callbacks) | step")
        for r in results:
            ph = r["phases"]; rest = r["step_s"] - sum(ph.values())
            print(f"{r['model']:4s} {r['threads']}t {MODES[r['mode']]:45s} " + " | ".join(f"{ph[k]:.3f}" for k in ph) + f" | {rest:.3f} | {r['step_s']:.3f}")
    out = lambda packing: Path(a.json).write_text(json.dumps({"results": results, "peaks": peaks, "packing": packing, "loads": loads}, indent=1))
    if a.json: out([])  # the grid, even if the packing section fails
    packing = []
    if a.packing and a.packing_contexts:
        import packing_bench
        packing = packing_bench.run(a, tmp, paths, a.packing_threads)
    if a.json: out(packing)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
