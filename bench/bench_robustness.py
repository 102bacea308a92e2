"""Does the quickstart learn on any machine? The quickstart (and the RM-from-SFT run) over (zoo seed, train seed) pairs x
CPU kernel sets, each cell a fresh process with its own zoo built under that kernel set.

Run: HF_HUB_OFFLINE=1 python bench/bench_robustness.py [--pairs 0:0,1:2,2:4,3:1,4:3] [--kernels native,avx2,default]
     [--threads 1] [--jobs 2] [--out bench/robustness.jsonl] [--root DIR] [--no-rm] [--table] [--redo-rm NEW.jsonl]
     [--sft-lr LR] [--sft-steps N] [--rm-lr LR] (a candidate recipe; rows record it)
     (8-15 min per cell on one core of a 2-core machine running two cells; the zoo build is most of it)
Kernel sets (this machine emulates others): `native` is what the CPU offers; `avx2` and `default` cap ATen's dispatch
(`ATEN_CPU_CAPABILITY`), oneDNN (`ONEDNN_MAX_CPU_ISA`) and MKL (`MKL_ENABLE_INSTRUCTIONS`) at AVX2 / pre-AVX levels, so matmuls,
reductions and softmaxes round differently, as they do on another CPU. The same kernel set on another CPU vendor is another
machine again (MKL and oneDNN dispatch by vendor): every row records the CPU's model name. A cell builds the zoo with
`ALIGNLAB_ZOO_SEED` (its own `ALIGNLAB_HOME` per kernel set under --root, so no zoo is shared across kernels, and a zoo already
built there is reused), runs `alignlab.quickstart.quickstart(seed=train seed)`, then `alignlab.quickstart.reward_model` on its
adapter, both with their defaults (each row records them under `recipe`). Results are appended to --out as they arrive (one
JSON line per cell; cells already there for this CPU are not rerun) and printed as a markdown table. `--redo-rm NEW` reruns only
the reward model of this CPU's cells in --out, on the quickstart runs kept under --root, into NEW.
"""
import argparse, inspect, json, os, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNELS = {
    "native": {},
    "avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2"),
    "default": dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_ENABLE_INSTRUCTIONS="SSE4_2"),
}


def cpu_name() -> str:
    "The CPU's model name: a kernel set on one CPU is not the same machine as on another (MKL and oneDNN dispatch by vendor)."
    try: return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration): import platform; return platform.processor() or "unknown"


def cell(zoo_seed:int, train_seed:int, threads:int, rm:bool, reuse:bool=False, sft:dict=None, rm_kw:dict=None) -> dict:
    "One cell, in this process (the parent has set the kernel environment)."
    import torch
    torch.set_num_threads(threads)
    from alignlab import zoo
    from alignlab.quickstart import quickstart, reward_model
    t = time.time()
    zoo.get("tiny-llama"); zoo.get("chat")
    card = zoo.card("tiny-llama")
    out = dict(zoo_seed=zoo_seed, train_seed=train_seed, threads=threads, cpu=cpu_name(),
               capability=torch.backends.cpu.get_cpu_capability(),
               zoo_seconds=round(time.time() - t, 1), fact_accuracy=card.get("fact_accuracy"),
               pretrain_steps=card.get("steps"))
    # the runs stay beside the cell's zoo (its ALIGNLAB_HOME), so that after a change of the RM recipe `--redo-rm` (reuse) can
    # rerun the reward model alone on the quickstart kept there; without it the quickstart always runs again
    d = Path(os.environ.get("ALIGNLAB_HOME", tempfile.mkdtemp()))/"bench-runs"/f"{zoo_seed}-{train_seed}-t{threads}"
    kept = d/"qs"/"summary.json"
    if reuse and not kept.exists(): raise SystemExit(f"--redo-rm: no kept quickstart at {kept}")
    if not reuse and d.exists(): shutil.rmtree(d)
    s = json.loads(kept.read_text()) if reuse else quickstart(d/"qs", seed=train_seed, progress=False, log=lambda *a: None, **(sft or {}))
    out.update(em_before=s["exact_match_before"], em_after=s["exact_match_after"], first_loss=s["first_loss"],
               last_loss=s["last_loss"], qs_seconds=s["train_seconds"])
    out["recipe"] = dict(sft_lr=s["lr"], sft_steps=s["steps"], lora_r=s["lora_r"])
    if rm:
        rm_defaults = {k: v.default for k, v in inspect.signature(reward_model).parameters.items() if k in ("lr", "steps", "schedule")}
        rm_defaults.update(rm_kw or {})
        out["recipe"].update({f"rm_{k}": v for k, v in rm_defaults.items()})
        if (d/"rm").exists(): shutil.rmtree(d/"rm")
        r = reward_model(d/"rm", s["adapter"], seed=train_seed, **(rm_kw or {}))
        out.update(rm_accuracy=[round(h["eval_pair_accuracy"], 3) for h in r["eval_history"]], rm_seconds=r["train_seconds"])
    return out


