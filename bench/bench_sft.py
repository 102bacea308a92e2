"""LoRA SFT training speed: alignlab (padded, packed) vs TRL's SFTTrainer (padded) on the same model, data, batch and steps.

Run: HF_HUB_OFFLINE=1 python bench/bench_sft.py [--models tiny,50m] [--steps 6] [--warmup 2] [--batch 16] [--threads 1]
     [--repeats 2] [--max_tokens 128,256]   (about 5 minutes on 2 cores with the defaults)
Each (model, mode) runs in a fresh subprocess, modes interleaved, the fastest of --repeats kept. Both sides train the same
pre-tokenized samples (the zoo's chat data, Llama-3 template, only_answer_loss): TRL gets a `datasets.Dataset` with the same
`input_ids` and `labels`, which it uses as they are (checked). Same LoRA config, lr, batch, steps, seed, torch threads,
gradient accumulation; TRL's CPU-unfriendly defaults (bf16, gradient checkpointing) are set to alignlab's values (checked
from both trainers' args). alignlab trains through `alignlab.run.make_trainer("sft", ..., packing=max_tokens)` (a plain
`transformers.Trainer` with `alignlab.collate.Collator` if that module is missing). A packed batch has `round(batch *
mean padded width / max_tokens)` rows, about the token slots of a padded batch. The time is wall clock from the end of
the last warm-up step to the end of the last step (data loading, collation, forward, backward, optimizer). tokens = every
token slot of the batches (pads included); useful = non-pad tokens. MFU = model FLOPs / time / the box's peak fp32 matmul
rate at the same thread count, measured in the run (bench_dpo.py's count and peak: see its docstring). TRL runs under
--trl-python (default /work/trl-venv/bin/python when it exists), alignlab under this interpreter.
"""
import argparse, json, os, subprocess, sys, time
from pathlib import Path
import numpy as np
sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo import train_flops, peak_in_child  # MFU: the same model-FLOPs count and matmul peak as the DPO bench

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = {  # name -> LlamaConfig overrides (None: the zoo's tiny-llama checkpoint)
    "tiny": None,
    "50m": dict(hidden_size=640, num_hidden_layers=10, intermediate_size=1728, num_attention_heads=10, num_key_value_heads=10,
                max_position_embeddings=1024),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Counting:
    "Wraps a data collator; records (token slots, non-pad tokens, samples) of every batch in collation order."
    def __init__(self, inner): self.inner, self.log = inner, []
    def __call__(self, items):
        b = self.inner(items)
        useful = sum(len(x["input_ids"]) for x in items)  # packed rows hold sample tokens only; the collator adds the pads
        n = sum(len(x["seq_lens"]) if "seq_lens" in x else int((np.asarray(x["position_ids"]) == 0).sum()) if "position_ids" in x else 1
                for x in items)
        rows, width = b["input_ids"].shape
        self.log.append((int(b["input_ids"].numel()), useful, n, rows, width, int((b["labels"][:, 1:] != -100).sum())))
        return b


def load(model_name, seed):
    import torch
    from transformers import AutoTokenizer, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from peft import LoraConfig, get_peft_model
    from alignlab import zoo
    path = zoo.get("tiny-llama")
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    if MODELS[model_name] is None: model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    else:
        base = LlamaConfig.from_pretrained(path).to_dict()
        base.update(MODELS[model_name]); base.pop("head_dim", None)
        model = LlamaForCausalLM(LlamaConfig(**base))  # random init, seeded
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    shape = dict(n_linear=sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)), layers=c.num_hidden_layers,
                 n_head=model.get_output_embeddings().weight.numel(), attn_width=c.num_attention_heads * (getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads))
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    shape["n_lora"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, tok, n_params, shape


def chat_dataset(tok, n):
    from alignlab import zoo
    from alignlab.datasets import build_dataset
    from alignlab.quickstart import chat_settings
    ds = build_dataset(chat_settings(zoo.get("chat") / "train.jsonl", max_tokens_count=256), tok)
    return ds, [ds[i] for i in range(min(n, len(ds)))]


def common_args(a, out, steps):
    return dict(output_dir=out, per_device_train_batch_size=a.batch, max_steps=steps, learning_rate=a.lr, lr_scheduler_type="constant",
                warmup_steps=0, weight_decay=0.0, logging_steps=10_000, save_strategy="no", report_to=[], use_cpu=True, seed=a.seed,
                data_seed=a.seed, bf16=False, fp16=False, activation_checkpointing=False, gradient_accumulation_steps=1, dataloader_num_workers=0,
                disable_tqdm=True, max_grad_norm=1.0)


def packed_rows_per_batch(a, samples):
    "Packed batch size (rows of max_tokens) holding about as many token slots as a padded batch of `--batch` samples."
    import random, statistics
    rng = random.Random(a.seed); L = [len(x["input_ids"]) for x in samples]
    width = statistics.mean(max(rng.sample(L, a.batch)) for _ in range(200))
    return max(1, round(a.batch * width / a.max_tokens)), width


def child(a):
    import torch
    torch.set_num_threads(a.threads)
    from transformers import TrainerCallback
    model, tok, n_params, shape = load(a.model, a.seed)
    ds, samples = chat_dataset(tok, a.samples)
    steps = a.warmup + a.steps
    out = f"/tmp/bench_sft_{os.getpid()}"
    times = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw): times.append(time.perf_counter())

    extra = {}
    if a.mode == "trl":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer
        data = Dataset.from_dict({"input_ids": [x["input_ids"].tolist() for x in samples],
                                  "labels": [x["labels"].tolist() for x in samples]})
        cfg = SFTConfig(**common_args(a, out, steps), max_length=None, packing=False, padding_free=False, dataset_num_proc=None)
        tr = SFTTrainer(model=model, args=cfg, train_dataset=data, processing_class=tok, callbacks=[Clock()])
        prepared = tr.train_dataset  # TRL trains exactly our tokens and loss mask
        assert len(prepared) == len(samples) and all(prepared[i]["input_ids"] == samples[i]["input_ids"].tolist()
                                                     and prepared[i]["labels"] == samples[i]["labels"].tolist() for i in range(0, len(samples), 97))
    else:
        from alignlab.collate import Collator, PackedDataset
        train_ds, bs = samples, a.batch
        a.max_tokens = int(a.max_tokens)
        if a.mode == "packed":
            train_ds = PackedDataset(samples, a.max_tokens)
            bs, width = packed_rows_per_batch(a, samples)
            extra = dict(fill=train_ds.fill, rows_per_batch=bs, max_tokens=a.max_tokens, padded_width=width)
        try:
            from alignlab.run import make_trainer
            extra["trainer"] = "alignlab.run.make_trainer"
            settings = {k: v for k, v in common_args(a, out, steps).items() if k != "output_dir"}
            settings["per_device_train_batch_size"] = bs
            tr = make_trainer("sft", model, tok, ds if len(samples) == len(ds) else samples, None, settings, out,
                              packing=a.max_tokens if a.mode == "packed" else False, callbacks=[Clock()], seed=a.seed)
            if a.mode == "packed": extra.update(fill=getattr(tr.train_dataset, "fill", None))
        except ImportError:
            from transformers import Trainer, TrainingArguments
            extra["trainer"] = "transformers.Trainer + alignlab.collate.Collator"
            args = TrainingArguments(**{**common_args(a, out, steps), "per_device_train_batch_size": bs})
            tr = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=Collator(tok.pad_token_id), callbacks=[Clock()])
    import transformers, peft
    extra["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    extra["args"] = {k: getattr(tr.args, k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "learning_rate",
                     "lr_scheduler_type", "activation_checkpointing", "bf16", "max_grad_norm", "seed", "dataloader_num_workers")}
    tr.data_collator = counting = Counting(tr.data_collator)
    res = tr.train()
    assert len(times) == steps, (len(times), steps)
    dt = times[-1] - times[a.warmup - 1] if a.warmup else times[-1] - times[0]
    timed = counting.log[a.warmup:steps]
    slots, useful, n = (sum(c[i] for c in timed) for i in range(3))
    flops = sum(train_flops(shape, width, rows, scored) for _, _, _, rows, width, scored in timed)  # bench_dpo.py's model FLOPs
    print("RESULT " + json.dumps(dict(model=a.model, mode=a.mode, params=n_params, seconds=dt, steps=a.steps, tokens=slots, useful=useful,
                                      samples=n, tokens_s=slots / dt, useful_s=useful / dt, samples_s=n / dt,
                                      pad_share=1 - useful / slots, train_loss=res.training_loss, threads=a.threads, flops_s=flops / dt, **extra)), flush=True)


