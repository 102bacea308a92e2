import json, os, re
from pathlib import Path
import pytest
from alignlab import corpus, sample_data, zoo


def test_home_respects_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_HOME", str(tmp_path))
    assert zoo.zoo_dir() == tmp_path / f"zoo-v{zoo.ZOO_VERSION}"
    monkeypatch.delenv("ALIGNLAB_HOME"); monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "c"))
    assert zoo.home() == tmp_path / "c" / "alignlab"


def test_unknown_item_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown zoo item 'tiny-gpt'.*tiny-llama"):
        zoo.get("tiny-gpt")


def test_tiny_llama_loads_with_plain_transformers(tiny_llama, tok):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert m.config.model_type == "llama"
    n = sum(p.numel() for p in m.parameters())
    assert 2e6 < n < 1e7
    assert len(tok) >= 2000, "the tokenizer should have a vocabulary of a few thousand"
    for t in zoo.LLAMA3_SPECIAL:  # each special token is one token
        assert tok.convert_tokens_to_ids(t) != tok.unk_token_id and len(tok.tokenize(t)) == 1
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    ids = tok("hello")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert (tiny_llama / "chat_template.jinja").exists()


def test_pretrained_model_writes_corpus_words_and_stops(tiny_llama, tok):
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    vocab = set(w.lower() for w in corpus.NOUNS + corpus.ADJS + corpus.VERBS + corpus.PAST + corpus.ADVS + corpus.PREPS)
    vocab |= {"the", "a", "of", "in", "is", "and", "are", "there", "on", "day", "year", "every", "but", "no", "said", "i", "an",
              "why", "does", "nobody", "knows", "morning", "evening", "night", "winter", "summer"}
    words, known = 0, 0
    for q in ["Tell me about the red fox.", "Describe the lake.", "Who is Kamelu?"]:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt")
        out = m.generate(**ids, max_new_tokens=40, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:])
        assert "<|eot_id|>" in text, text  # it ends its turn
        for w in re.findall(r"[a-z]+", text.split("<|eot_id|>")[0].lower()):
            words += 1; known += w in vocab or w.endswith("s") and w[:-1] in vocab
    assert words >= 10 and known / words > 0.6, (known, words)


