"""Records, sources, the batched builder (== per-record encode) and the mask doctor, on the zoo's real data and tokenizer."""
import json
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from alignlab.data import DataError, DatasetSettings, SourceSettings, read_source
from alignlab.datasets import build_dataset
from alignlab.encoding import encode_chats
from alignlab.settings import SettingsError, load_settings
from alignlab.templates import LLAMA3, IGNORE_INDEX, TruncationError

GOOD = {"id": "0", "messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "ok"}]}

content = st.lists(st.sampled_from(["It", " is", " an", " animal", "?", ".", "\n", " ", "<s>", "é"]), max_size=10).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "bot"]), "content": content},
                                optional={"disable_loss": st.booleans()})
chats = st.lists(st.lists(message, min_size=1, max_size=6), min_size=1, max_size=12)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(chats=chats, max_tokens=st.one_of(st.none(), st.integers(8, 80)), keep_end=st.booleans(), inference=st.booleans(),
       only_answer_loss=st.booleans(), only_last=st.booleans(), chunk=st.sampled_from([1, 3, 256]))
def test_batched_builder_equals_per_record_encode(tok, chats, max_tokens, keep_end, inference, only_answer_loss, only_last, chunk):
    kw = dict(max_tokens_count=max_tokens, keep_end=keep_end, inference=inference, only_answer_loss=only_answer_loss,
              only_last_replica_loss=only_last)
    store, kept, status = encode_chats(LLAMA3, tok, chats, chunk_size=chunk, **kw)
    assert len(store) == len(chats)
    for i, c in enumerate(chats):
        ids, mask = store[i]
        try: s = LLAMA3.encode(tok, c, **kw)
        except TruncationError:
            assert status[i] not in ("ok", "truncated") and len(ids) == 0; continue
        assert status[i] == ("truncated" if s.truncated else "ok") and tuple(kept[i]) == s.kept
        assert ids.dtype == np.int32 and ids.tolist() == s.input_ids
        assert [bool(m) for m in mask] == [l != IGNORE_INDEX for l in s.labels]


def write(tmp_path, *lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


@pytest.mark.parametrize("line,dataset_type,expected", [
    ('{"id": "1", "messages": [', "chat", ":2: not valid JSON"),
    ({"id": "1"}, "chat", ":2: messages: missing field"),
    ({"id": "1", "messages": [{"role": "tool", "content": "x"}]}, "chat", ":2: messages[0].role: unknown role 'tool'"),
    ({"id": "1", "messages": []}, "chat", ":2: messages: empty messages"),
    ({"id": "1", "messages": [{"role": "user", "content": ["x"]}]}, "chat", ':2: messages[0].content: expected a string, got list ["x"]'),
    ({"id": "1", "messages": [{"role": "user", "content": "x"}], "label": 1.5}, "classification", ":2: label: expected an int class index, got float 1.5"),
    ({"id": "1", "messages": [{"role": "usr", "content": "x"}]}, "chat", ":2: messages[0].role: unknown role 'usr' (expected system, user, bot or assistant); did you mean 'user'?"),
    ({"id": "1", "messages": [{"role": "user", "contnet": "x"}]}, "chat", ":2: messages[0].contnet: unknown key; did you mean 'content'?"),
    ({"id": "0", "messages": [{"role": "user", "content": "x"}]}, "chat", ":2: id: duplicate id '0' (first at"),
    ({"id": "1", "context": [{"role": "user", "content": "x"}], "answer_w": {"role": "bot", "content": "a"}}, "pair_preferences", ":2: answer_l: missing field"),
])
def test_bad_records_are_one_line_errors_naming_file_line_field(tmp_path, line, dataset_type, expected):
    first = {**GOOD, "label": 0} if dataset_type != "pair_preferences" else {"id": "0", "context": GOOD["messages"][:1],
                                                                             "answer_w": GOOD["messages"][1], "answer_l": GOOD["messages"][1]}
    p = write(tmp_path, first, line)
    with pytest.raises(DataError) as e:
        read_source(SourceSettings(name="s", records_path=p, sample_rate=1), dataset_type)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(p)) and expected in msg, msg


