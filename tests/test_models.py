"""alignlab.models on the zoo's real tokenizer and models with real peft: embedding init, PEFT kinds, adapters, merge, bad input."""
import json, shutil, time
import pytest, torch
from alignlab import zoo
from alignlab.models import load_model, merge_adapters_to_base, merge_from_settings, save_model, token_view
from alignlab.adapters import PEFT_NAMES
from alignlab.settings import SettingsError

F32 = {"transformers_settings": {"torch_dtype": "float32"}}  # the checks compare numbers to float32 tolerances (the default is turbo's bfloat16)
STRAT = {"<RS>": "<|begin_of_text|>", "<super_bot>": "the best bot ever"}
TEXTS = ["<super_bot> says hello <RS> the cat is red", "<RS> a dog <super_bot> is blue and small"]
KIND = {"LORA": {"r": 8}, "PREFIX_TUNING": {"num_virtual_tokens": 8}, "PROMPT_TUNING": {"num_virtual_tokens": 8},
        "P_TUNING": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}}


# tiny models run fastest on one thread: with 2 OpenMP threads on a shared 2-core box an AdamW step took 1.5 s instead of 0.02 s
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one thread for this module, restored after


@pytest.fixture(scope="module")
def base_weights(tiny_llama):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    return m.get_input_embeddings().weight.detach().clone(), m.get_output_embeddings().weight.detach().clone()


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tiny_llama):
    """A GPT-2 (tied embeddings, Conv1D projections) on the zoo tokenizer, built from a config and saved as safetensors."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    d = tmp_path_factory.mktemp("gpt2")
    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=2, n_positions=128, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    m.save_pretrained(d); tok.save_pretrained(d)
    return d


def batch_for(tok, texts=TEXTS):
    b = tok(texts, return_tensors="pt", padding=True)
    return b, b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)


def train(model, batch, labels=None, steps=8, lr=3e-2):
    """A short AdamW loop on one fixed batch; returns the losses."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    model.eval()
    return losses


def logits(model, batch):
    with torch.no_grad(): return model(**batch).logits


def sub_ids(tok, text): return tok(text, add_special_tokens=False)["input_ids"]


# --- embedding initialization ---------------------------------------------------------------------------------------------

def test_mean_of_subwords_untied(base_weights):
    E0, O0 = base_weights
    model, tok = load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": STRAT})
    ids = sub_ids(tok, "the best bot ever")
    assert len(ids) > 1 and model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    sb, rs = tok.convert_tokens_to_ids("<super_bot>"), tok.convert_tokens_to_ids("<RS>")
    E, O = model.get_input_embeddings().weight.detach(), model.get_output_embeddings().weight.detach()
    assert E.shape[0] == O.shape[0] == len(tok) == E0.shape[0] + 2
    torch.testing.assert_close(E[sb], E0[ids].mean(0)); torch.testing.assert_close(O[sb], O0[ids].mean(0))
    assert torch.equal(E[rs], E0[tok.bos_token_id]) and torch.equal(O[rs], O0[tok.bos_token_id])
    assert torch.equal(E[:E0.shape[0]], E0) and torch.equal(O[:O0.shape[0]], O0)   # old rows untouched
    assert model.alignlab_new_tokens == STRAT
    assert tok.tokenize("a<super_bot>b") == ["a", "<super_bot>", "b"]


def test_mean_of_subwords_tied(tiny_gpt2):
    from transformers import AutoModelForCausalLM
    E0 = AutoModelForCausalLM.from_pretrained(tiny_gpt2).get_input_embeddings().weight.detach().clone()
    model, tok = load_model({**F32, "model_path": str(tiny_gpt2), "embeddings_initialization_strategy": STRAT})
    E, O = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert E.data_ptr() == O.data_ptr()                     # still tied after the resize
    ids = sub_ids(tok, "the best bot ever")
    torch.testing.assert_close(E[tok.convert_tokens_to_ids("<super_bot>")].detach(), E0[ids].mean(0))


def test_existing_token_is_an_error():
    with pytest.raises(SettingsError, match=r"embeddings_initialization_strategy: '<\|eot_id\|>' is already a token"):
        load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": {"<|eot_id|>": "end"}})


def test_special_tokens_fill_what_is_missing(base_weights):
    E0, _ = base_weights
    model, tok = load_model({**F32, "model_path": "tiny-llama"}, special_tokens_settings={"eos_token": "</s>", "sep_token": "<sep>"})
    assert tok.eos_token == "<|end_of_text|>" and tok.sep_token == "<sep>"
    assert "eos_token: kept the tokenizer's '<|end_of_text|>' (setting '</s>' not applied)" in model.alignlab_report
    assert model.config.sep_token_id == tok.sep_token_id == E0.shape[0]
    torch.testing.assert_close(model.get_input_embeddings().weight[tok.sep_token_id].detach(), E0.mean(0))


