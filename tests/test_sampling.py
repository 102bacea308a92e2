"""The sampling pipelines (nbs/06c_sampling): the zoo's tiny Llama generates, `train_rm` makes a reward model on the zoo's
preferences, and random_sample -> rm_sample -> train_dpo runs through the CLI, rso_sample -> train_dpo too; RSO's acceptance
statistics match a hand computation; turbo-alignment's own sampling configs run unchanged apart from paths; bad settings are
one line, before any model loads."""
import json, math, random, subprocess, sys
import pytest

from alignlab import zoo
from alignlab.cli import main
from alignlab.data import chat_settings

F32 = {"transformers_settings": {"torch_dtype": "float32"}}
TRAIN = dict(per_device_train_batch_size=16, per_device_eval_batch_size=32, gradient_accumulation_steps=1, eval_strategy="no",
             save_strategy="no", logging_steps=5, lr_scheduler_type="constant", disable_tqdm=True, fp16=False)


def _rows(p): return [json.loads(l) for l in p.read_text().splitlines()]


def _cli(tmp, name, command, cfg):
    "Write `cfg` as `tmp/name.json` and run `alignlab <command> --experiment_settings_path` on it (the CLI's entry point, in this process)."
    p = tmp / f"{name}.json"
    p.write_text(json.dumps(cfg))
    flag = "--inference_settings_path" if command.startswith("inference_") else "--experiment_settings_path"
    rc = main([command, flag, str(p), *(["--no_progress"] if command.startswith("train_") else [])])
    assert rc == 0, f"alignlab {command} exited {rc}"
    return p


def _sampling(path):
    return {**chat_settings(zoo.get("chat") / "test.jsonl", 96), "dataset_type": "sampling",
            "sources": [{"name": path.parent.name, "records_path": str(path), "sample_rate": 1}]}