def test_bad_sources_and_settings(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: cannot read"):
        read_source(SourceSettings(name="s", records_path=tmp_path / "nope.jsonl", sample_rate=1))
    with pytest.raises(SettingsError, match="exactly one of sample_rate, num_samples .both are set."):
        load_settings(DatasetSettings, {"sources": [{"name": "s", "records_path": "x", "sample_rate": 1, "num_samples": 3}]})
    with pytest.raises(SettingsError, match="did you mean 'only_answer_loss'"):
        load_settings(DatasetSettings, {"sources": [{"name": "s", "records_path": "x", "sample_rate": 1}], "only_answer_los": True})
    with pytest.raises(SettingsError, match="ignore_system_prompt"):
        load_settings(DatasetSettings, {"sources": [{"name": "s", "records_path": "x", "sample_rate": 1, "system_prompt": "x"}],
                                        "ignore_system_prompt": True})
    with pytest.raises(SettingsError, match="prefix_template must contain"):
        load_settings(DatasetSettings, {"sources": [{"name": "s", "records_path": "x", "sample_rate": 1}],
                                        "prompt_template": {"prefix_template": "<{rol}>"}})


def test_sampling_offset_and_system_prompt(tmp_path):
    recs = [{"id": i, "messages": [{"role": "system", "content": "old"}, {"role": "user", "content": f"q{i}"}, {"role": "bot", "content": "a"}]}
            for i in range(100)]
    p = write(tmp_path, *recs)
    got = read_source(SourceSettings(name="s", records_path=p, sample_rate=0.5, offset=10, n_rows=40, system_prompt="new"))
    assert len(got) == 20 and all(10 <= int(r["id"]) < 50 for r in got)
    assert got == read_source(SourceSettings(name="s", records_path=p, sample_rate=0.5, offset=10, n_rows=40, system_prompt="new"))
    assert all(r["messages"][0] == {"role": "system", "content": "new", "disable_loss": True} and len(r["messages"]) == 3 for r in got)
    notes = []
    assert len(read_source(SourceSettings(name="s", records_path=p, num_samples=500), notes=notes)) == 100 and "num_samples=500" in notes[0]


def test_drops_are_counted_and_reported(tok):
    from alignlab import zoo
    ds = build_dataset({"sources": [{"name": "train", "records_path": str(zoo.get("chat") / "train.jsonl"), "sample_rate": 1}],
                        "max_tokens_count": 30}, tok)
    r = ds.report
    assert r.kept + r.n_dropped == 2000 and r.n_dropped > 0 and r.truncated > 0 and len(ds) == r.kept
    assert "max_tokens_count=30" in repr(r) and f"{r.n_dropped} dropped" in repr(r)
    h = ds._repr_html_()
    assert "data:image/png;base64," in h and "dropped" in h
    assert 0 < r.loss_share < 1 and r.n_tokens == int(r.lengths.sum())
    x = ds[0]
    assert len(x["input_ids"]) <= 30 and (x["labels"] != IGNORE_INDEX).any()


def test_doctor_warnings(tok):
    from transformers import AutoTokenizer
    from alignlab import zoo
    d = {"sources": [{"name": "v", "records_path": str(zoo.get("chat") / "val.jsonl"), "sample_rate": 1}]}
    assert build_dataset(d, tok).report.warnings == []
    t2 = AutoTokenizer.from_pretrained(zoo.get("tiny-llama")); t2.pad_token = t2.eos_token
    assert any("pad == eos" in w for w in build_dataset(d, t2).report.warnings)
    w = build_dataset({**d, "prompt_template": {"role_tag_mapping": {"user": "user", "bot": "assistant"}}}, tok).report.warnings
    assert any("role_tag_mapping" in x for x in w)
    w = build_dataset({**d, "prompt_template": {"suffix_template": ""}}, tok).report.warnings
    assert any("suffix_template is empty" in x for x in w)
    d2 = {**d, "prompt_template": {"prefix_template": "<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\n\n"}}
    ds = build_dataset(d2, tok)
    assert any("double BOS" in x for x in ds.report.warnings) and list(ds[0]["input_ids"][:2]).count(tok.bos_token_id) == 1
    no_loss = {"sources": [{"name": "x", "sample_rate": 1, "records_data": [
        {"id": 1, "messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a", "disable_loss": True}]}, GOOD]}]}
    r = build_dataset(no_loss, tok).report
    assert r.kept == 1 and r.dropped == {"no token carries loss": 1} and any("no token that carries loss" in x for x in r.warnings)


