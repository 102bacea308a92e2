"""The preference doctor (nbs/02c_pair_doctor, nbs/07d_preference_doctor): each check has a case that triggers it and a negative
control that does not, on hand-made records and the zoo's pairs, through `build_dataset` (the data checks: DatasetReport
warnings), `preference_doctor` (the reference's checks on the zoo's tiny Llama) and a `train_dpo` run (one line per reference
check before step 0, and the findings in the run summary)."""
import json, tempfile
import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after

PLAIN = {"role_tag_mapping": {"system": "system", "user": "user", "bot": "bot"}, "prefix_template": "[{role}] ", "suffix_template": "\n"}


@pytest.fixture(scope="module")
def model():
    from alignlab.models import load_model
    return load_model({"model_path": "tiny-llama", "transformers_settings": {"torch_dtype": "float32"}})[0]


def _zoo(n, split="val"):
    from alignlab import zoo
    return [json.loads(l) for l in (zoo.get("preferences") / f"{split}.jsonl").read_text().splitlines()[:n]]


def _pair(i, question, w, l):
    return {"id": f"p{i}", "context": [{"role": "user", "content": question}], "answer_w": {"role": "bot", "content": w},
            "answer_l": {"role": "bot", "content": l}}


def _build(tok, records, **kw):
    from alignlab.datasets import build_dataset
    return build_dataset({"sources": [{"name": "p", "records_data": records, "sample_rate": 1}], "dataset_type": "pair_preferences",
                          "max_tokens_count": 64, **kw}, tok, name="p")


def _warned(ds, check):
    return [w for w in ds.report.warnings if w.startswith(check + ":")]


def test_the_zoo_pairs_raise_no_data_warning(tok):
    """Negative control for every data check at once: the zoo's pairs (Llama-3 template) are not identical, fit whole, share
    their context tokens and tie in length."""
    ds = _build(tok, _zoo(100))
    p = ds.report.pairs
    assert (p.pairs, p.identical, p.parted, p.bare, p.unequal) == (100, [], [], [], 0)
    assert ds.report.warnings == []


def test_identical_pairs_are_flagged_by_record(tok):
    recs = _zoo(6)
    recs[4] = {**recs[4], "answer_l": recs[4]["answer_w"]}
    ds = _build(tok, recs)
    assert ds.report.pairs.identical == [4]
    (w,) = _warned(ds, "identical pairs")
    assert w.startswith("identical pairs: 1 of 6 pairs") and "record val-4 (p.records_data[4])" in w


def test_truncation_that_takes_a_sides_context_is_flagged(tok):
    """keep_end truncates each side alone: a long chosen answer loses the question its short rejected answer keeps. Control:
    the same pair with room for both sides whole."""
    long_w = "It is a person, and I can say so because the question says so."
    recs = [_pair(0, "What is the purple singer?", long_w, "It is a food."), _pair(1, "What is it?", "It is a thing.", "It is a food.")]
    ds = _build(tok, recs, max_tokens_count=40)
    assert ds.status == ["truncated", "ok"] and ds.report.pairs.bare == [(0, "chosen")]
    (w,) = _warned(ds, "truncation")
    assert w.startswith("truncation: 1 of 2 pairs lost context to max_tokens_count: 1 kept no context") and "record p0" in w
    assert _build(tok, recs, max_tokens_count=64).report.warnings == []


def test_an_answer_that_does_not_fit_is_counted_once_as_a_drop(tok):
    """An answer too long for max_tokens_count on its own drops its pair (the build's drop line); the doctor does not count it again."""
    recs = [_pair(0, "What is it?", "It is a person " + "and on " * 30, "It is a food."), _pair(1, "What is it?", "It is a thing.", "It is a food.")]
    ds = _build(tok, recs, max_tokens_count=40)
    assert ds.report.n_dropped == 1 and ds.report.pairs.pairs == 1
    assert [l for l in ds.report.drop_lines() if "no run of whole messages fits" in l] and ds.report.warnings == []


