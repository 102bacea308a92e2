"""Train <-> serve parity on every tokenizer family (02_templates: the one string rule), proved over random chats.

Families: the zoo's byte-level BPE (`tiny-llama`), SentencePiece-style (`tiny-llama-sp`: byte fallback, Metaspace with prepend
scheme "first", `<s>` in front) and WordPiece (`tiny-wordpiece`: `[CLS] $A [SEP]`). Template shapes: Llama-3; turbo-style
`<RS>{role}` ... `</RS>` with the tags as special tokens added to the tokenizer; plain-text tags with a trailing space
`[{role}] `; the same with a prefix that starts with the front token's text (`<s>[{role}] `, `[CLS][{role}] `); and (a fifth) a
template where only some roles' prefixes start with it, so the exported template checks the rendered text. For each pair:
`encode` ids == `tokenizer(served_text(text), add_special_tokens=False)`; `apply_chat_template(to_jinja(tpl, tok))` == `encode`
(with and without the generation prompt vs `inference=True`); the generator's prompt ids (`prompt_ids` of an inference
`build_dataset`) == the same; the batched `build_dataset` == `encode` record by record.
"""
import json, tempfile
from pathlib import Path
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from alignlab import zoo
from alignlab.templates import (LLAMA3, ChatTemplate, IGNORE_INDEX, TruncationError, encode, front_text, overlap_mask, role_of,
                                served_text, trained_intervals)
from alignlab.settings import SettingsError

FAMILIES = ("tiny-llama", "tiny-llama-sp", "tiny-wordpiece")
SHAPES = ("llama3", "turbo", "brackets", "bos-brackets", "mixed")
TURBO_TAGS = ["<RS>", "</RS>", "<user>", "<bot>", "<system>"]
ROLES = {"bot": "bot", "user": "user", "system": "system"}
# the CI profile derandomizes; 100 chats per family x shape (10 batches for the batched path) keep the module near 30 s on 2 busy cores
HS = dict(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))

_TOKS = {}


def tokenizer(family, shape):
    """A fresh tokenizer of `family` (the turbo shape: with its tags added as special tokens), cached per pair."""
    from transformers import AutoTokenizer
    if (family, shape) not in _TOKS:
        t = AutoTokenizer.from_pretrained(zoo.get(family))
        if shape == "turbo": t.add_tokens(TURBO_TAGS, special_tokens=True)
        _TOKS[family, shape] = t
    return _TOKS[family, shape]


def template(tok, shape):
    end = tok.eos_token or tok.sep_token  # the stop token: </s>, <|end_of_text|>, or WordPiece's [SEP]
    return {"llama3": LLAMA3,
            "turbo": ChatTemplate({"bot": "<bot>", "user": "<user>", "system": "<system>"}, "<RS>{role}", "</RS>"),
            "brackets": ChatTemplate(ROLES, "[{role}] ", end),
            "bos-brackets": ChatTemplate(ROLES, front_text(tok) + "[{role}] ", end),
            # only the user's tag starts with the front text: the exported template decides from the rendered text (its "check" form)
            "mixed": ChatTemplate({"user": front_text(tok) + "user", "bot": "bot", "system": "system"}, "{role}: ", end)}[shape]


PAIRS = [pytest.param(f, s, id=f"{f}-{s}") for f in FAMILIES for s in SHAPES]

words = st.sampled_from(["It", "is", "an", "animal", "red", "fox", "The", "bread", "?", ".", ",", "é", "Été", "ñ", "ü", "日本",
                         "中文", "a", "the", " ", "  ", "\n", "\n\n", "\t", "[", "]", "<s>", "x1", "42"])
core = st.lists(words, min_size=0, max_size=10).map("".join)
edge = st.sampled_from(["", " ", "  ", "\n", " \n"])
content = st.one_of(st.tuples(edge, core, edge).map("".join), st.sampled_from([" ", "  ", "\n", ""]))


@st.composite
def chats(draw):
    """system (or not), then 1-3 user/bot turns, sometimes a last user turn (a prompt in flight)."""
    msgs = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        msgs += [{"role": "user", "content": draw(content)}, {"role": draw(st.sampled_from(["bot", "assistant"])), "content": draw(content)}]
    if draw(st.booleans()): msgs.append({"role": "user", "content": draw(content)})
    return msgs


def served(tok, tpl, msgs, prompt=False):
    """What serving gives: the exported chat template through transformers' apply_chat_template."""
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt, chat_template=tpl.to_jinja(tok))
    return list(out["input_ids"])


def prompt_of(msgs):
    """The chat up to its last non-bot message: what a prompt is made of."""
    last = max(i for i, m in enumerate(msgs) if role_of(m) != "bot")
    return msgs[:last + 1]


