"""Batched generation: greedy answers independent of batch size, stop strings, scores, and prompt parity with training."""
import json
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after

from alignlab import zoo
from alignlab.datasets import build_dataset
from alignlab.generate import (generate, generate_records, prompt_ids, GenerationSettings, check_stop_strings,
                               finish_answer)
from alignlab.collate import answer_logprobs
from alignlab.settings import SettingsError, load_settings
from alignlab.data import chat_settings

GREEDY = {"do_sample": False}  # turbo's default samples; these checks compare greedy (or plain beam) answers


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def _ds_settings(n=16, path=None):
    st = chat_settings(path or zoo.get("chat") / "test.jsonl")
    st["sources"][0] = {**st["sources"][0], "sample_rate": None, "num_samples": n}
    return st


@pytest.fixture(scope="module")
def prompts(tok):
    ds = build_dataset(_ds_settings(16), tok, inference=True)
    return [p for _, p in prompt_ids(ds)]


def test_greedy_same_for_batch_sizes(model, tok, prompts):
    ts = {**GREEDY, "max_new_tokens": 16}
    runs = {b: generate(model, tok, prompts, ts, {"batch": b}) for b in (1, 4, 16)}
    ids = {b: [a[0]["answer_token_ids"] for a in r] for b, r in runs.items()}
    assert ids[1] == ids[4] == ids[16]
    assert len({tuple(x) for x in ids[1]}) > 1  # not one answer for every prompt
    for b in (4, 16):
        for x, y in zip(runs[1], runs[b]):
            assert x[0]["content"] == y[0]["content"]
            assert abs(x[0]["sequence_score"] - y[0]["sequence_score"]) < 1e-3


def test_generate_is_deterministic(model, tok, prompts):
    """Greedy ids and text are the same whatever the batch; the scores agree to float32 summation error.
    A batch of another shape pads differently, so the matmuls reduce in another order: on an AVX-512 Xeon batch 5 vs 2 gave
    -20.234236 vs -20.234245 (5e-7 relative). rel 1e-5 leaves 20x room and still catches a wrong token (a log-prob >= 1e-3)."""
    a = generate(model, tok, prompts[:5], {**GREEDY, "max_new_tokens": 8}, {"batch": 5})
    b = generate(model, tok, prompts[:5], {**GREEDY, "max_new_tokens": 8}, {"batch": 2})
    strip = lambda out: [[{k: v for k, v in x.items() if k != "sequence_score"} for x in r] for r in out]
    assert strip(a) == strip(b)
    for ra, rb in zip(a, b):
        for x, y in zip(ra, rb): assert x["sequence_score"] == pytest.approx(y["sequence_score"], rel=1e-5, abs=1e-5)


def test_prompt_parity_with_training(tok):
    """The ids the trainer saw before the answer are exactly the ids fed to the generator."""
    st = _ds_settings(20)
    train, inf = build_dataset(st, tok), build_dataset(st, tok, inference=True)
    pairs = prompt_ids(inf)
    assert len(pairs) == len(train) == 20
    for (i, p), k in zip(pairs, range(len(train))):
        t = train[k]
        first = int((t["labels"] != -100).argmax())
        assert t["input_ids"][:first].tolist() == p
        assert p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1


def test_stop_strings_one_and_several(model, tok, prompts):
    base = generate(model, tok, prompts[:4], {**GREEDY, "max_new_tokens": 16}, {"batch": 4})
    text = base[0][0]["content"]
    words = text.split()
    assert len(words) >= 3
    one = generate(model, tok, prompts[:1], {**GREEDY, "max_new_tokens": 16, "stop_strings": words[1]})[0][0]
    assert one["content"] == text[:text.index(words[1])]
    assert tok.decode(one["answer_token_ids"]).find(words[1]) >= 0  # the completing token is kept in the ids
    several = generate(model, tok, prompts[:1], {**GREEDY, "max_new_tokens": 16, "stop_strings": [words[2], words[1]]})[0][0]
    assert several["content"] == one["content"]  # the first one in the text wins, whatever its place in the list
    assert len(several["answer_token_ids"]) < len(base[0][0]["answer_token_ids"])


def test_special_token_stop_and_skip_special_tokens(model, tok, prompts):
    shown = generate(model, tok, prompts[:2], {**GREEDY, "max_new_tokens": 16, "stop_strings": ["<|eot_id|>", "<|end_of_text|>"]},
                     {"skip_special_tokens": False, "remove_prompt": False})
    for a in shown:
        c = a[0]["content"]
        assert c.startswith("<|begin_of_text|>") and "<|eot_id|>" not in c.split("<|start_header_id|>assistant<|end_header_id|>\n\n")[-1]