def _dpo(tmp, name, pairs, steps):
    ds = {"sources": [{"name": name, "records_path": str(pairs), "sample_rate": 1}], "dataset_type": "pair_preferences", "max_tokens_count": 96}
    cfg = {"log_path": str(tmp / f"dpo_{name}"), "model_settings": {**F32, "model_path": "tiny-llama",
           "peft_settings": {"name": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
           "train_dataset_settings": ds, "val_dataset_settings": ds,
           "trainer_settings": {**TRAIN, "max_steps": steps, "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                                "loss_settings": {"loss_type": "sigmoid", "beta": 0.1}}}
    _cli(tmp, f"dpo_{name}", "train_dpo", cfg)
    return json.loads((tmp / f"dpo_{name}" / "summary.json").read_text())


@pytest.fixture(scope="module")
def loop(tmp_path_factory, one_thread):
    """The loop's first steps through the CLI: 8 prompts x 4 sampled answers (tiny-llama); a LoRA reward model (its one-output
    head saved with the adapter) from train_rm on the zoo's preference pairs, 8 steps; random_sample N=3; rm_sample with it.
    The reward model is a judge in form only: from the raw base, 40 steps still left held-out pair accuracy at chance (0.42);
    a useful one needs the SFT model first and ~400 steps (test_quickstart), too slow here. The pipelines need scores, not
    good ones."""
    tmp = tmp_path_factory.mktemp("loop")
    chat = zoo.get("chat")
    prompts = {**chat_settings(chat / "test.jsonl", 96), "sources": [{"name": "test", "records_path": str(chat / "test.jsonl"), "num_samples": 8}]}
    gen = [{"transformers_settings": {"max_new_tokens": 8, "do_sample": True, "num_return_sequences": 4, "stop_strings": ["<|eot_id|>", "."]},
            "custom_settings": {"batch": 8}}]
    _cli(tmp, "gen", "inference_chat", {"inference_settings": [{"model_settings": {**F32, "model_path": "tiny-llama"}, "generation_settings": gen}],
                                        "dataset_settings": prompts, "save_path": str(tmp / "gen"), "seed": 1})
    prefs = zoo.get("preferences")
    pair_ds = lambda split, n: {"sources": [{"name": split, "records_path": str(prefs / f"{split}.jsonl"), "num_samples": n}],
                                "dataset_type": "pair_preferences", "max_tokens_count": 64}
    rm_model = {**F32, "model_path": "tiny-llama", "model_type": "seq_cls", "num_labels": 1}
    _cli(tmp, "rm_train", "train_rm", {"log_path": str(tmp / "rm_run"), "seed": 0,
                                       "model_settings": {**rm_model, "peft_settings": {"name": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
                                       "train_dataset_settings": pair_ds("train", 256), "val_dataset_settings": pair_ds("val", 64),
                                       "trainer_settings": {**TRAIN, "max_steps": 8, "learning_rate": 3e-3}})
    rm = {**rm_model, "adapter_path": str(tmp / "rm_run" / "final")}  # turbo's PreTrainedAdaptersModelSettings
    _cli(tmp, "random", "random_sample", {"dataset_settings": _sampling(tmp / "gen" / "chat_m0_g0.jsonl"), "N": 3, "save_path": str(tmp / "random")})
    _cli(tmp, "rm", "rm_sample", {"dataset_settings": _sampling(tmp / "random" / "sampled.jsonl"), "N": 3, "rm": rm, "rm_batch_size": 5,
                                  "save_path": str(tmp / "rm")})
    return tmp, rm


def test_random_sample_then_rm_sample_then_train_dpo(loop):
    """random_sample keeps 3 of the 4 answers (seeded: the same seed, the same file; another seed, another file; no rewards, so
    no pairs); rm_sample pairs each record's best answer with its worst by the trained reward model, and train_dpo trains on
    those pairs as written. A reward is the adapter model's own score: a plain forward of that answer's input (tolerance 1e-4:
    the same float32 weights, a batch of one against right-padded batches of five)."""
    tmp, rm = loop
    gen, kept = _rows(tmp / "gen" / "chat_m0_g0.jsonl"), _rows(tmp / "random" / "sampled.jsonl")
    assert len(gen) == len(kept) == 8 and all(len(r["answers"]) == 4 for r in gen) and all(len(r["answers"]) == 3 for r in kept)
    full = {r["id"]: [a["id"] for a in r["answers"]] for r in gen}
    assert all(set(a["id"] for a in r["answers"]) < set(full[r["id"]]) for r in kept)
    assert not (tmp / "random" / "pairs.jsonl").exists()
    skipped = json.loads((tmp / "random" / "info.json").read_text())["sampled.jsonl"]["skipped"]
    assert list(skipped) == ["no rewards for its answers (a pair needs a judge: run rm_sample)"]
    again = lambda seed: _cli(tmp, f"random{seed}", "random_sample", {"dataset_settings": _sampling(tmp / "gen" / "chat_m0_g0.jsonl"), "N": 3,
                                                                     "seed": seed, "save_path": str(tmp / f"random{seed}")})
    again(42); again(7)
    assert (tmp / "random42" / "sampled.jsonl").read_text() == (tmp / "random" / "sampled.jsonl").read_text()  # seed 42 is the default
    assert (tmp / "random7" / "sampled.jsonl").read_text() != (tmp / "random" / "sampled.jsonl").read_text()
    scored, pairs = _rows(tmp / "rm" / "sampled.jsonl"), _rows(tmp / "rm" / "pairs.jsonl")
    assert len(scored) == 8 and all(set(r["rewards"]) == {a["id"] for a in r["answers"]} for r in scored)
    assert len(pairs) >= 6  # a record gives no pair only when its answers tie
    by_id = {r["id"]: r for r in scored}
    for p in pairs:
        r = by_id[p["id"]]
        score = {a["content"]: r["rewards"][a["id"]] for a in r["answers"]}
        assert score[p["answer_w"]["content"]] == max(r["rewards"].values()) and p["precomputed_margin"] > 0
        assert p["answer_w"]["content"] != p["answer_l"]["content"] and p["context"] == r["messages"]
    import torch
    from alignlab.models import load_model
    from alignlab.datasets import build_dataset
    model, tok = load_model(rm)
    samp = build_dataset(_sampling(tmp / "random" / "sampled.jsonl"), tok)
    x = samp[0]
    with torch.no_grad(): direct = float(model.eval()(torch.as_tensor(x["inputs"][1]["input_ids"])[None]).logits[0, 0])
    assert abs(by_id[x["id"]]["rewards"][x["answer_ids"][1]] - direct) < 1e-4
    s = _dpo(tmp, "rm", tmp / "rm" / "pairs.jsonl", steps=10)
    ev = s["eval"]
    print(f"train_dpo on {len(pairs)} rm_sample pairs: reward accuracy {ev['eval_rewards/accuracies']:.2f}, margin {ev['eval_rewards/margins']:.3f}")
    assert s["objective"] == "dpo" and s["steps"] == 10
    # 10 steps on these very pairs: measured accuracy 1.00 and margin 1.61 (6 steps: 0.88, 0.95); the bars leave room for other kernels
    assert ev["eval_rewards/margins"] > 0.3 and ev["eval_rewards/accuracies"] >= 0.75


def test_rso_sample_then_train_dpo(loop):
    """rso_sample over all four answers, N=2: each record keeps two distinct answers, in the order RSO accepted them, and those
    are exactly what `rso_select` accepts from the same rewards with the record's seed (the rewards read from rm_sample with
    N=4, the same model and batches); the draw counts in info.json add up; train_dpo reads the pairs as written. One run goes
    through a real `python -m alignlab` process."""
    tmp, rm = loop
    from alignlab.sampling import rso_select, record_rng
    ds = _sampling(tmp / "gen" / "chat_m0_g0.jsonl")
    _cli(tmp, "all", "rm_sample", {"dataset_settings": ds, "N": 4, "rm": rm, "rm_batch_size": 5, "save_path": str(tmp / "all")})
    cfg = tmp / "rso.json"
    cfg.write_text(json.dumps({"dataset_settings": ds, "N": 2, "beta": 0.5, "rm": rm, "rm_batch_size": 5, "seed": 3, "save_path": str(tmp / "rso")}))
    r = subprocess.run([sys.executable, "-m", "alignlab", "rso_sample", "--experiment_settings_path", str(cfg)],
                       capture_output=True, text=True, timeout=300, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["outputs"]["pairs.jsonl"]["complete"]
    rewards = {x["id"]: x["rewards"] for x in _rows(tmp / "all" / "sampled.jsonl")}
    rso, pairs = _rows(tmp / "rso" / "sampled.jsonl"), _rows(tmp / "rso" / "pairs.jsonl")
    draws = 0
    for x in rso:
        ids = [a["id"] for a in x["answers"]]
        want, st = rso_select(rewards[x["id"]], 2, 0.5, record_rng(3, x["id"]))
        assert ids == want and len(set(ids)) == 2 and x["rewards"] == {i: rewards[x["id"]][i] for i in ids}
        draws += st["draws"]
    info = json.loads((tmp / "rso" / "info.json").read_text())["sampled.jsonl"]["rso"]
    assert (info["candidates"], info["accepted"], info["draws"]) == (32, 16, draws) and info["acceptance_rate"] == round(16 / draws, 6)
    print(f"rso_sample: {info}")
    assert len(pairs) >= 6 and all(p["id"].endswith("-0") and p["precomputed_margin"] > 0 for p in pairs)
    s = _dpo(tmp, "rso", tmp / "rso" / "pairs.jsonl", steps=2)
    assert s["objective"] == "dpo" and s["steps"] == 2


def _hand(p:list) -> tuple:
    "N = 1, candidates in order with acceptance probabilities `p` (the best one's is 1): P(candidate i accepted), E[draws]."
    acc, draws, none_yet = [], 0.0, 1.0
    for i, pi in enumerate(p):
        acc.append(none_yet * pi); draws += (i + 1) * none_yet * pi; none_yet *= 1 - pi
    return acc, draws


@pytest.mark.parametrize("rewards, beta, N", [({"a": 1.0, "b": 0.0, "c": -1.0}, 1.0, 2),
                                              ({"w": 0.5, "x": -0.2, "y": 1.0, "z": 0.3}, 0.5, 1)])
def test_rso_acceptance_matches_the_hand_computation(rewards, beta, N):
    """Twenty thousand seeded runs of `rso_select` against probabilities worked by hand (as in the notebook), within four
    standard errors. First example: a, b, c (rewards 1, 0, -1), beta 1, N 2: P({a,c}) = (1 - e^-1) e^-2 = 0.0855, E[draws]
    = 3.179. Second: N 1, so the first accepted candidate in round one is the answer, and the best (acceptance 1) ends the
    round: P(i) = p_i * prod_{j<i} (1 - p_j), with p = exp((r - 1) / 0.5) = e^-1, e^-2.4, 1, (z never reached)."""
    M, rng = 20_000, random.Random(0)
    from alignlab.sampling import rso_select
    runs = [rso_select(rewards, N, beta, rng) for _ in range(M)]
    top = max(rewards.values())
    p = [math.exp((r - top) / beta) for r in rewards.values()]
    if N == 2:
        pb, pc = p[1], p[2]
        hand = {frozenset("ac"): (1 - pb) * pc, frozenset("ab"): pb + (1 - pb) * (1 - pc)}
        e_draws = 2 * pb + 3 * (1 - pb) * pc + 4 * (1 - pb) * (1 - pc)
        sd = math.sqrt(4 * pb + 9 * (1 - pb) * pc + 16 * (1 - pb) * (1 - pc) - e_draws ** 2)
    else:
        acc, e_draws = _hand(p[:3])
        hand = {frozenset(c): q for c, q in zip("wxy", acc)}
        hand[frozenset("z")] = 0.0
        sd = math.sqrt(sum((i + 1) ** 2 * q for i, q in enumerate(acc)) - e_draws ** 2)
    assert abs(sum(hand.values()) - 1) < 1e-12
    for outcome, q in hand.items():
        freq = sum(frozenset(a) == outcome for a, _ in runs) / M
        assert abs(freq - q) <= 4 * math.sqrt(q * (1 - q) / M) + 1e-12, (sorted(outcome), freq, q)
    mean = sum(s["draws"] for _, s in runs) / M
    assert abs(mean - e_draws) <= 4 * sd / math.sqrt(M), (mean, e_draws)
    assert all(len(a) == len(set(a)) == N for a, _ in runs)  # N distinct answers: turbo's loop could repeat one


def _one_line(capsys, argv, *want):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "Traceback" not in err, (rc, err)
    assert all(w in err for w in want), err
    return err


def test_bad_settings_and_data_are_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch):
    """N < 2, no `rm`, beta <= 0, a causal `rm`, chat data, a missing model directory, a record without answers and an id
    given in two sources: each one line naming the field (the file and line for data), exit 2. Loading a model would raise
    AssertionError here (not caught by the CLI), so every error came before any model loaded."""
    import transformers
    def no_load(*a, **k): raise AssertionError("a model was loaded before the error")
    for cls in (transformers.AutoModelForSequenceClassification, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", no_load)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "1", "messages": [{"role": "user", "content": "hi"}], "answers": [{"id": "a", "content": "x"}, {"id": "b", "content": "y"}]}) + "\n")
    ds = _sampling(good)
    rm = {"model_path": "tiny-llama", "model_type": "seq_cls", "num_labels": 1}
    base = {"dataset_settings": ds, "N": 2, "rm": rm, "beta": 0.5, "save_path": str(tmp_path / "out")}
    def run(command, name, cfg, *want):
        p = _w(tmp_path, name, cfg)
        return _one_line(capsys, [command, "--experiment_settings_path", str(p)], str(p), *want)
    run("rso_sample", "n1", {**base, "N": 1}, "N: 1; expected an int >= 2")
    run("random_sample", "n0", {"dataset_settings": ds, "N": 0, "save_path": str(tmp_path / "r")}, "N: 0; expected an int >= 2")
    run("rm_sample", "norm", {k: v for k, v in base.items() if k not in ("rm", "beta")}, "rm: missing field")
    run("rso_sample", "beta0", {**base, "beta": 0}, "beta: 0.0; expected a number > 0")
    run("rso_sample", "betaneg", {**base, "beta": -0.1}, "beta: -0.1; expected a number > 0")
    run("rso_sample", "nobeta", {k: v for k, v in base.items() if k != "beta"}, "beta: missing field")
    run("rso_sample", "causal", {**base, "rm": {**rm, "model_type": "causal"}}, "rm.model_type: 'causal'; expected 'seq_cls'")
    run("rso_sample", "chat", {**base, "dataset_settings": {**ds, "dataset_type": "chat"}}, "dataset_settings.dataset_type: 'chat'; expected 'sampling'")
    run("rso_sample", "nodir", {**base, "rm": {**rm, "model_path": str(tmp_path / "no_rm")}}, "rm.model_path: no such directory")
    run("rso_sample", "noadapter", {**base, "rm": {**rm, "adapter_path": str(tmp_path / "no_adapter")}}, "rm.adapter_path: no such directory")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(good.read_text() + json.dumps({"id": "2", "messages": [{"role": "user", "content": "hi"}], "answers": []}) + "\n")
    _one_line(capsys, ["rso_sample", "--experiment_settings_path", str(_w(tmp_path, "bad", {**base, "dataset_settings": _sampling(bad)}))],
              f"{bad}:2: answers: expected a non-empty list")
    two = {**ds, "sources": [ds["sources"][0], {**ds["sources"][0], "name": "again"}]}
    _one_line(capsys, ["random_sample", "--experiment_settings_path", str(_w(tmp_path, "two", {"dataset_settings": two, "N": 2, "save_path": str(tmp_path / "t")}))],
              f"{good}:1: id: '1' is also the id of {good}:1; expected record ids unique across the sources")


def _w(tmp, name, cfg):
    p = tmp / f"{name}.json"; p.write_text(json.dumps(cfg)); return p


def test_the_commands_are_listed_beside_merge():
    from alignlab.cli import parser
    h = parser().format_help()
    assert all(c in h for c in ("random_sample", "rm_sample", "rso_sample", "merge_adapters_to_base"))
    assert parser().parse_args(["rso_sample", "--experiment_settings_path", "x.json"]).experiment_settings_path == "x.json"


def test_turbo_sampling_configs_run_unchanged_apart_from_paths(tmp_path, monkeypatch, one_thread):
    """turbo-alignment's three sampling fixture configs (tests/fixtures/configs/sampling/{base,rm,rso}.json), as turbo writes them:
    relative paths, `chat_dataset` nesting, `<RS>{role}` tags, a seq_cls model with `model_kwargs.num_labels`, `resize_token_embeddings`,
    an `adapter_path`, a separate `tokenizer_path` with `use_fast: false`, `rm_batch_size: 1`, and `N: 3` over records of two answers
    (inference_chat outputs with `label: null` and `disable_loss` flags). The files at the paths are the zoo's (the classifier is
    tiny-llama, the adapter a seq_cls LoRA). With N above the candidates turbo's RSO loop keeps only what its first round
    accepted (a candidate rejected once is dropped; at beta 0.01 usually the best alone); alignlab's keeps the two, each once."""
    import shutil, torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from peft import LoraConfig, get_peft_model
    root = tmp_path
    models, data = root / "tests/fixtures/models", root / "tests/fixtures/datasets/sampling"
    data.mkdir(parents=True)
    shutil.copytree(zoo.get("tiny-llama"), models / "gptj_tiny_for_seq_cls")
    sft = models / "llama2_tiny_fine_tuned_with_adapters"
    AutoTokenizer.from_pretrained(zoo.get("tiny-llama")).save_pretrained(sft / "tokenizer_with_special_tokens")
    torch.manual_seed(0)
    head = AutoModelForSequenceClassification.from_pretrained(zoo.get("tiny-llama"), num_labels=1)
    get_peft_model(head, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(sft / "trainer/adapter_model")
    msg = lambda role, text: {"role": role, "content": text, "disable_loss": False}
    recs = [{"id": str(i), "messages": [msg("user", "hi"), msg("bot", "hi"), msg("user", q)] + ([msg("bot", "good")] if i == 1 else []),
             "label": None, "dataset_name": "chat_test", "answers": [{"content": a, "id": "0"}, {"content": "lol", "id": "1"}]}
            for i, (q, a) in enumerate((("how are you", "fine, and you?"), ("and now?", "still fine"), ("why?", "because")))]
    (data / "inference_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = {"sources": [{"name": "test", "records_path": "tests/fixtures/datasets/sampling/inference_out.jsonl", "sample_rate": 1.0}],
          "chat_dataset": {"prompt_template": {"role_tag_mapping": {"bot": "<bot>", "user": "<user>", "system": "<system>"},
                                               "prefix_template": "<RS>{role}", "suffix_template": "</RS>"}, "max_tokens_count": 150},
          "dataset_type": "sampling"}
    rm = {"model_path": "tests/fixtures/models/gptj_tiny_for_seq_cls", "model_type": "seq_cls", "resize_token_embeddings": True,
          "transformers_settings": {}, "model_kwargs": {"num_labels": 1}, "adapter_path": "tests/fixtures/models/llama2_tiny_fine_tuned_with_adapters/trainer/adapter_model"}
    tok = {"use_fast": False, "tokenizer_path": "tests/fixtures/models/llama2_tiny_fine_tuned_with_adapters/tokenizer_with_special_tokens"}
    cfgs = {"base": ("random_sample", {"dataset_settings": ds, "N": 3, "save_path": "test_base_sampling_output"}),
            "rm": ("rm_sample", {"dataset_settings": ds, "rm": rm, "tokenizer_settings": tok, "rm_batch_size": 1, "N": 3, "save_path": "test_rm_sampling_output"}),
            "rso": ("rso_sample", {"dataset_settings": ds, "rm": rm, "tokenizer_settings": tok, "rm_batch_size": 1, "N": 3, "beta": 0.01,
                                   "save_path": "test_rso_sampling_output"})}
    monkeypatch.chdir(root)
    for name, (command, cfg) in cfgs.items():
        rel = f"tests/fixtures/configs/sampling/{name}.json"
        (root / rel).parent.mkdir(parents=True, exist_ok=True); (root / rel).write_text(json.dumps(cfg, indent=2))
        assert main([command, "--experiment_settings_path", rel]) == 0, command
        out = root / cfg["save_path"]
        rows = _rows(out / "sampled.jsonl")
        assert [r["id"] for r in rows] == ["0", "1", "2"] and all(sorted(a["id"] for a in r["answers"]) == ["0", "1"] for r in rows)
        if command != "random_sample":
            assert all(set(r["rewards"]) == {"0", "1"} for r in rows)
            assert [p["id"] for p in _rows(out / "pairs.jsonl")] == (["0", "1", "2"] if command == "rm_sample" else ["0-0", "1-0", "2-0"])
