from alignlab.templates import LLAMA3, IGNORE_INDEX, TruncationError
import pytest

CHAT = [{"role": "user", "content": "What kind of thing is the red fox?"}, {"role": "bot", "content": "It is an animal."}]


def test_ids_are_the_tokenizer_ids_of_the_rendered_text(tok):
    s = LLAMA3.encode(tok, CHAT)
    assert s.input_ids == tok(s.text)["input_ids"]
    assert tok.decode([t for t, l in zip(s.input_ids, s.labels) if l != IGNORE_INDEX]) == "It is an animal.<|eot_id|>"


def test_jinja_round_trip(tok):
    tok.chat_template = LLAMA3.to_jinja()
    assert list(tok.apply_chat_template(CHAT, tokenize=True)["input_ids"]) == LLAMA3.encode(tok, CHAT).input_ids


def test_nothing_fits_is_an_error(tok):
    with pytest.raises(TruncationError):
        LLAMA3.encode(tok, CHAT, max_tokens_count=3)