def test_num_return_sequences_and_ids(model, tok, prompts):
    torch.manual_seed(1)
    out = generate(model, tok, prompts[:3], {**GREEDY, "max_new_tokens": 8, "do_sample": True, "num_return_sequences": 3, "temperature": 1.5},
                   {"batch": 2}, ids=["x", "y", "z"])
    assert [[a["id"] for a in r] for r in out] == [[f"{i}-{k}" for k in range(3)] for i in "xyz"]
    assert all(isinstance(a["sequence_score"], float) and a["sequence_score"] < 0 for r in out for a in r)


def test_beams_batched_match_single(model, tok, prompts):
    ts = {**GREEDY, "max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2}
    b = generate(model, tok, prompts[:4], ts, {"batch": 4})
    s = [generate(model, tok, [p], ts, {"batch": 1})[0] for p in prompts[:4]]
    assert [[a["answer_token_ids"] for a in r] for r in b] == [[a["answer_token_ids"] for a in r] for r in s]


def test_sequence_score_matches_forward(model, tok, prompts):
    a = generate(model, tok, prompts[:1], {**GREEDY, "max_new_tokens": 10})[0][0]
    full = torch.tensor([prompts[0] + a["answer_token_ids"]])
    with torch.no_grad(): lp = torch.log_softmax(model(full).logits[0, :-1], -1)
    n = len(prompts[0])
    ref = sum(float(lp[n - 1 + t, x]) for t, x in enumerate(a["answer_token_ids"]))
    assert abs(a["sequence_score"] - ref) < 1e-3
    # the chunked scorer gives the same numbers with a tiny memory budget (one row at a time)
    s = answer_logprobs(model, [prompts[0], prompts[1]], [a["answer_token_ids"], [262, 301]], tok.pad_token_id, budget=1, reduce="sum")
    assert abs(s[0] - ref) < 1e-3


def test_bad_stop_string_is_one_line():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]")); t.pre_tokenizer = pre_tokenizers.Whitespace()
    wl = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    with pytest.raises(SettingsError, match="cannot be expressed") as e: check_stop_strings(wl, ["zzz"])
    assert "\n" not in str(e.value)
    assert check_stop_strings(wl, ["a"]) == ["a"]


def test_generate_records_reports_a_failing_record(model, tok, tmp_path):
    """A record the model cannot take is reported by id; the rest is generated."""
    from transformers import AutoTokenizer
    t2 = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
    t2.add_tokens(["<unseen>"])  # the model has no embedding for it
    recs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"What kind of thing is the wide teacher {i}?"}]} for i in range(5)]
    recs[2]["messages"][0]["content"] += " <unseen>"
    st = {**_ds_settings(), "sources": [{"name": "inline", "records_data": recs, "sample_rate": 1}]}
    ds = build_dataset(st, t2, inference=True)
    errors, seen = [], []
    out = generate_records(model, t2, ds, {"transformers_settings": {**GREEDY, "max_new_tokens": 4}, "custom_settings": {"batch": 8}},
                           errors=errors, on_batch=seen.extend)
    assert [r["id"] for r in out] == ["r0", "r1", "r3", "r4"]
    assert len(errors) == 1 and errors[0]["id"] == "r2" and "outside the model's vocabulary" in errors[0]["error"]
    assert sorted(r["id"] for r in seen) == ["r0", "r1", "r3", "r4"]


def test_records_load_as_sampling(model, tok, tmp_path):
    st = _ds_settings(6)
    ds = build_dataset(st, tok, inference=True)
    torch.manual_seed(0)
    out = generate_records(model, tok, ds, {"transformers_settings": {**GREEDY, "max_new_tokens": 6, "do_sample": True, "num_return_sequences": 2}})
    f = tmp_path / "o.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in out))
    samp = build_dataset({**st, "dataset_type": "sampling", "sources": [{"name": "o", "records_path": str(f), "sample_rate": 1}]}, tok)
    assert len(samp) == 6
    assert samp[0]["answer_ids"] == [f"{out[0]['id']}-0", f"{out[0]['id']}-1"]
    # the sampling sample is prompt + answer: it starts with the generator's prompt ids
    p = prompt_ids(ds)[0][1]
    assert samp[0]["inputs"][0]["input_ids"][:len(p)].tolist() == p


def test_training_dataset_refused(model, tok):
    ds = build_dataset(_ds_settings(2), tok)
    with pytest.raises(ValueError, match="inference=True"): generate_records(model, tok, ds)


