"""The seam doctor on the zoo's real tokenizer and data: is the served prompt a token prefix of the training ids, is the stop one
id sequence; checked against oracles that ask the tokenizer directly, and a negative control (the Llama-3 template) everywhere."""
import json, logging
import pytest
from hypothesis import example, given, settings, strategies as st, HealthCheck
from alignlab import zoo
from alignlab.datasets import build_dataset
from alignlab.encoding import encode_chats
from alignlab.seams import find_seams, kept_run, prefix_gap, served, trained_turns
from alignlab.templates import LLAMA3, ChatTemplate, TruncationError, encode

PLAIN = {"role_tag_mapping": {"system": "system", "user": "user", "bot": "bot"}, "prefix_template": "[{role}] ", "suffix_template": "\n"}
SPACED = {"role_tag_mapping": {"system": "System", "user": "User", "bot": "Bot"}, "prefix_template": "{role}: ", "suffix_template": " "}
MIXED = {**PLAIN, "suffix_template": "<|eot_id|>"}  # plain tags after a special token: the prompt's tail is encoded alone
L3 = {"role_tag_mapping": dict(LLAMA3.role_tag_mapping), "prefix_template": LLAMA3.prefix_template, "suffix_template": LLAMA3.suffix_template}
OPENERS = ["That is {c}", "The answer: {c}", "Sure, {c}", "Hello! {c}", "{c}"]


def chat_records(split="train"):
    return [json.loads(l) for l in (zoo.get("chat") / f"{split}.jsonl").read_text().splitlines()]


def reopened(records):
    "The records with each answer opened by one of `OPENERS` in turn (the zoo's answers all start with `It`)."
    n = 0
    def bot(m):
        nonlocal n
        n += 1
        return {**m, "content": OPENERS[n % len(OPENERS)].format(c=m["content"])}
    return [{**r, "messages": [bot(m) if m["role"] == "bot" else m for m in r["messages"]]} for r in records]


def source(records, name="d", **kw):
    return {"sources": [{"name": name, "records_data": records, "sample_rate": 1}], **kw}


def merges(tok, answer):
    "The oracle: does a space before `answer` merge into its first token?"
    return tok.tokenize(" " + answer)[0] != "Ġ"


def test_llama3_is_silent_on_the_zoo_chat_data(tok):
    rep = build_dataset({"sources": [{"name": "train", "records_path": str(zoo.get("chat") / "train.jsonl"), "sample_rate": 1}]}, tok).report
    n_turns = sum(m["role"] == "bot" for r in chat_records() for m in r["messages"])
    assert (rep.seams.prompts, rep.seams.turns, len(rep.seams.seams), len(rep.seams.stops)) == (n_turns, n_turns, 0, 0)
    assert n_turns > 2000  # multi-turn chats: every trained answer is checked, not only the last
    assert rep.warnings == []


def test_trailing_space_seams_match_the_oracle_and_name_the_first_record(tok, tmp_path):
    recs = reopened(chat_records())
    path = tmp_path / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    d = {"sources": [{"name": "varied", "records_path": str(path), "sample_rate": 1}]}
    rep = build_dataset({**d, "prompt_template": PLAIN}, tok).report
    want = [(i, j) for i, r in enumerate(recs) for j, m in enumerate(r["messages"]) if m["role"] == "bot" and merges(tok, m["content"])]
    assert sorted((s.record, s.message) for s in rep.seams.seams) == want and 0 < len(want) < rep.seams.prompts
    assert {j for _, j in want} >= {1, 2, 3, 4}  # first and second answers, with and without a system prompt
    i, j = want[0]
    first = recs[i]["messages"][j]["content"]
    line = next(w for w in rep.warnings if w.startswith("seam:"))
    assert line.startswith(f"seam: {len(want)} of {rep.seams.prompts} served prompts ({len({i for i, _ in want})} records)")
    assert f"record {recs[i]['id']} ({path}:{i + 1}), messages[{j}]: prompt ends `]` `Ġ`, training has `{tok.tokenize(' ' + first)[0]}`" in line
    assert "fix: move the space at the end of prefix_template '[{role}] ' into the messages' content" in line
    assert build_dataset(d, tok).report.warnings == []  # the negative control: the same chats under Llama 3
    # the first fix, applied: no trailing space in the prefix, the space moved into the content
    moved = [{**r, "messages": [{**m, "content": " " + m["content"]} for m in r["messages"]]} for r in recs]
    nospace = {**PLAIN, "prefix_template": "[{role}]"}
    assert not build_dataset(source(moved, prompt_template=nospace), tok).report.seams


