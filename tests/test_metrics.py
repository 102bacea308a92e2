"""alignlab.metrics: hand-computed values, properties of the text metrics, and the model-based ones on the zoo's real tiny models."""
import math, random
import numpy as np
import pytest, torch
from hypothesis import given, settings, strategies as st
from alignlab import metrics as M
from alignlab.collate import answer_logprobs
from alignlab.templates import LLAMA3


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after


# ---- text metrics: values computed by hand ----

def test_bleu_by_hand():
    ref, hyp = "the cat is on the mat".split(), "the cat sat on the mat".split()
    assert M.sentence_bleu([ref], hyp, (0.5, 0.5)) == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # trigram: "the cat sat", "cat sat on", "sat on the", "on the mat" -> 1 of 4 matches
    assert M.sentence_bleu([ref], hyp, (1 / 3,) * 3) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4) ** (1 / 3))
    # method1: a zero n-gram count becomes 0.1 / count
    assert M.sentence_bleu([["the", "dog"]], ["the", "cat"], (0.5, 0.5)) == pytest.approx(math.sqrt(0.5 * 0.1))
    # brevity penalty uses the closest reference length (the shorter on a tie): refs of 3 and 5 words, hypothesis of 4 -> r = 3 -> BP 1
    assert M.sentence_bleu([list("abc"), list("abcde")], list("abcd"), (1.0,)) == pytest.approx(1.0)
    assert M.sentence_bleu([list("abcdef")], list("abc"), (1.0,)) == pytest.approx(math.exp(1 - 6 / 3))
    # clipping: "the the the" against "the cat" -> 1 of 3
    assert M.sentence_bleu([["the", "cat"]], ["the"] * 3, (1.0,)) == pytest.approx(1 / 3)
    assert M.sentence_bleu([["a"]], [], (1.0,)) == 0.0


def test_self_bleu():
    same = M.self_bleu(["a b c d", "a b c d", "a b c d"], ngram=3)
    assert same == pytest.approx([1.0, 1.0, 1.0])
    sb = M.self_bleu(["the cat sat on the mat", "the cat is on the mat"], ngram=2)
    assert sb == pytest.approx([math.sqrt(5 / 6 * 3 / 5)] * 2)
    assert M.self_bleu(["x y", "p q"], ngram=2) == [0.0, 0.0]
    with pytest.raises(ValueError, match="num_return_sequences > 1"): M.self_bleu(["one"])
    with pytest.raises(ValueError, match="ngram"): M.self_bleu(["a", "b"], ngram=0)


def test_rouge_by_hand():
    r = M.rouge("the cat is on the mat", "the cat sat on the mat", ns=[1, 2, 3])
    assert (r["rouge1_precision"], r["rouge1_recall"]) == pytest.approx((5 / 6, 5 / 6))
    assert r["rouge2_fmeasure"] == pytest.approx(3 / 5)
    assert r["rouge3_precision"] == pytest.approx(1 / 4)
    assert (r["rougeL_precision"], r["rougeL_recall"]) == pytest.approx((5 / 6, 5 / 6))
    r = M.rouge("a b c d e", "e d c b a", ns=[1])
    assert r["rouge1_fmeasure"] == 1.0 and r["rougeL_precision"] == pytest.approx(1 / 5)
    r = M.rouge("It is a thing.", "it is")  # case kept: "it" != "It"
    assert r["rouge1_precision"] == 0.5 and r["rouge1_recall"] == pytest.approx(1 / 5)
    assert set(M.rouge("a", "a", ns=[2], with_l=False)) == {"rouge2_precision", "rouge2_recall", "rouge2_fmeasure"}