def test_token_view_moves_after_training():
    model, tok = load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": STRAT,
                             "peft_settings": {"name": "LORA", "r": 4}})
    before = token_view(model, tok)
    assert before.rows[0]["token"] == "<RS>" and before.rows[0]["nearest"][0][0] == "<|begin_of_text|>"
    assert before.rows[0]["nearest"][0][1] == pytest.approx(1.0, abs=1e-5)
    train(model, *batch_for(tok), steps=10, lr=5e-2)
    after = token_view(model, tok)
    assert after.rows[0]["norm"] != pytest.approx(before.rows[0]["norm"])
    assert "<table>" in after._repr_html_() and "&lt;RS&gt;" in after._repr_html_()


# --- PEFT kinds -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("new_tokens", [True, False], ids=["new-tokens", "no-new-tokens"])
@pytest.mark.parametrize("name", PEFT_NAMES)
def test_peft_kind_trains_saves_reloads(name, new_tokens, tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    strat = STRAT if new_tokens else None
    model, tok = load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": strat,
                             "peft_settings": {"name": name, **KIND[name]}})
    batch, labels = batch_for(tok, TEXTS if new_tokens else ["says hello the cat is red", "a dog is blue and small"])
    def emb(m):  # the new token's rows as the model uses them: input (where the kind trains it) and output embedding
        i = tok.convert_tokens_to_ids("<super_bot>")
        with torch.no_grad():
            out = m.get_output_embeddings()(torch.eye(256))[:, i]
            return [m.get_input_embeddings()(torch.tensor([i]))[0], out] if name in ("LORA", "PREFIX_TUNING") else [out]
    if new_tokens: row0 = emb(model)
    losses = train(model, batch, labels)
    assert losses[-1] < losses[0] - 0.1, losses
    ref = logits(model, batch)
    if new_tokens: assert all((a - b).abs().max() > 1e-3 for a, b in zip(emb(model), row0))   # the new rows trained
    save_model(model, tok, tmp_path)
    # plain peft: base resized to the saved tokenizer, adapter on top
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    if new_tokens: base.resize_token_embeddings(len(tok2))
    plain = PeftModel.from_pretrained(base, tmp_path).eval()
    assert (logits(plain, batch) - ref).abs().max().item() <= 1e-6
    # and through load_model with the training run's strategy
    again, _ = load_model({**F32, "model_path": "tiny-llama", "adapter_path": str(tmp_path), "embeddings_initialization_strategy": strat})
    assert (logits(again.eval(), batch) - ref).abs().max().item() <= 1e-6
    if new_tokens: assert all(torch.equal(a, b) for a, b in zip(emb(again), emb(model)))      # ... and came back from the adapter


@pytest.mark.parametrize("name", ["LORA", "P_TUNING"])
def test_seq_cls_peft(name, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification
    model, tok = load_model({**F32, "model_path": "tiny-llama-cls", "model_type": "seq_cls", "num_labels": 2,
                             "peft_settings": {"name": name, "task_type": "SEQ_CLS", **KIND[name]}})
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    batch, _ = batch_for(tok, ["the cat is red", "a dog is blue", "red red red", "blue sky"])
    losses = train(model, batch, torch.tensor([0, 1, 0, 1]), steps=10)
    assert losses[-1] < losses[0], losses
    ref = logits(model, batch)
    save_model(model, tok, tmp_path)
    plain = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(zoo.get("tiny-llama-cls")), tmp_path).eval()
    assert (logits(plain, batch) - ref).abs().max().item() <= 1e-6


def test_lora_config_fields_reach_peft():
    """Any LoraConfig field is a setting: use_dora adds DoRA's magnitude vectors (none without it), use_rslora reaches the config."""
    ps = {"name": "LORA", "r": 4, "target_modules": ["q_proj"]}
    dora, _ = load_model({**F32, "model_path": "tiny-llama", "peft_settings": {**ps, "use_dora": True, "use_rslora": True}})
    plain, _ = load_model({**F32, "model_path": "tiny-llama", "peft_settings": ps})
    mags = lambda m: [n for n, _ in m.named_parameters() if "lora_magnitude_vector" in n]
    assert mags(dora) and not mags(plain)
    assert dora.peft_config["default"].use_dora and dora.peft_config["default"].use_rslora
    assert not plain.peft_config["default"].use_dora