def test_only_trained_turns_are_checked(tok):
    chat = [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}, {"role": "user", "content": "And?"},
            {"role": "bot", "content": "It is fine."}]
    rep = build_dataset(source([{"id": "a", "messages": chat}], prompt_template=PLAIN), tok).report.seams
    assert [(s.record, s.message) for s in rep.seams] == [(0, 1)] and rep.prompts == 2
    last_only = build_dataset(source([{"id": "a", "messages": chat}], prompt_template=PLAIN, only_last_replica_loss=True), tok).report.seams
    assert (last_only.prompts, last_only.seams) == (1, [])  # the first answer carries no loss: the model is not taught it
    off = [{**m, "disable_loss": True} if m["content"] == "Hello." else m for m in chat]
    assert not build_dataset(source([{"id": "a", "messages": off}], prompt_template=PLAIN), tok).report.seams


def test_stop_merged_with_what_follows(tok):
    recs = chat_records()
    rep = build_dataset(source(recs, prompt_template=SPACED), tok).report
    mid = [(i, j) for i, r in enumerate(recs) for j in trained_turns(r["messages"])[:-1]]
    assert sorted((s.record, s.message) for s in rep.seams.stops) == mid and {s.how for s in rep.seams.stops} == {"what follows"}
    assert tok.convert_ids_to_tokens(list(rep.seams.suffix)) == ["Ġ"]  # at a chat's end, the suffix is its own token
    line = next(w for w in rep.warnings if w.startswith("stop:"))
    assert f"in {len(mid)} of {rep.seams.turns} bot turns" in line and "trained as `ĠU` (merged with what follows)" in line
    assert "fix: end suffix_template with a special token" in line
    assert not [w for w in build_dataset(source(recs), tok).report.warnings if w.startswith("stop:")]  # <|eot_id|>: never merges


def test_both_sides_of_a_pair_and_a_trailing_eos(tok):
    ctx = [{"role": "user", "content": "Who?"}]
    pairs = [{"id": f"p{i}", "context": ctx, "answer_w": {"role": "bot", "content": "Hello." if i % 2 else "It is."},
              "answer_l": {"role": "bot", "content": "No."}} for i in range(6)]
    for single_eos in (True, False):  # false: an EOS after every sample, which the doctor does not read as training ids
        rep = build_dataset(source(pairs, dataset_type="pair_preferences", prompt_template=PLAIN, single_eos=single_eos), tok).report.seams
        assert rep.prompts == 12 and len(rep.seams) == 3 + 6 and rep.records == 6  # w: the 3 `Hello.`; l: every `No.` (`ĠNo`)


text = st.lists(st.sampled_from(["Hello", "It", " is", "No", " No", "?", ".", "\n", " ", "é", "日本"]), max_size=5).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "bot"]), "content": text}, optional={"disable_loss": st.booleans()})
exchange = st.tuples(text, text, st.booleans()).map(lambda t: [{"role": "user", "content": t[0]}, {"role": "bot", "content": t[1], **({"disable_loss": True} if t[2] else {})}])
dialog = st.tuples(st.one_of(st.none(), text), st.lists(exchange, min_size=1, max_size=3)).map(
    lambda t: ([{"role": "system", "content": t[0]}] if t[0] is not None else []) + [m for e in t[1] for m in e])
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"},
         {"role": "user", "content": "?"}, {"role": "bot", "content": "No"}]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@example(chats=[HELLO], max_tokens=None, keep_end=False, only_last=False, tpl=PLAIN)  # two seams: the check is not vacuous
