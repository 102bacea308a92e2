"""RAG results, per seed x CPU kernel set: exact match on the zoo's held-out RAG questions with retrieval vs the same generator without
it (`alignlab.rag_inference.rag_finetune_demo`), and recall@1 / recall@n_docs of the gold passage before vs after end-to-end training
(`alignlab.rag_training.rag_recall_demo`, starting from that demo's generator).

Run: HF_HUB_OFFLINE=1 python bench/bench_rag_results.py [--seeds 0,1,2] [--kernels native,avx2] [--cells native:0,avx2:0] [--jobs 2] [--threads 1] [--out FILE] [--no-e2e]
Each cell is a fresh process with its seed and kernel set (`avx2` caps ATen, oneDNN and MKL at AVX2, as bench_robustness.py does:
another CPU's rounding), one torch thread (`--threads`). Rows are printed as JSON lines as they arrive, then as a markdown table.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

KERNELS = {"native": {}, "avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2"),
           "default": dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_ENABLE_INSTRUCTIONS="SSE4_2")}


def cell(seed:int, e2e:bool, threads:int=1) -> dict:
    "One cell, in this process (the parent has set the kernel environment)."
    import torch
    torch.set_num_threads(threads)
    from alignlab.rag_inference import rag_finetune_demo
    from alignlab.rag_training import rag_recall_demo
    with tempfile.TemporaryDirectory() as d:
        t = time.time()
        ft = rag_finetune_demo(f"{d}/gen", seed=seed, log=lambda m: None)
        row = dict(seed=seed, threads=threads, em_with=ft["em_with_retrieval"], em_without=ft["em_without_retrieval"], n_questions=ft["n_questions"],
                   finetune_s=round(time.time() - t))
        if e2e:
            t = time.time()
            r = rag_recall_demo(f"{d}/e2e", ft["model_dir"], seed=seed)
            row.update(recall_before=r["before"], recall_after=r["after"], e2e_s=round(time.time() - t))
    return row


def run_cell(seed:int, kernel:str, e2e:bool, threads:int=1) -> dict:
    env = {**os.environ, **KERNELS[kernel], "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, __file__, "--cell", str(seed), "--threads", str(threads)] + ([] if e2e else ["--no-e2e"])
    p = subprocess.run(args, env=env, capture_output=True, text=True)
    if p.returncode: return dict(seed=seed, kernel=kernel, error=p.stderr.strip().splitlines()[-1:])
    return dict(kernel=kernel, **json.loads(p.stdout.strip().splitlines()[-1]))


def table(rows:list) -> str:
    out = ["| kernels | threads | seed | EM with retrieval | EM without | recall@1 before → after | recall@n before → after | time (s) |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r: out.append(f"| {r['kernel']} | | {r['seed']} | error: {r['error']} | | | | |"); continue
        b, a = r.get("recall_before") or {}, r.get("recall_after") or {}
        k = sorted(b, key=lambda x: int(x.split("@")[1]))
        rec = [f"{b[x]} → {a[x]}" for x in k] if k else ["—", "—"]
        out.append(f"| {r['kernel']} | {r.get('threads', 1)} | {r['seed']} | {r['em_with']} | {r['em_without']} | {rec[0]} | {rec[-1]} | "
                   f"{r['finetune_s']} + {r.get('e2e_s', 0)} |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--kernels", default="native,avx2")
    ap.add_argument("--cells", default=None, help="kernel:seed pairs (e.g. native:0,native:1,native:2,avx2:0) in place of seeds x kernels")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--no-e2e", action="store_true", help="only the exact-match cell")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per cell (float sums split differently: another margin)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cell", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cell is not None: print(json.dumps(cell(a.cell, not a.no_e2e, a.threads))); return
    jobs = ([(int(c.split(":")[1]), c.split(":")[0]) for c in a.cells.split(",")] if a.cells else
            [(int(s), k) for k in a.kernels.split(",") for s in a.seeds.split(",")])
    rows = []
    with ThreadPoolExecutor(a.jobs) as ex:
        for r in ex.map(lambda j: run_cell(*j, not a.no_e2e, a.threads), jobs):
            rows.append(r); print(json.dumps(r), flush=True)
    if a.out: Path(a.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))


if __name__ == "__main__":
    main()