def _lcs_brute(a, b):
    from itertools import combinations
    for k in range(min(len(a), len(b)), 0, -1):
        subs = {c for c in combinations(a, k)}
        if any(c in subs for c in combinations(b, k)): return k
    return 0


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from("abc"), max_size=7), st.lists(st.sampled_from("abc"), max_size=7))
def test_lcs_and_rouge_properties(a, b):
    assert M.lcs_length(a, b) == _lcs_brute(a, b) == M.lcs_length(b, a)
    p, r, f = M.rouge_l(a, b)
    p2, r2, f2 = M.rouge_l(b, a)
    assert (p, r, f) == pytest.approx((r2, p2, f2))  # swapping reference and prediction swaps P and R
    assert 0 <= min(p, r, f) and max(p, r, f) <= 1 and f <= max(p, r) + 1e-12


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.sampled_from("abcd"), max_size=6), min_size=1, max_size=3), st.lists(st.sampled_from("abcd"), max_size=6))
def test_bleu_properties(refs, hyp):
    b = M.sentence_bleu(refs, hyp, (0.5, 0.5))
    assert 0.0 <= b <= 1.0 + 1e-12
    if hyp and hyp in refs and len(hyp) >= 2: assert b == pytest.approx(1.0)


def test_dist_n_and_ead():
    d = M.dist_n(["a b a", "a c"], ngram=2, vocab_size=10)
    assert (d["dist_1"], d["dist_2"], d["dist_mean"]) == pytest.approx((0.6, 1.0, 0.8))
    assert d["ead_dist_1"] == pytest.approx(3 / (10 * (1 - 0.9 ** 5)))
    assert d["ead_dist_mean"] == pytest.approx((d["ead_dist_1"] + d["ead_dist_2"]) / 2)
    # repetition lowers dist-n; EAD removes the length bias of a uniform speaker: for C draws from V it is ~1 on average
    assert M.dist_n(["x x x x"], ngram=1)["dist_1"] == 0.25
    rng = random.Random(0); V = 50
    eads = [M.dist_n([" ".join(str(rng.randrange(V)) for _ in range(40))], 1, V)["ead_dist_1"] for _ in range(300)]
    dists = [M.dist_n([" ".join(str(rng.randrange(V)) for _ in range(40))], 1, V)["dist_1"] for _ in range(300)]
    assert np.mean(eads) == pytest.approx(1.0, abs=0.02) and np.mean(dists) < 0.75
    assert "ead_dist_1" not in M.dist_n(["a"], ngram=1)  # no vocabulary size, no EAD


def test_entropy_and_length():
    assert M.token_entropy([1, 1, 2, 3]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(4))
    assert M.token_entropy([1, 2, 3, 4]) == pytest.approx(math.log(4))
    assert M.token_entropy([1, 1, 2, 3], top_k=1) == 0.0
    assert M.token_entropy([1, 1, 2, 3, 9, 9, 9], pad_id=9) == pytest.approx(M.token_entropy([1, 1, 2, 3]))
    assert M.token_entropy([]) == 0.0
    assert M.answer_length([3, 4, 1, 5, 5, 5], pad_id=5) == 3
    assert M.strip_pad([5, 3, 5, 5], 5) == [5, 3]


def test_exact_match():
    strip = ["<|eot_id|>", "<pad>"]
    assert M.exact_match("It is a thing.", "It is a thing.<|eot_id|>", strip) == 1
    assert M.exact_match("It is a thing.", "It is a thing. <pad><pad>\n", strip) == 1
    assert M.exact_match("It is a thing.<|eot_id|>", "It is a thing.", strip) == 1
    assert M.exact_match("It is a thing.", "It is a thing", strip) == 0
    assert M.exact_match("It is a thing.", "It is a thing.<|eot_id|> extra", strip) == 0


# ---- model-based metrics on real tiny models ----

@pytest.fixture(scope="module")
def lm(tiny_llama):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