def run_cell(kernel:str, zoo_seed:int, train_seed:int, threads:int, rm:bool, root:Path, reuse:bool=False, sft:dict=None,
             rm_kw:dict=None) -> dict:
    "One cell in a fresh process with the kernel set's environment and its own ALIGNLAB_HOME."
    env = {**os.environ, **KERNELS[kernel], "ALIGNLAB_HOME": str(root/f"home-{kernel}"), "ALIGNLAB_ZOO_SEED": str(zoo_seed),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = ([sys.executable, __file__, "--cell", f"{zoo_seed}:{train_seed}", "--threads", str(threads)] + ([] if rm else ["--no-rm"])
           + (["--reuse"] if reuse else []) + (["--sft", json.dumps(sft)] if sft else []) + (["--rm", json.dumps(rm_kw)] if rm_kw else []))
    t = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        return dict(kernel=kernel, zoo_seed=zoo_seed, train_seed=train_seed, threads=threads, cpu=cpu_name(), error=r.stderr.strip().splitlines()[-1:])
    return dict(kernel=kernel, **json.loads(r.stdout.strip().splitlines()[-1]), cell_seconds=round(time.time() - t, 1))


def table(rows:list) -> str:
    head = ("| CPU | kernels | zoo seed | train seed | threads | SFT lr, steps | zoo pre-training steps | zoo fact accuracy | EM before | EM after | first → last loss "
            "| RM pair accuracy (per 100 steps) | seconds (zoo + quickstart + RM) |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|---|---:|")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r.get('cpu', '?')} | {r['kernel']} | {r['zoo_seed']} | {r['train_seed']} | {r['threads']} | | error: {r['error']} | | | | | | |"); continue
        rm = ", ".join(f"{a:.2f}" for a in r.get("rm_accuracy", [])) or "–"
        lines.append(f"| {r.get('cpu', '?')} | {r['kernel']} ({r['capability']}) | {r['zoo_seed']} | {r['train_seed']} | {r['threads']} | {r.get('recipe', {}).get('sft_lr', '?'):g}, {r.get('recipe', {}).get('sft_steps', '?')} | {r['pretrain_steps']} | {r['fact_accuracy']} "
                     f"| {r['em_before']:.3f} | **{r['em_after']:.3f}** | {r['first_loss']:.3f} → {r['last_loss']:.3f} | {rm} "
                     f"| {r['cell_seconds']:.0f} |")
    return head + "\n" + "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="0:0,1:2,2:4,3:1,4:3", help="zoo_seed:train_seed,...")
    ap.add_argument("--kernels", default="native,avx2,default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="cells run at once (keep jobs x threads <= cores)")
    ap.add_argument("--out", default="bench/robustness.jsonl")
    ap.add_argument("--root", default=None, help="where the per-kernel zoos go (default: a temporary folder)")
    ap.add_argument("--no-rm", action="store_true")
    ap.add_argument("--table", action="store_true", help="only print the table of the cells in --out")
    ap.add_argument("--redo-rm", default=None, help="rerun the RM of this CPU's cells in --out (their kept quickstart reused, under "
                    "--root); write the rows to this file")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--reuse", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--sft-lr", type=float, default=None, help="a candidate SFT peak lr (default: the quickstart's)")
    ap.add_argument("--sft-steps", type=int, default=None, help="a candidate number of SFT steps (default: the quickstart's)")
    ap.add_argument("--rm-lr", type=float, default=None, help="a candidate RM peak lr (default: reward_model's)")
    ap.add_argument("--sft", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rm", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell:
        z, t = map(int, a.cell.split(":"))
        print(json.dumps(cell(z, t, a.threads, not a.no_rm, a.reuse, json.loads(a.sft) if a.sft else None,
                              json.loads(a.rm) if a.rm else None)), flush=True); return
    pairs = [tuple(map(int, p.split(":"))) for p in a.pairs.split(",")]
    kernels = a.kernels.split(",")
    bad = [k for k in kernels if k not in KERNELS]
    if bad: sys.exit(f"--kernels: unknown {bad}; expected some of {list(KERNELS)}")
    out = Path(a.out)
    done = [json.loads(l) for l in out.read_text().splitlines()] if out.exists() else []
    here = cpu_name()
    sft = {k: v for k, v in (("lr", a.sft_lr), ("steps", a.sft_steps)) if v is not None}
    lr_steps = lambda r: (r.get("recipe", {}).get("sft_lr"), r.get("recipe", {}).get("sft_steps"))
    import alignlab.quickstart as Q
    want = (sft.get("lr", inspect.signature(Q.quickstart).parameters["lr"].default), sft.get("steps", inspect.signature(Q.quickstart).parameters["steps"].default))
    # a cell is done when this CPU has it with the same SFT recipe
    have = {(r.get("cpu"), r["kernel"], r["zoo_seed"], r["train_seed"], r["threads"]) for r in done if "error" not in r and lr_steps(r) == want}
    todo = [] if a.table else [(k, z, t) for z, t in pairs for k in kernels if (here, k, z, t, a.threads) not in have]
    if a.redo_rm:
        todo = [(r["kernel"], r["zoo_seed"], r["train_seed"]) for r in done if r.get("cpu") == here and r["threads"] == a.threads
                and "error" not in r]
        out = Path(a.redo_rm)
    root = Path(a.root or tempfile.mkdtemp(prefix="alignlab-robust-"))
    def go(job):
        r = run_cell(*job, a.threads, not a.no_rm, root, reuse=bool(a.redo_rm), sft=sft or None, rm_kw={"lr": a.rm_lr} if a.rm_lr else None)
        with open(out, "a") as f: f.write(json.dumps(r) + "\n")
        print(json.dumps(r), file=sys.stderr, flush=True)
        return r
    with ThreadPoolExecutor(a.jobs) as ex: list(ex.map(go, todo))
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    rows.sort(key=lambda r: (r.get("cpu", ""), list(KERNELS).index(r["kernel"]), r["zoo_seed"], r["train_seed"], r["threads"]))
    print(table(rows))


if __name__ == "__main__":
    main()