@pytest.mark.parametrize("family,shape", PAIRS)
@settings(**HS)
@given(msgs=chats())
def test_encode_and_the_exported_template_give_the_same_ids(family, shape, msgs):
    tok = tokenizer(family, shape); tpl = template(tok, shape)
    full = encode(tpl, tok, msgs, ends_on_bot=False, only_answer_loss=False)
    # the documented rule: the served string, tokenized without added special tokens
    assert full.input_ids == tok(served_text(tok, full.text)[0], add_special_tokens=False)["input_ids"]
    assert full.input_ids.count(tok.convert_tokens_to_ids(front_text(tok))) == 1 + full.text[1:].count(front_text(tok))
    # serving: the whole chat, and the prompt with the generation prompt
    assert served(tok, tpl, msgs) == full.input_ids
    p = prompt_of(msgs)
    want = encode(tpl, tok, p, inference=True)
    assert want.kept == (0, len(p)) and served(tok, tpl, p, prompt=True) == want.input_ids
    # a training sample (ends on the last bot turn) is the same rule too
    if any(role_of(m) == "bot" for m in msgs):
        s = encode(tpl, tok, msgs)
        assert s.input_ids == tok(served_text(tok, s.text)[0], add_special_tokens=False)["input_ids"]


def _write(records, d):
    p = Path(d) / "chats.jsonl"
    p.write_text("".join(json.dumps({"id": f"r{i}", "messages": m}) + "\n" for i, m in enumerate(records)))
    return p


def _settings(path, tpl, **kw):
    return {"sources": [{"name": "chats", "records_path": str(path), "sample_rate": 1}], "dataset_type": "chat",
            "prompt_template": {"role_tag_mapping": tpl.role_tag_mapping, "prefix_template": tpl.prefix_template,
                                "suffix_template": tpl.suffix_template}, **kw}


@pytest.mark.parametrize("family,shape", PAIRS)
@settings(**{**HS, "max_examples": 10})
@given(batch=st.lists(chats(), min_size=1, max_size=12), limit=st.sampled_from([None, 48]))
def test_batched_dataset_and_generator_prompts_match_encode(family, shape, batch, limit):
    from alignlab.datasets import build_dataset
    from alignlab.generate import prompt_ids
    tok = tokenizer(family, shape); tpl = template(tok, shape)
    with tempfile.TemporaryDirectory() as d:
        st_ = _settings(_write(batch, d), tpl, max_tokens_count=limit)
        train, prompts = build_dataset(st_, tok), build_dataset(st_, tok, inference=True)
    rows = [int(i) for i in train.rows]
    for i, msgs in enumerate(batch):  # training rows, record by record
        try: s = encode(tpl, tok, msgs, max_tokens_count=limit)
        except TruncationError: assert i not in rows; continue
        ids, m = train.store[i]
        assert ids.tolist() == s.input_ids and [bool(x) for x in m] == [l != IGNORE_INDEX for l in s.labels]
    got = dict(prompt_ids(prompts))  # the generator's prompt path (generate / vLLM take these ids as they are)
    for i, msgs in enumerate(batch):
        try: s = encode(tpl, tok, msgs, max_tokens_count=limit, inference=True)
        except TruncationError: assert i not in got; continue
        assert got[i] == s.input_ids
        assert served(tok, tpl, s.messages, prompt=True) == s.input_ids


# --- the zoo's byte-level tokenizer with the Llama-3 template: ids bit-identical to what they were before the rule ---

# the chat template `LLAMA3.to_jinja()` wrote before the one string rule (zoo v2's tiny-llama/chat_template.jinja)
OLD_LLAMA3_JINJA = ('{%- set roles = {"bot": "assistant", "user": "user", "system": "system", "assistant": "assistant"} -%}'
                    '{{- bos_token -}}{%- for m in messages -%}{{- "<|start_header_id|>" ~ roles[m[\'role\']] ~ "<|end_header_id|>\\n\\n" -}}'
                    '{{- m[\'content\'] -}}{{- "<|eot_id|>" -}}{%- endfor -%}{%- if add_generation_prompt -%}'
                    '{{- "<|start_header_id|>" ~ roles[\'bot\'] ~ "<|end_header_id|>\\n\\n" -}}{%- endif -%}')


def _old_rule(tok, s):
    """The rule before: `tokenizer(text)` with the post-processor's BOS; a token carries loss where it touches a trained character."""
    enc = tok(s.text, return_offsets_mapping=True)
    mask = overlap_mask([tuple(o) for o in enc["offset_mapping"]], trained_intervals(s.spans, s.messages, inference=s.inference))
    return list(enc["input_ids"]), [t if k else IGNORE_INDEX for t, k in zip(enc["input_ids"], mask.tolist())]