def _chat_prompt(tok, q):
    return tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_perplexity_matches_hf_loss_and_batching(lm, tok):
    qs = ["Name the category of the white cup.", "Hi", "What kind of thing is the wide teacher? Tell me now."]
    prompts = [_chat_prompt(tok, q) for q in qs]
    answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|eot_id|>")]
               for a in ("It is a thing.", "Hello! How are you?", "It is a person.")]
    lps = answer_logprobs(lm, prompts, answers, pad_id=tok.pad_token_id, batch_size=3)
    for p, a, lp in zip(prompts, answers, lps):
        assert len(lp) == len(a)
        single = answer_logprobs(lm, [p], [a], pad_id=tok.pad_token_id)[0]
        np.testing.assert_allclose(lp, single, atol=1e-4)
        ids = torch.tensor([p + a]); labels = ids.clone(); labels[0, :len(p)] = -100
        with torch.no_grad(): loss = lm(input_ids=ids, labels=labels).loss.item()
        assert math.log(M.perplexity(lp)) == pytest.approx(loss, rel=1e-4)
    # a trained-on answer ("It is a thing." is what the zoo's chat data answers) is far less perplexing than noise
    noise = [tok("zebra quantum lamp seventeen", add_special_tokens=False)["input_ids"]]
    assert M.perplexity(answer_logprobs(lm, prompts[:1], noise, tok.pad_token_id)[0]) > M.perplexity(lps[0])


def test_kl_estimate_against_a_changed_model(lm, tok, tiny_llama):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad(): ref.lm_head.weight.mul_(0.5)  # a flatter reference distribution
    p = [_chat_prompt(tok, "Hi")]; a = [tok("Hello there", add_special_tokens=False)["input_ids"]]
    pol, r = answer_logprobs(lm, p, a, tok.pad_token_id)[0], answer_logprobs(ref, p, a, tok.pad_token_id)[0]
    assert M.kl_estimate(pol, r) == pytest.approx(float(np.mean(pol - r)))
    assert M.kl_estimate(pol, answer_logprobs(lm, p, a, tok.pad_token_id)[0]) == 0.0
    assert abs(M.kl_estimate(pol, r)) > 1e-3


@pytest.fixture(scope="module")
def rm():
    from alignlab.models import load_model
    m, t = load_model({"model_path": "tiny-llama", "model_type": "seq_cls", "model_kwargs": {"num_labels": 1}, "transformers_settings": {"torch_dtype": "float32"}})
    return m.eval(), t


def test_reward_scores(rm):
    model, t = rm
    chats = [[{"role": "user", "content": "Name the category of the white cup."}, {"role": "bot", "content": "It is a thing."}],
             [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello, how can I help you today? " * 3}],
             [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]]
    batched = M.reward_scores(model, t, LLAMA3, chats, batch_size=3)
    singles = [M.reward_scores(model, t, LLAMA3, [c])[0] for c in chats]
    assert batched == pytest.approx(singles, abs=1e-4)
    # the score is the head's output on the chat rendered with the template (prompt + answer)
    from alignlab.templates import encode
    ids = torch.tensor([encode(LLAMA3, t, chats[0], ends_on_bot=False, only_answer_loss=False).input_ids])
    with torch.no_grad(): assert batched[0] == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)
    assert len(set(round(x, 6) for x in batched)) == 3  # different answers, different scores
    n3 = len(encode(LLAMA3, t, chats[2], ends_on_bot=False, only_answer_loss=False))
    cut = M.reward_scores(model, t, LLAMA3, chats, max_tokens_count=n3)
    assert cut[2] == pytest.approx(batched[2], abs=1e-5) and cut[1] is None  # the long answer cannot fit even alone
    assert M.reward_scores(model, t, LLAMA3, chats, max_tokens_count=3) == [None, None, None]


def test_reward_needs_one_label(tok):
    from alignlab import zoo
    from transformers import AutoModelForSequenceClassification
    two = AutoModelForSequenceClassification.from_pretrained(zoo.get("tiny-llama-cls"))
    with pytest.raises(ValueError, match="num_labels=1"):
        M.reward_scores(two, tok, LLAMA3, [[{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]])
