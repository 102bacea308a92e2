"""The template rules, proved over random chats and random templates with the zoo's real tokenizer."""
import warnings
import pytest
from hypothesis import given, settings, strategies as st, HealthCheck
from alignlab.templates import (LLAMA3, ChatTemplate, IGNORE_INDEX, TruncationError, role_of, allowed_ends, sample_html,
                                tokenize)

CHAT = [{"role": "user", "content": "What kind of thing is the red fox?"}, {"role": "bot", "content": "It is an animal."}]
HS = dict(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))

words = st.sampled_from(["It", "is", "an", "animal", "red", "fox", " ", "\n", "?", ".", "<s>", "&", "é", "日本", "  ", "\t",
                         "<|eot_id|>", "a", "the", "bread"])
content = st.lists(words, min_size=0, max_size=12).map("".join)
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "bot", "assistant"]), "content": content},
                                optional={"disable_loss": st.booleans()})
chats = st.lists(message, min_size=1, max_size=7)
tag = st.text(st.sampled_from("abcXYZ_ |<>é\n"), min_size=1, max_size=6)
piece = st.one_of(st.text(st.sampled_from("ab<>|_:\n [] é#"), max_size=8), st.sampled_from(["<|begin_of_text|>", "<|begin_of", "<|"]))
templates = st.builds(lambda u, b, s, pre, post, suf: ChatTemplate({"user": u, "bot": b, "system": s}, pre + "{role}" + post, suf),
                      tag, tag, tag, piece, piece, st.one_of(piece, st.just("<|eot_id|>")))


def trained_chars(text, spans, msgs, only_answer_loss, only_last):
    "Independent statement of the loss rule, one character at a time."
    last_bot = max((i for i, m in enumerate(msgs) if role_of(m) == "bot" and not m.get("disable_loss")), default=None)
    out = [False] * len(text)
    for s in spans:
        if s.part == "prefix" or s.message >= len(msgs): continue
        m = msgs[s.message]
        if m.get("disable_loss") or (only_answer_loss and s.role != "bot") or (only_last and s.message != last_bot): continue
        for c in range(s.start, s.end): out[c] = True
    return out


def check(tok, tpl, msgs, s, max_tokens, keep_end, inference, only_answer_loss, only_last):
    # ids are the tokenizer's ids of the rendered kept text
    text, spans = tpl.render(s.messages, add_generation_prompt=inference)
    assert s.text == text
    if not text.startswith(tok.bos_token): assert s.input_ids == tok(text)["input_ids"]
    assert s.input_ids.count(tok.bos_token_id) <= 1 + text.count(tok.bos_token)
    # labels are the ids exactly on the tokens that touch a trained character
    tr = trained_chars(text, spans, s.messages, only_answer_loss, only_last) if not inference else [False] * len(text)
    for t, l, (a, b) in zip(s.input_ids, s.labels, s.offsets):
        assert l == (t if any(tr[a:b]) else IGNORE_INDEX)
    if max_tokens is not None: assert len(s) <= max_tokens
    # the kept messages are a contiguous run, as the rule says
    lo, hi = s.kept
    roles = [role_of(m) for m in msgs]
    sys_kept = roles[0] == "system" and lo > 0
    assert s.messages == ([msgs[0]] if sys_kept else []) + msgs[lo:hi]
    ends = allowed_ends(msgs, inference)
    assert hi in ends
    if inference:
        assert roles[hi - 1] != "bot" and text.endswith(tpl.prefix("bot"))
    else:
        assert roles[hi - 1] == "bot" and s.n_loss > 0
    if not keep_end:
        assert lo == 0
        # maximal: every longer allowed end does not fit
        for e in ends:
            if e <= hi: break
            t, sp = tpl.render(msgs[:e], add_generation_prompt=inference)
            has_loss = inference or any(trained_chars(t, sp, msgs[:e], only_answer_loss, only_last))
            assert (max_tokens is not None and len(tok(t)["input_ids"]) > max_tokens) or not has_loss
    else:
        assert hi == ends[0]


@settings(**HS)
@given(tpl=st.one_of(st.just(LLAMA3), templates), msgs=chats, max_tokens=st.one_of(st.none(), st.integers(5, 120)),
       keep_end=st.booleans(), inference=st.booleans(), only_answer_loss=st.booleans(), only_last=st.booleans())