def test_prompt_tuning_init_text():
    model, tok = load_model({**F32, "model_path": "tiny-llama", "peft_settings": {"name": "PROMPT_TUNING", "num_virtual_tokens": 4,
                                                                           "prompt_tuning_init_text": "the best bot ever"}})
    ids = tok("the best bot ever")["input_ids"][:4]   # peft's rule: tokenized with BOS, cut (or repeated) to num_virtual_tokens
    assert ids[0] == tok.bos_token_id
    prompt = model.prompt_encoder["default"].embedding.weight.detach()
    torch.testing.assert_close(prompt, model.get_input_embeddings().weight[ids].detach())


def test_trainable_parameters_per_kind(capsys):
    """The closing note's numbers: trainable parameters per PEFT kind on the zoo model, defaults, with and without new tokens."""
    counts = {}
    for name in PEFT_NAMES:
        for strat in (None, STRAT):
            m, _ = load_model({**F32, "model_path": "tiny-llama", "peft_settings": {"name": name}, "embeddings_initialization_strategy": strat})
            counts[name, bool(strat)] = m.get_nb_trainable_parameters()
    with capsys.disabled():
        for (name, new), (n, total) in counts.items():
            print(f"\n{name:14} {'+2 new tokens' if new else 'no new tokens':14} {n:>10,} trainable of {total:,}", end="")
    assert counts["LORA", False][0] == 4 * 2 * 16 * (256 + 256)              # r=16 on q_proj, v_proj in 4 layers
    assert counts["LORA", True][0] == counts["LORA", False][0] + 2 * 2 * 256  # + the 2 new rows of embed_tokens and lm_head
    assert counts["PROMPT_TUNING", False][0] == 32 * 256
    assert counts["PREFIX_TUNING", False][0] == 32 * 4 * 2 * 256