def test_other_dataset_types(tok):
    from alignlab import zoo
    pref = build_dataset({"sources": [{"name": "p", "records_path": str(zoo.get("preferences") / "val.jsonl"), "num_samples": 10}],
                          "dataset_type": "pair_preferences"}, tok)
    x = pref[0]
    for side in ("inputs_w", "inputs_l"):
        trained = tok.decode([t for t in x[side]["labels"] if t != IGNORE_INDEX])
        assert trained.startswith("It is") and trained.endswith("<|eot_id|>")  # the answer only, never the context
    assert x["inputs_w"]["input_ids"].tolist() != x["inputs_l"]["input_ids"].tolist()
    cls = build_dataset({"sources": [{"name": "c", "records_path": str(zoo.get("classification") / "val.jsonl"), "sample_rate": 0.1}],
                         "dataset_type": "classification"}, tok)
    assert len(cls) == 20 and isinstance(cls[0]["labels"], int)
    assert cls[0]["input_ids"].tolist() == LLAMA3.encode(tok, cls.records[0]["messages"], ends_on_bot=False, only_answer_loss=False).input_ids


# --- turbo-alignment's dataset keys ---------------------------------------------------------------------------------------

CUSTOM = {"role_tag_mapping": {"user": "USER", "bot": "BOT", "system": "SYS"}, "prefix_template": "<{role}>: ", "suffix_template": "\n"}


def test_turbo_nested_chat_settings_use_their_template(tok):
    """turbo's classification config nests the chat part under chat_settings: its non-default prompt_template is the one used
    (never alignlab's default Llama-3 template); the flat form gives the same samples; pair_preferences and sampling alike."""
    from alignlab import zoo
    from alignlab.templates import ChatTemplate
    src = [{"name": "c", "records_path": str(zoo.get("classification") / "val.jsonl"), "num_samples": 8}]
    nested = {"sources": src, "dataset_type": "classification",
              "chat_settings": {"dataset_type": "chat", "prompt_template": CUSTOM, "max_tokens_count": 64, "only_answer_loss": True}}
    ds = build_dataset(nested, tok)
    assert len(ds) == 8
    tpl = ChatTemplate(CUSTOM["role_tag_mapping"], CUSTOM["prefix_template"], CUSTOM["suffix_template"])
    for k in range(len(ds)):
        ids = ds[k]["input_ids"].tolist()
        assert ids == tpl.encode(tok, ds.records[int(ds.rows[k])]["messages"], max_tokens_count=64, ends_on_bot=False, only_answer_loss=False).input_ids
        text = tok.decode(ids)
        assert "<USER>: " in text and "<|start_header_id|>" not in text
    flat = build_dataset({"sources": src, "dataset_type": "classification", "prompt_template": CUSTOM, "max_tokens_count": 64}, tok)
    assert [flat[k]["input_ids"].tolist() for k in range(len(flat))] == [ds[k]["input_ids"].tolist() for k in range(len(ds))]
    psrc = [{"name": "p", "records_path": str(zoo.get("preferences") / "val.jsonl"), "num_samples": 4}]
    pair = build_dataset({"sources": psrc, "dataset_type": "pair_preferences", "add_labels": False,
                          "chat_settings": {"prompt_template": CUSTOM, "max_tokens_count": 96}}, tok)
    assert "<BOT>: " in tok.decode(pair[0]["inputs_w"]["input_ids"])
    with pytest.raises(SettingsError, match="chat_settings.prompt_template: given both in chat_settings and at the top level"):
        load_settings(DatasetSettings, {**nested, "prompt_template": CUSTOM})
    with pytest.raises(SettingsError, match="chat_dataset: turbo-alignment nests the chat settings under 'chat_dataset' for sampling data only"):
        load_settings(DatasetSettings, {"sources": src, "dataset_type": "classification", "chat_dataset": {}})