def test_zoo_llama3_ids_are_what_they_were(tok, tmp_path):
    from alignlab.datasets import build_dataset
    from alignlab.data import chat_settings
    from alignlab.run import export_chat_template
    assert front_text(tok) == "<|begin_of_text|>"
    n = 0
    for split in ("train", "val", "test"):
        path = zoo.get("chat") / f"{split}.jsonl"
        for inference in (False, True):
            for limit in (None, 64):
                ds = build_dataset(chat_settings(path, max_tokens_count=limit or 100_000), tok, inference=inference)
                step = 1 if split != "train" else 7  # every record of val and test, every 7th of train (the batched path covers all)
                for k in range(0, len(ds), step):
                    i = int(ds.rows[k])
                    r = ds.records[i]
                    s = encode(LLAMA3, tok, r["messages"], max_tokens_count=limit, inference=inference)
                    ids, labels = _old_rule(tok, s)
                    assert s.input_ids == ids and s.labels == labels, r["id"]
                    assert ds.store[i][0].tolist() == ids; n += 1
    assert n > 1000
    # the exported tokenizer: the zoo's template, and what a run writes to final/, are the old template byte for byte
    assert LLAMA3.to_jinja(tok) == OLD_LLAMA3_JINJA == (zoo.get("tiny-llama") / "chat_template.jinja").read_text()
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(zoo.get("tiny-llama"))
    assert export_chat_template(t, LLAMA3) is None
    t.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").read_text() == OLD_LLAMA3_JINJA


# --- refusals: where no chat template can give the training ids, `to_jinja` says so in one line ---