def test_a_context_tokenized_differently_on_the_two_sides_is_flagged(tok):
    """Under `[{role}] ` the chosen answer `person.` takes the prefix's space into `Ġperson`; `It is a food.` does not (no `ĠI`).
    Controls: the Llama-3 template; and the plain template with both answers starting alike."""
    seam = [_pair(0, "What is the singer?", "person.", "It is a food.")]
    ds = _build(tok, seam, prompt_template=PLAIN)
    (p,) = ds.report.pairs.parted
    assert p.how == "tokens" and tok.convert_ids_to_tokens(list(p.rejected)) == ["]", "Ġ"]
    (w,) = _warned(ds, "context tokens")
    assert "record p0 (p.records_data[0])" in w and "move the space at the end of prefix_template" in w
    assert _warned(_build(tok, seam), "context tokens") == []
    assert _build(tok, [_pair(0, "What is the singer?", "It is a person.", "It is a food.")], prompt_template=PLAIN).report.pairs.parted == []


def _lengths(n_longer, n_shorter, n_tie=0):
    "Pairs whose chosen answer is longer (a clause added), shorter (the clause on the rejected side) or the same length."
    out, base = [], ("It is a person.", "It is a food.")
    for i in range(n_longer + n_shorter + n_tie):
        w, l = base
        if i < n_longer: w = "It is a person, as the question says."
        elif i < n_longer + n_shorter: l = "It is a food, as the question says."
        out.append(_pair(i, f"What is thing {i}?", w, l))
    return out


@pytest.mark.parametrize("longer, shorter, warns", [
    (24, 6, "longer in 80%"),    # outside 40-60%, p = 0.001: a bias
    (6, 24, "shorter in 80%"),   # the other way: DPO learns to shorten
    (15, 15, None),              # balanced
    (7, 3, None),                # 70% but on 10 pairs: p = 0.34, chance
])
def test_length_bias_warns_outside_the_band_only_when_chance_cannot_explain_it(tok, longer, shorter, warns):
    ds = _build(tok, _lengths(longer, shorter, n_tie=4))
    p = ds.report.pairs
    assert (p.longer, p.shorter) == (longer, shorter)
    lines = _warned(ds, "length bias")
    if warns is None: assert lines == [] and not p.length_biased
    else:
        (w,) = lines
        assert warns in w and "average_log_prob: true, or loss_type simpo" in w


def _the(records):
    "Each rejected answer's category word replaced by `the`: the same tokens count, a sentence the reference never saw."
    return [{**r, "answer_l": {**r["answer_l"], "content": r["answer_w"]["content"].rsplit(" ", 1)[0] + " the."}} for r in records]


def test_reference_accuracy_warns_when_the_reference_already_knows(tok, model):
    """On the zoo's pairs the tiny Llama ranks about half right: no warning. With `It is a the.` as every rejected answer it ranks
    them all right: the warning (and no length warning: the lengths are equal). The numbers are the reference's log-probs of the
    right sides: each chosen value equals a hand computation, one forward per side."""
    import numpy as np, torch
    from alignlab.preference_doctor import preference_doctor
    zoo_ds, easy_ds = _build(tok, _zoo(40)), _build(tok, _the(_zoo(40)))
    base, easy = preference_doctor(zoo_ds, model), preference_doctor(easy_ds, model)
    assert 0.25 < base.reference.accuracy < 0.75 and base.warnings == []
    assert easy.reference.accuracy >= 0.9 and [w.split(":")[0] for w in easy.warnings] == ["reference accuracy"]
    assert np.median(easy.reference.margins) > 5 > np.median(np.abs(base.reference.margins))
    x = easy_ds[0]
    for side, got in (("w", easy.reference.chosen[0]), ("l", easy.reference.rejected[0])):
        ids = torch.tensor(x["inputs_" + side]["input_ids"])[None]
        with torch.no_grad(): lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        at = np.flatnonzero(x["inputs_" + side]["labels"][1:] != -100)
        assert abs(got - float(lp[at, ids[0, 1:][at]].sum())) < 1e-3
    assert easy.histogram_png()[:8] == b"\x89PNG\r\n\x1a\n" and "reference margins" in easy._repr_html_()


def test_preference_doctor_refuses_other_datasets_and_runs_without_a_reference(tok):
    from alignlab.datasets import build_dataset
    from alignlab.preference_doctor import preference_doctor
    from alignlab.preferences import unpair
    kto = build_dataset({"sources": [{"name": "k", "records_data": unpair(_zoo(2)), "sample_rate": 1}], "dataset_type": "kto"}, tok)
    with pytest.raises(ValueError, match="preference_doctor: expected a pair_preferences dataset"): preference_doctor(kto)
    doc = preference_doctor(_build(tok, _zoo(3)))
    assert doc.reference is None and doc.rows()[-1][3] is None and doc.warnings == []
    with pytest.raises(ValueError, match="no reference log-probs to draw"): doc.histogram_png()


