"""SIGKILL a LoRA SFT run at a random step, resume it, and compare its final adapter with an uninterrupted run (same seed)."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path
import pytest

SCRIPT = Path(__file__).parent/"scripts"/"train_sft.py"
STEPS, SAVE = 40, 5


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.setdefault("ALIGNLAB_HOME", "/tmp/alhome1")
    return env


def _run(run_dir, *extra, timeout=600):
    r = subprocess.run([sys.executable, str(SCRIPT), str(run_dir), "--steps", str(STEPS), "--save_steps", str(SAVE), *extra],
                       env=_env(), capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((Path(run_dir)/"train_summary.json").read_text())


def _adapter(run_dir):
    from safetensors.torch import load_file
    return load_file(str(Path(run_dir)/"final"/"adapter_model.safetensors"))


def _progress(run_dir):
    try: return int((Path(run_dir)/"progress").read_text())
    except (OSError, ValueError): return 0


def test_sigkill_resume_matches_uninterrupted(tmp_path):
    from alignlab.checkpoints import last_checkpoint, checkpoints
    kill_at = random.Random().randint(SAVE + 1, STEPS - 3)  # after the first checkpoint, before the end
    killed = tmp_path/"killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(killed), "--steps", str(STEPS), "--save_steps", str(SAVE)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while _progress(killed) < kill_at or last_checkpoint(killed) is None:
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.time() - t0 < 600, "training too slow to reach the kill step"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    step_killed = _progress(killed)
    resumed_from = last_checkpoint(killed)
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) <= step_killed < STEPS
    assert not (killed/"final").exists()
    summary = _run(killed, "--resume")
    assert summary["resumed_from"] == str(resumed_from), summary
    assert summary["steps"] == STEPS
    full = _run(tmp_path/"full")
    assert full["resumed_from"] is None and full["steps"] == STEPS
    a, b = _adapter(killed), _adapter(tmp_path/"full")
    assert a.keys() == b.keys() and len(a) > 0
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"killed at step {step_killed} (asked {kill_at}), resumed from {resumed_from.name}; max abs adapter diff {diff:.3g}")
    assert diff <= 1e-6, f"killed at {step_killed}, resumed from {resumed_from.name}: max abs diff {diff}"
    # the two runs also logged the same losses after the resume point
    assert summary["train_loss_last"] == pytest.approx(full["train_loss_last"], abs=1e-6)
    assert len(checkpoints(killed)) <= 2  # save_total_limit=2 over complete checkpoints


def test_incomplete_checkpoint_is_ignored(tmp_path):
    """A checkpoint dir without its marker (a half-written one) or with a truncated file is never resumed from."""
    from alignlab.checkpoints import last_checkpoint, mark_complete, MARKER
    run = tmp_path/"run"
    _run(run, "--steps", "10", "--save_steps", "5")
    last = last_checkpoint(run)
    assert last is not None and last.name == "checkpoint-10"
    # a newer, half-written checkpoint (files, no marker): ignored
    half = run/"trainer"/"checkpoint-15"
    half.mkdir()
    (half/"adapter_model.safetensors").write_bytes((last/"adapter_model.safetensors").read_bytes()[:100])
    assert last_checkpoint(run) == last
    # the newest complete one gets truncated after the fact: ignored too, the one before is used
    f = last/"optimizer.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert last_checkpoint(run).name == "checkpoint-5"
    # resume picks checkpoint-5 and runs to 12 (HF's own get_last_checkpoint would have taken checkpoint-15)
    from transformers.trainer_utils import get_last_checkpoint
    assert Path(get_last_checkpoint(str(run/"trainer"))).name == "checkpoint-15"
    r = subprocess.run([sys.executable, str(SCRIPT), str(run), "--steps", "12", "--save_steps", "5", "--resume"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run/"train_summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-5") and summary["steps"] == 12
    assert (run/"trainer"/"checkpoint-10"/MARKER).exists()  # step 10 rewritten, complete again


def test_fresh_fit_refuses_a_run_dir_with_checkpoints(tmp_path):
    run = tmp_path/"run"
    _run(run, "--steps", "5", "--save_steps", "5")
    r = subprocess.run([sys.executable, str(SCRIPT), str(run), "--steps", "5", "--save_steps", "5"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "already has checkpoints (last: checkpoint-5); expected resume=True" in r.stderr
