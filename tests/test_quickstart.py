"""The README's first command: `alignlab quickstart` on the embedded default."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("qs") / "run"
    r = subprocess.run([sys.executable, "-m", "alignlab", "quickstart", "--run_dir", str(d)], capture_output=True, text=True,
                       timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r


def test_run_directory_holds_everything(run):
    d, r = run
    for f in ["final/adapter_config.json", "final/adapter_model.safetensors", "loss.png", "generations.html",
              "generations.jsonl", "sample.html", "summary.json", "experiment.json"]:
        assert (d / f).exists(), f
    assert (d / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "400/400" in r.stderr  # the trainer's progress bar
    # the run went through the Experiment: its settings load back as the same experiment
    from alignlab.experiment import Experiment
    assert Experiment.from_settings(d / "experiment.json").settings().trainer_settings.max_steps == 400


def test_training_improves_held_out_answers(run):
    d, _ = run
    s = json.loads((d / "summary.json").read_text())
    assert s["exact_match_after"] > s["exact_match_before"]
    # 60 held-out prompts (one = 0.017). 0.8 is the bench's target (bench/bench_robustness.py). At lr 3e-3: 1.00 with zoo seed 0
    # (this test's zoo) under all three kernel sets, 0.95-1.00 in all 15 cells. At 2e-3 one slow cell reached 0.70; at
    # 5e-3 one seed pair stayed on the marginal-category plateau (0.65 on a Xeon, 0.48 on an AMD EPYC)
    assert s["exact_match_after"] >= 0.8, s
    assert s["last_loss"] < s["first_loss"] / 3
    rows = [json.loads(l) for l in (d / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == s["n_test"] and sum(r["correct_after"] for r in rows) / len(rows) == s["exact_match_after"]


def test_adapter_loads_with_plain_peft_and_reproduces_the_answers(run):
    import torch
    from transformers import AutoTokenizer, AutoModelForCausalLM
    from peft import PeftModel
    from alignlab import zoo
    d, _ = run
    base = AutoModelForCausalLM.from_pretrained(zoo.get("tiny-llama"))
    model = PeftModel.from_pretrained(base, d / "final").eval()
    tok = AutoTokenizer.from_pretrained(d / "final")
    rows = [json.loads(l) for l in (d / "generations.jsonl").read_text().splitlines()][:5]
    for r in rows:
        ids = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip() == r["after"]


def test_pages_escape_and_show_the_mask(run):
    d, _ = run
    sample = (d / "sample.html").read_text()
    assert 'class="tok loss"' in sample and "&lt;|eot_id|&gt;" in sample and "<|eot_id|>" not in sample
    gens = (d / "generations.html").read_text()
    assert "exact match before" in gens


def test_reward_model_from_the_sft_model_ranks_held_out_pairs(run, tmp_path):
    """SFT -> RM, as in RLHF: the quickstart's adapter merged into the base, then a reward model (full fine-tuning, seq_cls with one
    output) on the zoo preferences; its pair accuracy on the held-out val pairs rises well above chance.
    (From the raw pre-trained base it does not: the <|eot_id|> states it pools are nearly identical, cosine 0.9999.)"""
    from alignlab.quickstart import reward_model  # on one thread, as the bench measured it (the module's fixture)
    d, _ = run
    s = reward_model(tmp_path, d / "final")
    acc = [h["eval_pair_accuracy"] for h in s["eval_history"]]
    # 100 held-out pairs (one pair = 0.01); issue 10's bench target is >= 0.75 for the trained RM. SFT 3e-3 + RM 2e-4: the final
    # accuracy was 0.93-1.00 in all 15 cells (AMD EPYC and Intel Xeon, three kernel sets; zoo seed 0: 1.00, 0.93, 0.99); the first
    # evaluation (step 100) can still be low (0.69-0.75 in one cell), so the test holds the last one, and that it does not fall back
    assert acc[-1] >= 0.75, acc
    assert acc[-1] >= max(acc) - 0.05, acc
    assert s["eval"]["eval_reward_margin"] > 0
