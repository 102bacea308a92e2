"""`accelerate launch --num_processes 2` runs alignlab SFT on a CPU box: two gloo ranks, one process group, one final adapter."""
import json, os, socket, subprocess, sys
from pathlib import Path
import pytest

SCRIPT = Path(__file__).parent/"scripts"/"train_sft.py"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_accelerate_two_cpu_processes(tmp_path):
    accelerate = Path(sys.executable).parent/"accelerate"
    if not accelerate.exists(): pytest.fail("accelerate CLI not installed next to this python")
    run = tmp_path/"run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               HF_HOME=str(tmp_path/"hf"))  # no user accelerate config is read
    env.setdefault("ALIGNLAB_HOME", "/tmp/alhome1")
    # `--multi_gpu` is accelerate's torchrun-style multi-process launcher; on a machine without GPUs alignlab's
    # use_cpu default makes each rank join a gloo process group (accelerate's MULTI_CPU); `--cpu` would start ONE process.
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(SCRIPT), str(run), "--steps", "12", "--save_steps", "6", "--batch", "4", "--dropout", "0"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "RANK 0 of 2 done, steps 12" in out and "RANK 1 of 2 done, steps 12" in out, out[-3000:]
    summary = json.loads((run/"train_summary.json").read_text())  # written by rank 0
    assert summary["world_size"] == 2 and summary["steps"] == 12
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["epochs"] == pytest.approx(12 * 4 * 2 / 200)  # each step consumed 2 ranks x 4 samples
    final = run/"final"
    assert (final/"adapter_model.safetensors").exists() and not (run/".final.tmp").exists()
    ck = run/"trainer"/"checkpoint-12"
    assert (ck/"rng_state_0.pth").exists() and (ck/"rng_state_1.pth").exists()  # both ranks wrote their part
    assert (ck/"alignlab_checkpoint.json").exists()  # ... before the marker, which rank 0 wrote once