def test_single_eos(tok):
    """single_eos (turbo 0.0.4, default true): nothing appended; false: the tokenizer's EOS after every training sample, label
    -100, within max_tokens_count; inference prompts never get one."""
    from alignlab import zoo
    d = {"sources": [{"name": "v", "records_path": str(zoo.get("chat") / "val.jsonl"), "num_samples": 40}], "max_tokens_count": 40}
    one, two = build_dataset(d, tok), build_dataset({**d, "single_eos": False}, tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert len(one) == len(two) > 0 and two.report.n_dropped == one.report.n_dropped
    for k in range(len(two)):
        a, b = one[k], two[k]
        assert a["input_ids"][-1] == eot and tok.eos_token_id not in a["input_ids"].tolist()
        assert b["input_ids"][-1] == tok.eos_token_id and b["labels"][-1] == IGNORE_INDEX and len(b["input_ids"]) <= 40
        if len(a["input_ids"]) < 40: assert b["input_ids"][:-1].tolist() == a["input_ids"].tolist()  # the same sample, plus EOS
        s = two.sample(k)
        assert s.input_ids == b["input_ids"].tolist() and s.labels == b["labels"].tolist()
    # a sample exactly at the limit: with the EOS it no longer fits, so it is cut (whole messages) or dropped
    rec, L = one.records[int(one.rows[0])], len(one[0]["input_ids"])
    tight = build_dataset({"sources": [{"name": "t", "records_data": [rec], "sample_rate": 1}], "max_tokens_count": L, "single_eos": False}, tok)
    assert len(tight) == 0 or (tight.report.truncated == 1 and len(tight[0]["input_ids"]) <= L)
    assert len(build_dataset({"sources": [{"name": "t", "records_data": [rec], "sample_rate": 1}], "max_tokens_count": L + 1, "single_eos": False}, tok)[0]["input_ids"]) == L + 1
    inf = build_dataset({**d, "single_eos": False}, tok, inference=True)
    assert all(inf[k]["input_ids"][-1] != tok.eos_token_id for k in range(len(inf)))
    pair = build_dataset({"sources": [{"name": "p", "records_path": str(zoo.get("preferences") / "val.jsonl"), "num_samples": 4}],
                          "dataset_type": "pair_preferences", "single_eos": False}, tok)
    assert all(pair[0][s]["input_ids"][-1] == tok.eos_token_id for s in ("inputs_w", "inputs_l"))
    cls = build_dataset({"sources": [{"name": "c", "records_path": str(zoo.get("classification") / "val.jsonl"), "num_samples": 4}],
                         "dataset_type": "classification", "single_eos": False}, tok)
    assert cls[0]["input_ids"][-1] == tok.eos_token_id
    # classification inference encodes as training does: the same ids, EOS included
    cinf = build_dataset({"sources": [{"name": "c", "records_path": str(zoo.get("classification") / "val.jsonl"), "num_samples": 4}],
                          "dataset_type": "classification", "single_eos": False}, tok, inference=True)
    assert cinf[0]["input_ids"].tolist() == cls[0]["input_ids"].tolist()


# --- nothing dropped silently; an empty or unusable dataset is named before any model loads ---------------------------------

def test_empty_records_file_names_the_file_and_the_source(tmp_path, tok):
    from alignlab.data import read_records
    p = write(tmp_path, "", name="empty.jsonl")  # a blank line: no records
    with pytest.raises(DataError) as e:
        build_dataset({"sources": [{"name": "train_src", "records_path": str(p), "sample_rate": 1}]}, tok, name="train")
    msg = str(e.value)
    assert "\n" not in msg and msg == (f"{p}: no records in source 'train_src'; so dataset 'train' has no records; "
                                       "expected at least one (a JSON object per line)"), msg
    one = write(tmp_path, GOOD, name="one.jsonl")
    with pytest.raises(DataError) as e: read_records({"sources": [{"name": "s", "records_path": str(one), "num_samples": 0}]})
    assert str(e.value).startswith(f"{one}: source 's' takes none of its 1 records (num_samples=0);"), str(e.value)
    # two sources, one empty: a note, not an error
    r = read_records({"sources": [{"name": "e", "records_path": str(p), "sample_rate": 1}, {"name": "s", "records_path": str(one), "sample_rate": 1}]})
    assert len(r) == 1 and f"{p}: no records in source 'e'" in r.notes


def test_role_missing_from_mapping_names_role_mapping_count_and_first_line(tmp_path):
    from alignlab.data import read_records
    recs = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "bot", "content": "a"}]} for i in range(5)]
    p = write(tmp_path, *recs)
    d = {"sources": [{"name": "s", "records_path": str(p), "sample_rate": 1}],
         "prompt_template": {"role_tag_mapping": {"user": "user", "system": "system"}}}
    for inference in (False, True):  # no tokenizer needed: the check runs before any model loads
        with pytest.raises(DataError) as e: read_records(d, inference=inference, name="train")
        msg = str(e.value)
        assert "\n" not in msg and msg == (f'{p}:1: messages[1].role: \'bot\' is not in prompt_template.role_tag_mapping '
                                           '{"user": "user", "system": "system"}; 5 of the 5 records of dataset \'train\' need it, '
                                           "so all would be dropped; expected role_tag_mapping to map 'bot' to its tag"), msg
    prompts = write(tmp_path, *[{"id": i, "messages": [{"role": "user", "content": "q"}]} for i in range(3)], name="prompts.jsonl")
    with pytest.raises(DataError, match=r"prompts.jsonl:1: role 'bot' \(the bot turn every prompt ends with\) is not in prompt_template.role_tag_mapping"):
        read_records({**d, "sources": [{"name": "p", "records_path": str(prompts), "sample_rate": 1}]}, inference=True)