# --- merge ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_adapters_to_base(arch, tmp_path, tiny_gpt2, capsys):
    from transformers import AutoModelForCausalLM
    path = "tiny-llama" if arch == "llama" else str(tiny_gpt2)
    model, tok = load_model({**F32, "model_path": path, "embeddings_initialization_strategy": STRAT, "peft_settings": {"name": "LORA", "r": 8, "target_modules": None}})  # None: peft's targets (GPT-2 has c_attn)
    batch, labels = batch_for(tok)
    train(model, batch, labels, steps=5)
    ref = logits(model, batch)
    save_model(model, tok, tmp_path/"adapter")
    ms = {**F32, "model_path": path, "embeddings_initialization_strategy": STRAT}
    if arch == "llama":   # through a settings file, as `alignlab merge_adapters_to_base --settings_path` would
        cfg = tmp_path/"merge.json"
        cfg.write_text(json.dumps({"model_settings": ms, "adapter_path": str(tmp_path/"adapter"), "save_path": str(tmp_path/"merged")}))
        out = merge_from_settings(cfg)
    else: out = merge_adapters_to_base(ms, tmp_path/"merged", adapter_path=tmp_path/"adapter")
    assert not (out/"adapter_config.json").exists() and list(out.glob("*.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)
    delta = (logits(merged, batch) - ref).abs().max().item()
    scale = ref.abs().max().item()
    with capsys.disabled(): print(f"\nmerge {arch}: max |Δlogits| = {delta:.2e} (largest logit {scale:.1f})", end="")
    assert delta < 1e-4 * max(1.0, scale)  # float32 tolerance, relative to the logits' scale


def test_merge_refuses_prompt_learning(tmp_path):
    model, tok = load_model({**F32, "model_path": "tiny-llama", "peft_settings": {"name": "P_TUNING", "num_virtual_tokens": 4}})
    save_model(model, tok, tmp_path/"a")
    with pytest.raises(SettingsError, match="cannot be merged"):
        merge_adapters_to_base({**F32, "model_path": "tiny-llama"}, tmp_path/"m", adapter_path=tmp_path/"a")


# --- adapters and vocabulary ----------------------------------------------------------------------------------------------

def test_vocab_mismatch_is_caught(tmp_path):
    model, tok = load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": STRAT, "peft_settings": {"name": "LORA", "r": 4}})
    save_model(model, tok, tmp_path)
    n = len(tok) - 2  # the base vocabulary; the adapter's has <RS> and <super_bot> on top
    with pytest.raises(SettingsError, match=rf"adapter_path: .*{n + 2} tokens, the base has {n}; only in the adapter's tokenizer: '<RS>', '<super_bot>'"):
        load_model({**F32, "model_path": "tiny-llama", "adapter_path": str(tmp_path)})
    # a duplicate special token on the base side (the guide's special_tokens_setter warning)
    with pytest.raises(SettingsError, match=r"only in the base tokenizer: '<sep>'"):
        load_model({**F32, "model_path": "tiny-llama", "adapter_path": str(tmp_path), "embeddings_initialization_strategy": STRAT},
                   special_tokens_settings={"sep_token": "<sep>"})
    # without the tokenizer beside it, the row count alone still stops the load
    for f in tmp_path.glob("tokenizer*"): f.unlink()
    (tmp_path/"chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SettingsError, match=f"vocabulary of {n + 2} tokens, the base has {n}"):
        load_model({**F32, "model_path": "tiny-llama", "adapter_path": str(tmp_path)})


# --- bad input: one line naming the setting and what was expected ----------------------------------------------------------

def one_line_error(*a, **kw):
    with pytest.raises(SettingsError) as e: load_model(*a, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path, tiny_llama):
    assert one_line_error({**F32, "model_path": "/no/such/model"}).startswith("model_settings.model_path: no such directory '/no/such/model'; expected")
    assert one_line_error({**F32, "model_path": "tiny-llama-cls"}).startswith("model_settings.model_type: 'causal', but tiny-llama-cls is a classification checkpoint")
    assert one_line_error({**F32, "model_path": "tiny-llama-cls", "model_type": "seq_cls", "model_kwargs": {"num_labels": 3}}).startswith(
        "model_settings.model_kwargs.num_labels: 3, but the classification head of tiny-llama-cls has 2 labels; expected 2")
    assert one_line_error({**F32, "model_path": "tiny-llama", "model_type": "seq2seq"}).startswith("model_settings.model_type: 'seq2seq': encoder-decoder models are not supported")
    assert one_line_error({**F32, "model_path": "tiny-llama", "peft_settings": {"name": "LORRA"}}) == (
        "model_settings.peft_settings.name: unknown PEFT kind 'LORRA'; did you mean 'LORA'? expected one of LORA, PREFIX_TUNING, PROMPT_TUNING, P_TUNING")
    assert one_line_error({**F32, "model_path": "tiny-llama"}, peft_settings={"name": "PTUNING"}).startswith(
        "model_settings.peft_settings.name: unknown PEFT kind 'PTUNING'; did you mean 'P_TUNING'?")
    msg = one_line_error({**F32, "model_path": "tiny-llama", "peft_settings": {"name": "LORA", "target_modules": ["q_proj", "qkv"]}})
    assert msg.startswith("model_settings.peft_settings.target_modules: 'qkv' matches no module of LlamaForCausalLM; expected names such as") and "v_proj" in msg
    assert one_line_error({**F32, "model_path": "tiny-llama", "model_type": "seq_cls", "peft_settings": {"name": "LORA", "task_type": "CAUSAL_LM"}}) == \
        "model_settings.peft_settings.task_type: CAUSAL_LM, but model_type is 'seq_cls'; expected SEQ_CLS"
    assert "did you mean peft_settings" in one_line_error({**F32, "model_path": "tiny-llama", "peft_setting": {"name": "LORA"}})
    assert one_line_error({**F32, "model_path": "tiny-llama", "peft_settings": {"name": "LORA"}}, peft_settings={"name": "LORA"}).startswith("peft_settings: given both")
    # pickled weights only: refused, never unpickled
    d = tmp_path/"bin_only"; d.mkdir(); shutil.copy(tiny_llama/"config.json", d); (d/"pytorch_model.bin").write_bytes(b"not read")
    assert "has no *.safetensors weights" in one_line_error({**F32, "model_path": str(d)})
    assert one_line_error({**F32, "model_path": "tiny-clip"}).startswith("model_settings.model_type: 'causal' has no model class for 'clip' checkpoints")
    assert one_line_error({**F32, "model_path": "tiny-llama", "adapter_path": str(tmp_path)}).startswith("model_settings.adapter_path:")


def test_any_local_dir_and_seq_cls_from_causal(tiny_llama):
    model, tok = load_model({"model_path": str(tiny_llama), "model_type": "seq_cls", "num_labels": 3},
                            {"tokenizer_path": str(tiny_llama), "use_fast": False})
    assert model.config.num_labels == 3 and model.config.pad_token_id == tok.pad_token_id
    assert any("freshly initialized" in r for r in model.alignlab_report)
    assert model.dtype == torch.bfloat16  # turbo's default torch_dtype


# --- turbo-alignment's model keys -----------------------------------------------------------------------------------------

def test_peft_without_name_is_lora_and_modules_to_save_trains_embeddings(base_weights):
    """turbo: a peft_settings without `name` is LoRA (target_modules q_proj, v_proj); modules_to_save ["embed_tokens", "lm_head"]
    trains both matrices whole: after a few steps their rows (new-token rows included) have moved."""
    E0, O0 = base_weights
    model, tok = load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": STRAT,
                             "peft_settings": {"r": 4, "modules_to_save": ["embed_tokens", "lm_head"]}})
    cfg = model.peft_config["default"]
    assert cfg.peft_type.value == "LORA" and set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert not cfg.trainable_token_indices  # the whole matrices train, not single rows
    emb = lambda: (model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone())
    e1, o1 = emb()
    assert torch.equal(e1[:E0.shape[0]], E0)
    losses = train(model, *batch_for(tok), steps=8, lr=3e-2)
    assert losses[-1] < losses[0], losses
    e2, o2 = emb()
    sb, used = tok.convert_tokens_to_ids("<super_bot>"), batch_for(tok)[0]["input_ids"].unique()
    assert (e2[sb] - e1[sb]).abs().max() > 1e-3 and (o2[sb] - o1[sb]).abs().max() > 1e-3  # a new row trained
    assert (e2[used] - e1[used]).abs().max() > 1e-3                                          # and old rows too (whole matrix)


def test_resize_token_embeddings(tmp_path, tiny_llama):
    """resize_token_embeddings: true resizes to exactly len(tokenizer), shrinking spare rows (turbo's meaning); false keeps the
    rows unless new tokens need more (then alignlab grows them and says so)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(tiny_llama); t = AutoTokenizer.from_pretrained(tiny_llama)
    n = len(t)
    m.resize_token_embeddings(n + 8, mean_resizing=False)  # a checkpoint with 8 spare rows beyond its tokenizer
    m.save_pretrained(tmp_path); t.save_pretrained(tmp_path)
    rows = lambda model: model.get_input_embeddings().weight.shape[0]
    kept, _ = load_model({**F32, "model_path": str(tmp_path)})
    assert rows(kept) == n + 8 and not any("resized" in r for r in kept.alignlab_report)
    cut, tok = load_model({**F32, "model_path": str(tmp_path), "resize_token_embeddings": True})
    assert rows(cut) == len(tok) == n and cut.get_output_embeddings().weight.shape[0] == n and cut.config.vocab_size == n
    assert f"embeddings resized from {n + 8} to {n} rows" in cut.alignlab_report
    torch.testing.assert_close(cut.get_input_embeddings().weight, kept.get_input_embeddings().weight[:n])
    grown, tok = load_model({**F32, "model_path": "tiny-llama", "embeddings_initialization_strategy": STRAT})
    assert rows(grown) == len(tok) == n + 2
    assert any(r.startswith(f"embeddings resized from {n} to {n + 2} rows for the new tokens") for r in grown.alignlab_report)


def test_turbo_defaults_accepted_and_gpu_features_refused():
    """turbo configs carry liger_kernels_settings: null, load_in_8bit: false, omit_base_model_save: they load; the GPU-only
    features set to true are refused in one line naming the field."""
    model, tok = load_model({**F32, "model_path": "tiny-llama", "liger_kernels_settings": None, "resize_token_embeddings": False,
                             "transformers_settings": {"torch_dtype": "float32", "load_in_8bit": False, "omit_base_model_save": True,
                                                       "low_cpu_mem_usage": False, "trust_remote_code": False}})
    assert model.alignlab_report[0] == "tokenizer: TokenizersBackend (fast); use_fast=false asked, but transformers loaded the fast one " \
                                       "(the checkpoint has no slow tokenizer)"
    assert one_line_error({"model_path": "tiny-llama", "transformers_settings": {"load_in_8bit": True}}) == \
        "model_settings.transformers_settings.load_in_8bit: true is not supported: 8-bit loading needs bitsandbytes and a CUDA GPU; expected false"
    assert one_line_error({"model_path": "tiny-llama", "liger_kernels_settings": {"use_rope": True}}).startswith(
        "model_settings.liger_kernels_settings.use_rope: True is not supported: Liger kernels are Triton GPU kernels")
    assert "did you mean 'use_rms_norm'" in one_line_error({"model_path": "tiny-llama", "liger_kernels_settings": {"use_rms_norms": False}})