@example(chats=[HELLO], max_tokens=20, keep_end=True, only_last=False, tpl=SPACED)   # cut to the system prompt and the last exchange
@example(chats=[HELLO], max_tokens=None, keep_end=False, only_last=False, tpl=MIXED)  # two seams, found on the tails
@given(chats=st.lists(st.one_of(dialog, dialog, st.lists(message, min_size=1, max_size=6)), min_size=1, max_size=8),
       max_tokens=st.one_of(st.none(), st.none(), st.integers(10, 60)), keep_end=st.booleans(), only_last=st.booleans(),
       tpl=st.sampled_from([PLAIN, SPACED, MIXED, L3]))
def test_batched_doctor_equals_a_record_by_record_check(tok, chats, max_tokens, keep_end, only_last, tpl):
    """The doctor's prompt seams == encoding each kept sample and each served prompt one at a time with `encode` and comparing."""
    tpl = ChatTemplate(**tpl)
    kw = dict(max_tokens_count=max_tokens, keep_end=keep_end, only_last_replica_loss=only_last)
    te = []
    store, kept, status = encode_chats(tpl, tok, chats, token_ends=te, **kw)
    rep = find_seams(tpl, tok, chats, store, kept, te, only_last_replica_loss=only_last, status=status)
    want = []
    for i, c in enumerate(chats):
        try: s = encode(tpl, tok, c, **kw)
        except TruncationError: continue
        run = kept_run(c, s.kept)
        assert run == s.messages
        for j in trained_turns(run, True, only_last):
            if not served(run, j): continue
            try: p = encode(tpl, tok, run[:j], inference=True)
            except TruncationError: continue
            if prefix_gap(p.input_ids, s.input_ids) is not None: want.append((i, next(k for k, m in enumerate(c) if m is run[j])))
    assert sorted((s.record, s.message) for s in rep.seams) == want


def test_warnings_reach_the_plan_and_the_run_log(tok, caplog):
    from alignlab.experiment import Experiment
    from alignlab.run import _say_drops
    recs = [{"id": f"h{i}", "messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello."}]} for i in range(8)]
    p = Experiment().model("tiny-llama").chat_dataset(recs, val=recs[:2], template=PLAIN).trainer(max_steps=1).plan()
    assert "warning: seam: 8 of 8 served prompts (8 records)" in repr(p) and "seam: 8 of 8" in p._repr_html_()
    assert p["tokenizer"] in repr(p.datasets["train"])  # the report names the tokenizer as the plan does
    ds = build_dataset(source(recs, name="train", prompt_template=PLAIN), tok)
    with caplog.at_level(logging.WARNING, logger="alignlab.run"):
        _say_drops(ds)
    assert any(r.getMessage().startswith("train dataset: seam: 8 of 8 served prompts") for r in caplog.records)


def test_report_names_the_tokenizer_and_an_ignored_use_fast(tok):
    from alignlab.models import load_tokenizer
    rep = build_dataset(source(chat_records("val")[:4]), tok).report
    assert rep.tokenizer == f"tokenizer: {type(tok).__name__} (fast)" and rep.tokenizer in repr(rep) and "<td>tokenizer</td>" in rep._repr_html_()
    asked_slow = load_tokenizer({"use_fast": False}, zoo.get("tiny-llama"))
    line = build_dataset(source(chat_records("val")[:4]), asked_slow).report.tokenizer
    assert "use_fast=false asked, but transformers loaded the fast one" in line


def test_prompt_tails_after_a_special_token_equal_whole_prompts(tok):
    """The cheap path (the text after the last special token encoded alone) finds exactly what encoding every prompt whole finds."""
    recs = reopened(chat_records())
    chats = [r["messages"] for r in recs]
    for d in (MIXED, L3, PLAIN):
        tpl = ChatTemplate(**d); te = []
        store, kept, status = encode_chats(tpl, tok, chats, token_ends=te)
        cheap, whole = (find_seams(tpl, tok, chats, store, kept, e, status=status) for e in (te, None))
        assert cheap.prompts == whole.prompts == 2490
        assert [(s.record, s.message, s.served, s.trained) for s in cheap.seams] == [(s.record, s.message, s.served, s.trained) for s in whole.seams]
        assert bool(cheap.seams) == (d is not L3)  # plain tags seam, after a special token or not; Llama 3 does not