def test_settings_errors():
    with pytest.raises(SettingsError, match="did you mean 'max_new_tokens'"):
        load_settings(GenerationSettings, {"transformers_settings": {"max_new_token": 3}})


def test_generation_error_isolated_to_its_record(model, tok):
    """When a batch raises, its records are retried one by one: only the record at fault is reported."""
    ds = build_dataset(_ds_settings(8), tok, inference=True)
    bad = ds.records[int(ds.rows[5])]["id"]
    def gen(ps, ids):  # the real generator, failing on one record as a broken input would
        if bad in ids: raise RuntimeError(f"cannot generate {bad}\nsecond line")
        return generate(model, tok, ps, {**GREEDY, "max_new_tokens": 4}, ids=ids)
    errors = []
    out = generate_records(model, tok, ds, {"custom_settings": {"batch": 4}}, errors=errors, generator=gen)
    assert len(out) == 7 and bad not in [r["id"] for r in out]
    assert errors == [{"id": bad, "error": f"RuntimeError: cannot generate {bad} second line"}]


def test_special_stop_with_skip_special_tokens(model, tok, prompts):
    """A special-token stop string with skip_special_tokens (the default) gives the same content as stopping at EOS."""
    plain = generate(model, tok, prompts[:6], {**GREEDY, "max_new_tokens": 16}, {"batch": 6})
    stop = generate(model, tok, prompts[:6], {**GREEDY, "max_new_tokens": 16, "stop_strings": "<|eot_id|>"}, {"batch": 6})
    for a, b in zip(plain, stop):
        assert a[0]["content"] == b[0]["content"] and "<|" not in b[0]["content"]
        assert a[0]["answer_token_ids"] == b[0]["answer_token_ids"]


def test_finish_answer_drops_padding(tok):
    eos = {1, 4}
    ids = tok("It is a thing.", add_special_tokens=False)["input_ids"]
    a = finish_answer(tok, [0], ids + [tok.pad_token_id] * 3, eos, [], skip_special_tokens=False, pad_id=tok.pad_token_id)
    assert a["answer_token_ids"] == ids and a["content"] == "It is a thing."
    b = finish_answer(tok, [0], ids + [4, 5, 5], eos, [], skip_special_tokens=False)
    assert b["answer_token_ids"] == ids + [4] and b["content"] == "It is a thing."


def test_min_p_reaches_generate(model, tok, prompts):
    """Any GenerationConfig field reaches generate. min_p=1 keeps only the tokens as likely as the most likely one, so even hot
    sampling gives the greedy answer; the same hot sampling without min_p does not (the negative control)."""
    greedy = generate(model, tok, prompts[:8], {**GREEDY, "max_new_tokens": 8}, {"batch": 8})
    hot = {**GREEDY, "max_new_tokens": 8, "do_sample": True, "temperature": 3.0, "top_k": 0}
    torch.manual_seed(0)
    pinned = generate(model, tok, prompts[:8], {**hot, "min_p": 1.0}, {"batch": 8})
    torch.manual_seed(0)
    free = generate(model, tok, prompts[:8], hot, {"batch": 8})
    ids = lambda out: [a[0]["answer_token_ids"] for a in out]
    assert ids(pinned) == ids(greedy)
    assert ids(free) != ids(greedy)


def test_turbo_generation_defaults(model, tok, prompts):
    """turbo's defaults: do_sample true (so num_return_sequences 2 needs no more keys) and stop_strings '</s>'; a tokenizer that
    cannot express the default stop string generates without it, while an explicit one it cannot express is an error."""
    from alignlab.generate import TransformersGenerationSettings, usable_stops
    ts = load_settings(TransformersGenerationSettings, {"num_return_sequences": 2})
    assert ts.do_sample and ts.stops == ["</s>"] and ts.default_stops
    torch.manual_seed(0)
    a = generate(model, tok, prompts[:4], {"max_new_tokens": 8, "num_return_sequences": 2})
    assert all(len(r) == 2 for r in a)
    greedy = generate(model, tok, prompts[:4], {**GREEDY, "max_new_tokens": 8})
    assert [r[0]["answer_token_ids"] for r in a] != [r[0]["answer_token_ids"] for r in greedy]  # sampled, not greedy
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    t = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")); t.pre_tokenizer = pre_tokenizers.Whitespace()
    wl = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")
    assert usable_stops(wl, TransformersGenerationSettings()) == []
    with pytest.raises(SettingsError, match="cannot be expressed"): usable_stops(wl, TransformersGenerationSettings(stop_strings="</s>"))