def run(a, model, mode):
    mode, _, mt = mode.partition("@")
    py = a.trl_python if mode == "trl" else sys.executable  # TRL lives in its own venv (same torch / transformers / peft: checked)
    cmd = [py, __file__, "--child", "--model", model, "--mode", mode, f"--max_tokens={mt or 0}"] + [
        f"--{k}={getattr(a, k)}" for k in ("steps", "warmup", "batch", "threads", "lr", "seed", "samples")]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not line: sys.exit(f"bench child {model}/{mode} failed:\n{p.stderr[-3000:]}")
    r = json.loads(line[-1][7:])
    if mt: r["mode"] = f"packed@{mt}"
    return r


def table(results, peak):
    rows = ["| model | mode | tokens/step | pad share | tokens/s | useful tokens/s | samples/s | tokens/s vs TRL | useful/s vs TRL | MFU |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        base = next(x for x in results if x["model"] == r["model"] and x["mode"] == "trl")
        rows.append(f"| {r['model']} ({r['params'] / 1e6:.1f}M) | {name(r['mode'])} | {r['tokens'] / r['steps']:.0f} | {r['pad_share']:.1%} | "
                    f"{r['tokens_s']:,.0f} | {r['useful_s']:,.0f} | {r['samples_s']:.1f} | "
                    f"{r['tokens_s'] / base['tokens_s']:.2f}x | {r['useful_s'] / base['useful_s']:.2f}x | {r['flops_s'] / 1e9 / peak:.1%} |")
    rows.append(f"\nMFU: model FLOPs (bench_dpo.py's count: 4·N frozen linear + 6·N_lora per token slot, attention 12·layers·d·T, the LM head at "
                f"the positions that predict a scored token) / time / the peak fp32 matmul rate at {results[0]['threads']} thread(s), {peak:.0f} GFLOP/s "
                f"(a 2048³ torch.mm, the better of before and after the runs)")
    return "\n".join(rows)


def name(mode):
    if mode.startswith("packed@"): return f"alignlab, packed ({mode[7:]}-token rows)"
    return {"trl": "TRL SFTTrainer, padded", "padded": "alignlab, padded"}[mode]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,50m")
    ap.add_argument("--modes", default="trl,padded,packed")
    ap.add_argument("--steps", type=int, default=6, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--batch", type=int, default=16, help="samples per padded batch (packed: rows of about as many token slots)")
    ap.add_argument("--max_tokens", default="128,256", help="packed row length(s), comma-separated (child: one int)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the same on both sides)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per (model, mode); the fastest is kept")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--samples", type=int, default=2000, help="chats used (the zoo's chat train split has 2000)")
    ap.add_argument("--trl-python", dest="trl_python", default="/work/trl-venv/bin/python" if os.path.exists("/work/trl-venv/bin/python") else sys.executable,
                    help="a python with trl installed (the TRL runs; alignlab's own modules are found through PYTHONPATH)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS); ap.add_argument("--mode", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child: return child(a)
    modes = [f"packed@{t}" if mode == "packed" else mode for mode in a.modes.split(",")
             for t in (a.max_tokens.split(",") if mode == "packed" else [None])]
    peak = peak_in_child(a.threads)
    results = []
    for m in a.models.split(","):
        best = {}
        for rep in range(a.repeats):  # modes interleaved, so a burst of load elsewhere does not hit one mode only
            for mode in modes:
                r = run(a, m, mode)
                print(f"{m:5s} {mode:7s} {r['tokens_s']:9,.0f} tok/s {r['useful_s']:9,.0f} useful/s  pad {r['pad_share']:.1%}  "
                      f"loss {r['train_loss']:.4f}  ({r['seconds']:.1f} s)", flush=True)
                if mode not in best or r["tokens_s"] > best[mode]["tokens_s"]: best[mode] = r
        results += [best[mode] for mode in modes]
    for m in a.models.split(","):  # the same training settings on both sides (the packed batch counts rows)
        same = {json.dumps({k: v for k, v in r["args"].items() if k != "per_device_train_batch_size"}, sort_keys=True)
                for r in results if r["model"] == m}
        assert len(same) == 1, same
        assert len({r["args"]["per_device_train_batch_size"] for r in results if r["model"] == m and not r["mode"].startswith("packed")}) == 1
        assert len({json.dumps(r["versions"], sort_keys=True) for r in results if r["model"] == m}) == 1, [r["versions"] for r in results]
    peak = max(peak, peak_in_child(a.threads))
    print(); print(table(results, peak))
    if "trl" in a.modes.split(","):
        for m in a.models.split(","):
            get = {r["mode"]: r for r in results if r["model"] == m}
            t = get["trl"]
            if "padded" in get: print(f"{m}: alignlab padded / TRL padded = {get['padded']['tokens_s'] / t['tokens_s']:.2f}x tokens/s (target >= 1.0x); "
                                      f"MFU alignlab {get['padded']['flops_s'] / 1e9 / peak:.1%}, TRL {t['flops_s'] / 1e9 / peak:.1%}")
            for k in [k for k in get if k.startswith("packed")]:
                print(f"{m}: alignlab {k} / TRL padded = {get[k]['useful_s'] / t['useful_s']:.2f}x useful tokens/s (target >= 1.5x)")
    if a.json: open(a.json, "w").write(json.dumps({"results": results, "peak_gflops": peak}, indent=1))


if __name__ == "__main__":
    main()