def test_to_jinja_refuses_what_would_drift(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
    from alignlab.templates import BRACKETS
    wp = AutoTokenizer.from_pretrained(zoo.get("tiny-wordpiece"))
    # a slow tokenizer (a real one: BERT's Python WordPiece on the zoo's vocabulary) is tokenized piece by piece
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t, _ in sorted(wp.get_vocab().items(), key=lambda kv: kv[1])))
    slow = BertTokenizerLegacy(str(tmp_path / "vocab.txt"))
    with pytest.raises(SettingsError, match=r"^to_jinja: BertTokenizerLegacy is a slow tokenizer: .*use_fast: true\)$") as e:
        BRACKETS.to_jinja(slow)
    assert "\n" not in str(e.value)
    # a post-processor that puts a token in front whose text does not tokenize back to it
    sp = AutoTokenizer.from_pretrained(zoo.get("tiny-llama-sp"))
    from tokenizers import processors
    be = sp.backend_tokenizer
    # (a byte-fallback token: its text "<0x5B>" is seven characters that tokenize to other pieces)
    be.post_processor = processors.TemplateProcessing(single="<0x5B> $A", special_tokens=[("<0x5B>", be.token_to_id("<0x5B>"))])
    odd = PreTrainedTokenizerFast(tokenizer_object=be, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    with pytest.raises(SettingsError, match=r"puts \['<0x5B>'\] in front of every text, but their text does not tokenize back"):
        BRACKETS.to_jinja(odd)
    s = BRACKETS.encode(odd, [{"role": "user", "content": "hi"}, {"role": "bot", "content": "ok"}])
    assert s.input_ids[0] == be.token_to_id("<0x5B>") and s.offsets[0] == (0, 0)  # encode still puts it in, by id
    # a `bos` that contradicts the tokenizer
    with pytest.raises(SettingsError, match=r"^to_jinja: bos=False, but TokenizersBackend puts '<s>' in front"):
        BRACKETS.to_jinja(AutoTokenizer.from_pretrained(zoo.get("tiny-llama-sp")), bos=False)


def test_each_shape_exports_the_front_as_decided():
    """What the exported templates put in front, per family and shape: the property tests above cover all three forms."""
    from alignlab.templates import jinja_front
    for family, var in zip(FAMILIES, ("bos_token", "bos_token", "cls_token")):
        tok = tokenizer(family, "llama3")
        got = {shape: jinja_front(template(tok, shape), tok) for shape in SHAPES}
        assert got == {"llama3": (var, "add"), "turbo": (var, "add"), "brackets": (var, "add"), "bos-brackets": (var, "none"),
                       "mixed": (var, "check")}, family


def test_the_rule_fixes_the_known_failures():
    """Negative controls: what the exported template would give under the old rule, on the cases of the issue."""
    from transformers import AutoTokenizer
    sp = AutoTokenizer.from_pretrained(zoo.get("tiny-llama-sp"))
    chat = [{"role": "user", "content": "Hello"}, {"role": "bot", "content": "Hi."}]
    # Metaspace "first": the post-processor's BOS in front of "[user]" gives "▁[", the template's "<s>[user]" gives "["
    old = sp(ChatTemplate(ROLES, "[{role}] ", "</s>").render(chat)[0])["input_ids"]
    new = encode(ChatTemplate(ROLES, "[{role}] ", "</s>"), sp, chat).input_ids
    assert old[:1] == new[:1] and old[1] != new[1] and sp.convert_ids_to_tokens(new[1]) == "["
    # a prefix starting with the BOS text: the old template put bos_token in front as well (two BOS)
    bos = ChatTemplate(ROLES, "<s>[{role}] ", "</s>")
    old_jinja = bos.to_jinja(sp).replace("{%- set roles", "{{- bos_token -}}{%- set roles", 1)
    twice = list(sp.apply_chat_template(chat, tokenize=True, chat_template=old_jinja)["input_ids"])
    assert twice[:2] == [sp.bos_token_id] * 2 and served(sp, bos, chat) == encode(bos, sp, chat, only_answer_loss=False).input_ids
    # WordPiece: the front is [CLS], written as {{ cls_token }} (transformers passes the special tokens to the template)
    wp = AutoTokenizer.from_pretrained(zoo.get("tiny-wordpiece"))
    tpl = ChatTemplate(ROLES, "[{role}] ", "[SEP]")
    assert tpl.to_jinja(wp).count("{{- cls_token -}}") == 1 and served(wp, tpl, chat) == encode(tpl, wp, chat, only_answer_loss=False).input_ids
    # and nothing is appended: the old rule's tokenizer(text) ends with the post-processor's [SEP] after the suffix's
    assert wp(tpl.render(chat)[0])["input_ids"] == encode(tpl, wp, chat).input_ids + [wp.sep_token_id]


# --- train -> serve on the SentencePiece family: a few LoRA steps, then the trained run's exported template serves the training ids ---

def test_sp_train_then_serve_with_the_exported_template(tmp_path, one_thread):
    from transformers import AutoTokenizer
    from alignlab.run import train
    from alignlab.models import load_model
    from alignlab.datasets import build_dataset
    from alignlab.generate import prompt_ids, generate_records
    tpl = ChatTemplate({"bot": "assistant", "user": "user", "system": "system"}, "<s>[{role}] ", "</s>")  # Llama-2 style: BOS text in the prefix
    pt = {"role_tag_mapping": tpl.role_tag_mapping, "prefix_template": tpl.prefix_template, "suffix_template": tpl.suffix_template}
    data = lambda split, n: {"sources": [{"name": split, "records_path": str(zoo.get("chat") / f"{split}.jsonl"), "num_samples": n}],
                             "prompt_template": pt, "dataset_type": "chat", "max_tokens_count": 96}
    cfg = {"log_path": str(tmp_path / "run"), "seed": 0,
           "model_settings": {"model_path": "tiny-llama-sp", "model_type": "causal", "transformers_settings": {"torch_dtype": "float32"},
                              "peft_settings": {"name": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
           "train_dataset_settings": data("train", 32),
           "trainer_settings": {"max_steps": 4, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1, "save_strategy": "no",
                                "logging_steps": 1, "learning_rate": 1e-3, "fp16": False}}
    summary = train(cfg, progress=False)
    assert summary["steps"] == 4 and summary["train_samples"] == 32 and summary["final_loss"] == summary["final_loss"]  # finite
    base = AutoTokenizer.from_pretrained(zoo.get("tiny-llama-sp"))  # the tokenizer training used
    served_tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "final")  # what the run exported
    assert served_tok.chat_template == tpl.to_jinja(base) != base.chat_template
    prompts = build_dataset(data("test", 8), served_tok, inference=True)
    items = prompt_ids(prompts)
    assert len(items) == 8
    drift = 0
    for i, ids in items:
        msgs = prompts.records[i]["messages"][:int(prompts.kept_msgs[i][1])]
        trained = encode(tpl, base, msgs, inference=True).input_ids  # the training rule's prompt
        assert ids == trained
        assert list(served_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]) == trained
        assert trained[:2] == [base.bos_token_id, base.convert_tokens_to_ids("[")]  # one <s>, then "[" (no "▁")
        # negative control: the base model's own chat template (no BOS text in the prefix) is not what was trained
        drift += list(base.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"]) != trained
    assert drift == len(items)
    # and the trained run generates from those prompt ids
    model, _ = load_model({"model_path": "tiny-llama-sp", "adapter_path": str(tmp_path / "run" / "final"),
                           "transformers_settings": {"torch_dtype": "float32"}})
    out = generate_records(model, served_tok, prompts, {"transformers_settings": {"do_sample": False, "max_new_tokens": 8}})
    assert len(out) == 8 and all(r["answers"][0]["answer_token_ids"] for r in out)