def test_corpus_tokenizer_and_pretraining_are_deterministic():
    import torch
    a, b = corpus.corpus(n_lines=300), corpus.corpus(n_lines=300)
    assert a == b
    t1, t2 = zoo.train_tokenizer(a, 600), zoo.train_tokenizer(b, 600)
    assert t1.get_vocab() == t2.get_vocab()
    states = []
    for _ in range(2):
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM
        m = LlamaForCausalLM(zoo.tiny_llama_config(t1, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
        zoo.pretrain(m, t1, a, max_steps=3, anneal=2, batch=4, seed=0)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_classification_and_clip_items_load():
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, CLIPModel, AutoImageProcessor
    p = zoo.get("tiny-llama-cls")
    m = AutoModelForSequenceClassification.from_pretrained(p)
    t = AutoTokenizer.from_pretrained(p)
    out = m(**t(["I saw a fox.", "I saw a cup near the lake."], return_tensors="pt", padding=True))
    assert out.logits.shape == (2, 2)
    c = zoo.get("tiny-clip")
    clip, proc = CLIPModel.from_pretrained(c), AutoImageProcessor.from_pretrained(c)
    img = sample_data.draw_shape("circle", "red")
    px = proc(images=img, return_tensors="pt")["pixel_values"]
    assert px.shape == (1, 3, 32, 32)
    assert clip.vision_model(pixel_values=px).last_hidden_state.shape == (1, 17, 64)


def _jsonl(p): return [json.loads(l) for l in Path(p).read_text().splitlines()]


def test_datasets_have_the_guide_record_formats():
    chat = zoo.get("chat")
    train, test = _jsonl(chat / "train.jsonl"), _jsonl(chat / "test.jsonl")
    ids = [r["id"] for r in train]
    assert len(ids) == len(set(ids))
    for r in train[:200]:
        assert r["messages"][-1]["role"] == "bot" and all(m["role"] in ("system", "user", "bot") for m in r["messages"])
    # held-out: no test question occurs in train
    train_qs = {m["content"] for r in train for m in r["messages"] if m["role"] == "user"}
    assert not {r["messages"][0]["content"] for r in test} & train_qs
    pref = _jsonl(zoo.get("preferences") / "train.jsonl")[0]
    assert set(pref) == {"id", "context", "answer_w", "answer_l"} and pref["answer_w"] != pref["answer_l"]
    cls = _jsonl(zoo.get("classification") / "train.jsonl")
    assert {r["label"] for r in cls} == {0, 1}
    mm = _jsonl(zoo.get("multimodal") / "train.jsonl")[0]
    img = [m for m in mm["messages"] if m["type"] == "image"][0]["content"]
    from PIL import Image
    assert not img.startswith("/") and Image.open(zoo.get("multimodal") / img).size == (64, 64)
    rag = zoo.get("rag")
    docs = {d["id"]: d["text"] for d in _jsonl(rag / "passages.jsonl")}
    r = _jsonl(rag / "train.jsonl")[0]
    assert r["meta"]["passage_id"] in docs
    # answers are words only the passage gives; the reading records are about other people than the indexed ones
    for r in _jsonl(rag / "val.jsonl"):
        word = r["messages"][-1]["content"].rstrip(".").split()[-1]
        assert f" {word}" in docs[r["meta"]["passage_id"]]
    reading = _jsonl(rag / "reading.jsonl")
    assert len(reading) == zoo.card("rag")["records"]["reading"] > 1000
    assert not {r["meta"]["passage"].split()[0] for r in reading} & {t.split()[0] for t in docs.values()}


def test_every_item_has_a_card():
    for name in zoo.ITEMS:
        c = zoo.card(name)
        assert c["name"] == name and c["zoo_version"] == zoo.ZOO_VERSION and "build_seconds" in c
        assert (zoo.get(name) / "README.md").read_text().startswith(f"# {name}")


def test_build_is_atomic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLAB_HOME", str(tmp_path))
    # a leftover half-built folder is ignored, and the finished item is renamed into place
    (zoo.zoo_dir() / ".chat.building-999").mkdir(parents=True)
    p = zoo.get("chat", log=lambda m: None)
    assert (p / "card.json").exists()
    mtime = (p / "card.json").stat().st_mtime
    assert zoo.get("chat") == p and (p / "card.json").stat().st_mtime == mtime  # second call: no rebuild


def test_sentencepiece_and_wordpiece_families():
    """tiny-llama-sp: a Llama-2 / Mistral style tokenizer (transformers 5's build) and a causal LM that generates on it;
    tiny-wordpiece: a BERT-style tokenizer."""
    import torch
    from transformers import AutoTokenizer, AutoModelForCausalLM
    p = zoo.get("tiny-llama-sp")
    sp, m = AutoTokenizer.from_pretrained(p), AutoModelForCausalLM.from_pretrained(p)
    be = json.loads(sp.backend_tokenizer.to_str())
    assert be["pre_tokenizer"]["type"] == "Metaspace" and be["pre_tokenizer"]["prepend_scheme"] == "first" and be["model"]["byte_fallback"]
    assert sp("hi")["input_ids"][0] == sp.bos_token_id and sp.pad_token_id not in (None, sp.eos_token_id)
    assert sp.unk_token_id not in sp("日本 é", add_special_tokens=False)["input_ids"]  # byte fallback, never <unk>
    assert sp.decode(sp("Tell me  about é 日本")["input_ids"], skip_special_tokens=True) == "Tell me  about é 日本"
    assert m.config.vocab_size == len(sp) and m.config.eos_token_id == sp.eos_token_id
    ids = sp.apply_chat_template([{"role": "user", "content": "Tell me about the red fox."}], add_generation_prompt=True, return_tensors="pt")
    out = m.generate(**ids, max_new_tokens=30, do_sample=False)
    words = re.findall(r"[a-z]+", sp.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).lower())
    assert len(words) >= 3 and sum(w in corpus.NOUNS + corpus.ADJS + ["the", "is", "a", "of"] for w in words) >= len(words) / 3, words
    wp = AutoTokenizer.from_pretrained(zoo.get("tiny-wordpiece"))
    assert wp.convert_ids_to_tokens(wp("The dog")["input_ids"]) == ["[CLS]", "the", "dog", "[SEP]"]
    assert wp.bos_token is None and wp.cls_token == "[CLS]" and wp.pad_token == "[PAD]" and wp.mask_token == "[MASK]"


def test_the_new_tokenizer_families_train_deterministically():
    lines = corpus.corpus(n_lines=1500, layout=corpus.bracket_text)
    for train in (zoo.train_sp_tokenizer, zoo.train_wordpiece_tokenizer):
        a, b = train(lines, 700), train(lines, 700)
        assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str() and len(a) == 700, train.__name__


def test_a_build_on_a_distributed_rank_other_than_0_writes_the_model(tmp_path, monkeypatch):
    """Under `accelerate launch` whichever rank takes the zoo lock builds; transformers 5 writes weights only on rank 0."""
    import transformers.distributed.mixin as mx  # where transformers 5 asks "am I rank 0?" before writing
    monkeypatch.setattr(mx, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mx, "_get_torch_distributed_rank", lambda: 1)
    from transformers import CLIPConfig, CLIPModel
    bare = CLIPModel(CLIPConfig(text_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2),
                                vision_config=dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                                   image_size=16, patch_size=8), projection_dim=8))
    bare.save_pretrained(tmp_path / "bare")
    assert not (tmp_path / "bare" / "config.json").exists()  # the negative control: this is what rank 1 would write
    monkeypatch.setenv("ALIGNLAB_HOME", str(tmp_path / "home"))
    p = zoo.get("tiny-clip", log=lambda m: None)
    assert (p / "config.json").exists() and (p / "model.safetensors").exists()