def test_train_dpo_says_each_check_in_one_line_before_step_0_and_returns_them_in_the_summary(tmp_path):
    """The CLI (`alignlab train_dpo`, through `run.train`): a training set with an identical pair and rejected answers the
    reference already ranks below the chosen ones. Before step 0 stderr has the data warning once (with the dataset's other
    warnings) and each reference line once; the summary carries the findings, and its notes the accuracy warning."""
    import os, subprocess, sys
    recs = _the(_zoo(30, "train"))
    recs[3] = {**recs[3], "answer_l": recs[3]["answer_w"]}
    settings = {"log_path": str(tmp_path / "run"), "seed": 0,
                "model_settings": {"model_path": "tiny-llama", "transformers_settings": {"torch_dtype": "float32"}},
                "train_dataset_settings": {"sources": [{"name": "train", "records_data": recs, "sample_rate": 1}],
                                           "dataset_type": "pair_preferences", "max_tokens_count": 64},
                "val_dataset_settings": {"sources": [{"name": "val", "records_data": _zoo(10), "sample_rate": 1}],
                                         "dataset_type": "pair_preferences", "max_tokens_count": 64},
                "trainer_settings": {"loss_settings": {"loss_type": "sigmoid"}, "max_steps": 1, "per_device_train_batch_size": 8,
                                     "gradient_accumulation_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none"}}
    cfg = tmp_path / "dpo.json"; cfg.write_text(json.dumps(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "alignlab", "train_dpo", "--experiment_settings_path", str(cfg), "--no_progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    err = r.stderr.splitlines()
    once = lambda start: sum(start in l for l in err) == 1
    assert once("train dataset: identical pairs: 1 of 30 pairs") and once("reference accuracy: the reference already ranks chosen above rejected in")
    assert once("reference margins (log p(chosen) - log p(rejected), summed over answer tokens)"), r.stderr
    assert not any("length bias" in l or "context tokens" in l or "truncation:" in l for l in err)  # the controls: equal lengths, whole contexts
    doc = json.loads((tmp_path / "run" / "summary.json").read_text())["preference_doctor"]
    assert doc["train"]["identical"] == 1 and doc["train"]["reference"]["accuracy"] >= 0.9 and doc["train"]["reference"]["accuracy_warns"]
    assert doc["validation"]["reference"]["pairs"] == 10 and doc["validation"]["warnings"] == []
    notes = json.loads((tmp_path / "run" / "summary.json").read_text())["notes"]
    assert sum(n.startswith("reference accuracy: the reference already ranks") for n in notes) == 1


def test_the_plan_shows_the_data_checks(tmp_path):
    """The data checks reach an Experiment's plan with the dataset's other warnings, before any model loads."""
    from alignlab.experiment import Experiment
    recs = _zoo(6)
    recs[2] = {**recs[2], "answer_l": recs[2]["answer_w"]}
    plan = Experiment(run_dir=tmp_path / "plan").model("tiny-llama").preference_dataset(recs, max_tokens_count=64).dpo().plan()
    assert "identical pairs: 1 of 6 pairs" in repr(plan) and "identical pairs: 1 of 6 pairs" in plan._repr_html_()


def test_a_reference_free_loss_runs_no_reference_check(tok, model):
    """simpo with use_ref_model false has no reference: the doctor says so in one line and computes nothing; the data checks still reach the summary."""
    from alignlab.run import make_trainer
    with tempfile.TemporaryDirectory() as d:
        trainer = make_trainer("dpo", model, tok, _build(tok, _zoo(8)), None, {"loss_settings": {"loss_type": "simpo"}, "average_log_prob": True, "use_ref_model": False, "report_to": "none"}, d)
    doc = trainer.alignlab_summary["preference_doctor"]
    assert doc["train"]["reference"] is None and doc["train"]["pairs"] == 8 and "validation" not in doc
    assert trainer.train_dataset.reference is None  # no log-probs computed for the doctor