def test_partial_drops_are_counted_with_the_first_line(tmp_path, tok):
    sys_msg = {"role": "system", "content": "be brief"}
    recs = [{"id": i, "messages": ([sys_msg] if i in (1, 3) else []) + GOOD["messages"]} for i in range(5)]
    p = write(tmp_path, *recs)
    ds = build_dataset({"sources": [{"name": "s", "records_path": str(p), "sample_rate": 1}],
                        "prompt_template": {"role_tag_mapping": {"user": "user", "bot": "assistant"}}}, tok)
    reason = "role 'system' is not in role_tag_mapping (has ['bot', 'user'])"
    assert len(ds) == 3 and dict(ds.report.dropped) == {reason: 2} and ds.report.first_at == {reason: f"{p}:2"}
    assert f"2 of 5 records dropped: {reason} (first at {p}:2)" in ds.report.warnings
    assert f"dropped 2: {reason} (first at {p}:2)" in repr(ds.report)


def test_classification_label_is_optional_for_inference_only(tmp_path):
    from alignlab.data import read_records
    recs = [{"id": 1, "messages": [{"role": "user", "content": "a cat"}], "label": 1}, {"id": 2, "messages": [{"role": "user", "content": "a cup"}]}]
    d = {"sources": [{"name": "c", "records_path": str(write(tmp_path, *recs)), "sample_rate": 1}], "dataset_type": "classification"}
    with pytest.raises(DataError, match=r"d.jsonl:2: label: missing field"): read_records(d)
    assert [r.get("label") for r in read_records(d, inference=True)] == [1, None]