def test_encode_rules_hold_on_random_chats(tok, tpl, msgs, max_tokens, keep_end, inference, only_answer_loss, only_last):
    try:
        s = tpl.encode(tok, msgs, max_tokens_count=max_tokens, keep_end=keep_end, inference=inference,
                       only_answer_loss=only_answer_loss, only_last_replica_loss=only_last)
    except TruncationError:
        # a drop is only allowed when no run the rule permits qualifies: too long, or (training) without a trained character
        if keep_end: return
        for e in allowed_ends(msgs, inference):
            text, spans = tpl.render(msgs[:e], add_generation_prompt=inference)
            has_loss = inference or any(trained_chars(text, spans, msgs[:e], only_answer_loss, only_last))
            too_long = max_tokens is not None and len(tok(text)["input_ids"]) > max_tokens
            assert too_long or not has_loss
        return
    check(tok, tpl, msgs, s, max_tokens, keep_end, inference, only_answer_loss, only_last)


@settings(**HS)
@given(tpl=st.one_of(st.just(LLAMA3), templates), msgs=chats)
def test_jinja_round_trip_token_for_token(tok, tpl, msgs):
    t = tok
    old = t.chat_template
    try:
        for jinja in (tpl.to_jinja(), tpl.to_jinja(t)):  # without the tokenizer (the text decides) and with it
            t.chat_template = jinja
            served = list(t.apply_chat_template(msgs, tokenize=True)["input_ids"])
            assert served == tpl.encode(t, msgs, ends_on_bot=False, only_answer_loss=False).input_ids
            if role_of(msgs[-1]) != "bot" and any(role_of(m) != "system" for m in msgs):
                prompt = list(t.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
                assert prompt == tpl.encode(t, msgs, inference=True).input_ids
    finally:
        t.chat_template = old


def test_ids_are_the_tokenizer_ids_of_the_rendered_text(tok):
    s = LLAMA3.encode(tok, CHAT)
    assert s.input_ids == tok(s.text)["input_ids"]
    assert tok.decode([t for t, l in zip(s.input_ids, s.labels) if l != IGNORE_INDEX]) == "It is an animal.<|eot_id|>"


def test_jinja_round_trip(tok):
    old = tok.chat_template
    tok.chat_template = LLAMA3.to_jinja()
    try: assert list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]) == LLAMA3.encode(tok, CHAT).input_ids
    finally: tok.chat_template = old


def test_nothing_fits_is_an_error(tok):
    with pytest.raises(TruncationError, match="max_tokens_count=3"):
        LLAMA3.encode(tok, CHAT, max_tokens_count=3)


def test_training_needs_a_bot_message_and_random_cut_needs_inference(tok):
    with pytest.raises(TruncationError, match="bot message"):
        LLAMA3.encode(tok, CHAT[:1])
    with pytest.raises(ValueError, match="random_cut"):
        LLAMA3.encode(tok, CHAT, random_cut=True)


def test_system_prompt_survives_keep_end(tok):
    chat = [{"role": "system", "content": "Be brief."}] + CHAT * 4
    full = LLAMA3.encode(tok, chat)
    s = LLAMA3.encode(tok, chat, max_tokens_count=len(full) // 2, keep_end=True)
    assert s.truncated and s.messages[0] == chat[0] and s.messages[-1] == chat[-1] and s.kept[0] > 1


def test_random_cut_is_seeded_and_ends_before_a_bot_message(tok):
    chat = CHAT * 5
    kept = [LLAMA3.encode(tok, chat, inference=True, random_cut=True, seed=k).kept for k in range(30)]
    assert len(set(kept)) > 2 and all(role_of(chat[hi]) == "bot" for _, hi in kept)
    assert kept == [LLAMA3.encode(tok, chat, inference=True, random_cut=True, seed=k).kept for k in range(30)]


def test_double_bos_is_collapsed_and_slow_path_warns(tok):
    tpl = ChatTemplate(LLAMA3.role_tag_mapping, "<|begin_of_text|>" + LLAMA3.prefix_template, LLAMA3.suffix_template)
    s = tpl.encode(tok, CHAT)
    assert s.input_ids[0] == tok.bos_token_id and s.input_ids[1] != tok.bos_token_id
    from alignlab import templates
    templates._SLOW_WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        p = LLAMA3.encode(tok, CHAT, per_piece=True)
    assert p.per_piece and any("slow tokenizer" in str(x.message) for x in w)
    assert p.input_ids == LLAMA3.encode(tok, CHAT).input_ids  # Llama-3's special-token seams: no merge differences here


def test_token_text_is_escaped(tok):
    h = sample_html(LLAMA3.encode(tok, [{"role": "user", "content": "<s>x</s> & <b>"}, {"role": "bot", "content": "<i>"}]))
    body = h.split('<div style="margin-top:6px">', 1)[1]
    assert "<s>" not in body and "<b>" not in body and "<i>" not in body and "&lt;" in body and "&lt;|eot_id|&gt;" in body
