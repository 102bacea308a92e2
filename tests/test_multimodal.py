"""Multimodal VLMs (issue 16): settings, readers, the dataset's image blocks, the VLM, learning on the zoo's shape images,
preprocessing to safetensors (pickle reader) and its parity with reading images live."""
import json, math, shutil
from pathlib import Path
import pytest
import torch

from alignlab import zoo
from alignlab.data import DataError, DatasetSettings
from alignlab.settings import SettingsError, load_settings

TPL = {"role_tag_mapping": {"bot": "assistant", "user": "user", "system": "system"},
       "prefix_template": "<|start_header_id|>{role}<|end_header_id|>\n\n", "suffix_template": "<|eot_id|>"}


def ds_settings(folder, split, n, reader=None, **kw):
    return {"sources": [{"name": split, "records_path": str(Path(folder) / f"{split}.jsonl"), "sample_rate": 1}], "prompt_template": TPL,
            "dataset_type": "multimodal", "max_tokens_count": 64, "only_answer_loss": True,
            "modality_token_mapping": {"image": "<img>", "audio": "<audio>"},
            "modality_reader_settings_mapping": {"image": reader or {"reader_type": "clip", "reader_path": "tiny-clip"}, "audio": None},
            "n_modality_embeddings": n, "start_modality_token": "<MS>", "end_modality_token": "</MS>", "truncate_top": False, **kw}


def experiment(run_dir, folder, projector, n, steps, lr=1e-3, pickle=False, val=False, peft=None, bs=8):
    reader = {"reader_type": "pickle", "reader_path": None} if pickle else None
    return {"log_path": str(run_dir), "seed": 3,
            "model_settings": {"model_path": "tiny-llama", "model_type": "causal", "transformers_settings": {"torch_dtype": "float32"},
                               **({"peft_settings": peft} if peft else {})},
            "train_dataset_settings": ds_settings(folder, "train", n, reader),
            **({"val_dataset_settings": ds_settings(folder, "val", n, reader)} if val else {}),
            "modality_encoder_settings_mapping": {"image": {"modality_encoder_type": "clip", "encoder_path": "tiny-clip", "is_pickle": pickle}, "audio": None},
            "modality_projector_mapping": {"image": projector, "audio": None},
            "modality_projector_initialization_mapping": {"image": None, "audio": None},
            "trainer_settings": {"save_strategy": "no", "eval_strategy": "no", "logging_steps": 1, "learning_rate": lr, "max_steps": steps,
                                 "per_device_train_batch_size": bs, "gradient_accumulation_steps": 1, "warmup_steps": 0,
                                 "lr_scheduler_type": "constant", "report_to": [], "load_best_model_at_end": False}}


def inference_settings(run_dir, folder, projector, n, save_path, pickle=False, split="val", batch=16):
    reader = {"reader_type": "pickle", "reader_path": None} if pickle else None
    return {"inference_settings": [{
        "model_settings": {"model_path": str(Path(run_dir) / "final"), "projections_path": str(Path(run_dir) / "final" / "projections"),
                           "n_modality_embeddings": n, "transformers_settings": {"torch_dtype": "float32"}},
        "modality_encoder_settings_mapping": {"image": {"modality_encoder_type": "clip", "encoder_path": "tiny-clip", "is_pickle": pickle}, "audio": None},
        "modality_projector_mapping": {"image": projector, "audio": None},
        "generation_settings": [{"transformers_settings": {"max_new_tokens": 6, "do_sample": False}, "custom_settings": {"batch": batch}}]}],
        "dataset_settings": ds_settings(folder, split, n, reader), "save_path": str(save_path)}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    "The zoo's multimodal builder with more images (600 train / 120 held out): the model must generalize, not memorize 100 images."
    from alignlab.sample_data import build_multimodal
    d = tmp_path_factory.mktemp("shapes")
    build_multimodal(d, n_images=720, seed=11)
    return d


# ---------------------------------------------------------------- settings
def test_wrong_n_modality_embeddings_names_the_right_value(tmp_path):
    from alignlab.run import ExperimentSettings
    folder = zoo.get("multimodal")
    with pytest.raises(SettingsError, match=r"n_modality_embeddings: 225, but the llava projector .* 16 patches .*; expected 16"):
        load_settings(ExperimentSettings, experiment(tmp_path, folder, "llava", 225, 1))
    with pytest.raises(SettingsError, match=r"expected a perfect square such as 4 or 9"):
        load_settings(ExperimentSettings, experiment(tmp_path, folder, "c_abs", 5, 1))
    assert load_settings(ExperimentSettings, experiment(tmp_path, folder, "c_abstractor", 4, 1)).recipe.name == "multimodal"  # turbo's name
    bad = experiment(tmp_path, folder, "llava", 16, 1, pickle=True)
    bad["modality_encoder_settings_mapping"]["image"]["is_pickle"] = False
    with pytest.raises(SettingsError, match="is_pickle: False, but train_dataset_settings's reader is 'pickle'"):
        load_settings(ExperimentSettings, bad)
    img = experiment(tmp_path, folder, "llava", 16, 1)
    img["modality_encoder_settings_mapping"]["image"]["modality_encoder_type"] = "imagebind_image"
    with pytest.raises(SettingsError, match="ImageBind not available offline"):
        load_settings(ExperimentSettings, img)
    chat = experiment(tmp_path, folder, "llava", 16, 1)
    chat["train_dataset_settings"] = {"sources": [{"name": "c", "records_path": str(zoo.get("chat") / "train.jsonl"), "num_samples": 2}]}
    with pytest.raises(SettingsError, match="modality_encoder_settings_mapping: set, but chat data trains sft"):
        load_settings(ExperimentSettings, chat)


def test_reader_modes_and_unreadable_images(tmp_path):
    from PIL import Image
    from alignlab.images import ClipReader, open_image
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    assert open_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)
    tall = Image.new("RGB", (20, 40), "white"); tall.paste((255, 0, 0), (0, 0, 20, 5))
    exif = Image.Exif(); exif[0x0112] = 6
    tall.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    up = open_image(tmp_path / "rot.jpg")
    assert up.size == (20, 40) and up.getpixel((10, 1))[0] > 200
    data = (tmp_path / "rot.jpg").read_bytes(); (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"^train.jsonl:7: image '.*cut.jpg': cannot read it"):
        ClipReader("tiny-clip").read([tmp_path / "cut.jpg"], ["train.jsonl:7"])
    Image.new("L", (50, 30), 128).save(tmp_path / "grey.png")
    assert ClipReader("tiny-clip").read([tmp_path / "grey.png"]).shape == (1, 3, 32, 32)


def test_image_paths_resolve_relative_to_the_records_file(tmp_path, monkeypatch):
    from alignlab.data import read_records
    src = zoo.get("multimodal")
    shutil.copytree(src / "images", tmp_path / "d" / "images")
    rec = json.loads((src / "train.jsonl").read_text().splitlines()[0])
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps(rec) + "\n")
    monkeypatch.chdir(tmp_path)
    assert read_records(ds_settings(tmp_path / "d", "train", 16))[0]["image_paths"][0] == str((tmp_path / "d" / rec["messages"][0]["content"]).resolve())
    # turbo's repository-relative paths: relative to the working directory
    rec["messages"][0]["content"] = "d/" + rec["messages"][0]["content"]
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps(rec) + "\n")
    assert Path(read_records(ds_settings(tmp_path / "d", "train", 16))[0]["image_paths"][0]).is_file()
    rec["messages"][0]["content"] = "nope.png"
    (tmp_path / "d" / "train.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: messages\[0\].content: image 'nope.png' not found"):
        read_records(ds_settings(tmp_path / "d", "train", 16))


# ---------------------------------------------------------------- dataset and VLM
@pytest.fixture(scope="module")
def lm():
    from alignlab.models import load_model
    return load_model({"model_path": "tiny-llama", "transformers_settings": {"torch_dtype": "float32"}}, new_tokens=["<MS>", "<img>", "</MS>"])


def test_truncation_never_splits_an_image(lm):
    from alignlab.data import read_records
    from alignlab.multimodal_data import build_multimodal_dataset
    _, tok = lm
    folder = zoo.get("multimodal")
    two = [{"id": "two", "messages": [{"role": "user", "type": "image", "content": str(folder / "images/img_0000.png")},
                                      {"role": "user", "type": "text", "content": "and"},
                                      {"role": "user", "type": "image", "content": str(folder / "images/img_0001.png")},
                                      {"role": "user", "type": "text", "content": "Colours?"}, {"role": "bot", "type": "text", "content": "red"}]}]
    st = {**ds_settings(folder, "train", 4), "sources": [{"name": "two", "records_data": two, "sample_rate": 1}]}
    ph = tok.convert_tokens_to_ids("<img>")
    whole = build_multimodal_dataset(read_records({**st, "max_tokens_count": None}), tok)
    L = len(whole[0]["input_ids"])
    assert (whole[0]["input_ids"] == ph).sum() == 8 and (whole[0]["labels"][whole[0]["input_ids"] == ph] == -100).all()
    for limit in range(L - 12, L):  # every cut keeps whole blocks: 4 placeholders per kept image, never a part
        ds = build_multimodal_dataset(read_records({**st, "max_tokens_count": limit, "keep_end": True}), tok)
        if len(ds):
            x = ds[0]
            assert (x["input_ids"] == ph).sum() == 4 * len(x["image_paths"]) == 4 * len(x["images"])
    short = build_multimodal_dataset(read_records({**ds_settings(folder, "train", 4), "max_tokens_count": 8}), tok)
    assert len(short) == 0 and short.report.n_dropped == 100 and "no run of whole messages fits" in short.report.drop_lines()[0]


def test_vlm_is_its_language_model_without_images_and_peft_independent(lm):
    from alignlab.models import load_model
    from alignlab.datasets import build_dataset
    from alignlab.multimodal_data import MultimodalCollator
    from alignlab.vlm import build_vlm
    folder = zoo.get("multimodal")
    st = ds_settings(folder, "train", 16)
    DS = load_settings(DatasetSettings, st)
    lora = {"name": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    embs = []
    for peft in (None, lora, {**lora, "modules_to_save": ["embed_tokens", "lm_head"]}):
        m, tok = load_model({"model_path": "tiny-llama", "transformers_settings": {"torch_dtype": "float32"}, **({"peft_settings": peft} if peft else {})},
                            new_tokens=DS.new_tokens)
        torch.manual_seed(0)
        vlm = build_vlm(m, tok, DS, {"modality_encoder_type": "clip", "encoder_path": "tiny-clip"}, "llava")
        b = MultimodalCollator(tok.pad_token_id)([build_dataset(st, tok)[i] for i in range(3)])
        embs.append(vlm.embed(b["input_ids"], b["images"]).detach())
    assert torch.allclose(embs[0], embs[1]) and torch.allclose(embs[0], embs[2])
    x = tok(["The kind pear is a food."], return_tensors="pt").input_ids
    assert torch.equal(vlm(input_ids=x).logits, vlm.language_model(input_ids=x).logits)
    with torch.no_grad():  # negative control: the images matter
        assert abs(float(vlm(**b).loss) - float(vlm(**{**b, "images": b["images"].flip(0)}).loss)) > 1e-4
    with pytest.raises(ValueError, match="placeholders but 2 images"):
        vlm(**{**b, "images": b["images"][:2]})


# ---------------------------------------------------------------- learning, inference, preprocessing
COLOURS = ("red", "green", "blue", "yellow", "purple", "black")  # alignlab.sample_data.SHAPE_COLORS: chance 1/6
SHAPES = ("circle", "square", "triangle")  # chance 1/3


def accuracy(out_file, folder, split="val"):
    "Colour and shape accuracy of generated answers against the records' `A {colour} {shape}.`"
    gold = {json.loads(l)["id"]: json.loads(l)["messages"][-1]["content"].rstrip(".").split() for l in (Path(folder) / f"{split}.jsonl").read_text().splitlines()}
    recs = [json.loads(l) for l in Path(out_file).read_text().splitlines()]
    ans = {r["id"]: r["answers"][0]["content"] for r in recs}
    word = lambda a, ws: next((w for w in a.replace(".", " ").split() if w in ws), None)
    return (sum(word(ans[i], COLOURS) == g[1] for i, g in gold.items()) / len(gold),
            sum(word(ans[i], SHAPES) == g[2] for i, g in gold.items()) / len(gold), ans)


def trained(tmp_path_factory, shapes, projector, n, steps, lr):
    from alignlab.run import train
    from alignlab.inference import run_inference
    run = tmp_path_factory.mktemp(f"run_{projector}")
    s = train(experiment(run, shapes, projector, n, steps, lr), progress=False)
    out = run_inference(inference_settings(run, shapes, projector, n, run / "out"), "multimodal")
    return run, s, accuracy(out / "multimodal_m0_g0.jsonl", shapes)


def before(shapes, projector, n, tmp_path):
    "Accuracy of the untrained VLM (the same seed and settings as the run), through the same generation path."
    import transformers
    from alignlab.run import ExperimentSettings
    from alignlab.vlm import load_vlm, save_vlm
    transformers.set_seed(3)
    vlm, tok = load_vlm(load_settings(ExperimentSettings, experiment(tmp_path, shapes, projector, n, 1)))
    save_vlm(vlm, tok, tmp_path / "final")
    from alignlab.inference import run_inference
    out = run_inference(inference_settings(tmp_path, shapes, projector, n, tmp_path / "out"), "multimodal")
    return accuracy(out / "multimodal_m0_g0.jsonl", shapes)


@pytest.fixture(scope="module")
def llava_run(tmp_path_factory, shapes):
    return trained(tmp_path_factory, shapes, "llava", 16, 150, 1e-3)


def test_a_tiny_vlm_learns_the_colour_with_llava(llava_run, shapes, tmp_path):
    # 120 held-out images; chance: colour 1/6, shape 1/3. Measured here: colour 0.875, shape 0.5 after 150 steps (before: 0).
    # The bar (colour >= 0.5, 3x chance) leaves room for another CPU's kernels.
    b_colour, b_shape, _ = before(shapes, "llava", 16, tmp_path)
    run, s, (colour, shape, ans) = llava_run
    print(f"llava: colour {b_colour:.3f} -> {colour:.3f} (chance {1/6:.3f}); shape {b_shape:.3f} -> {shape:.3f} (chance {1/3:.3f}); loss {s['train_loss_first']:.2f} -> {s['final_loss']:.2f}")
    assert b_colour < 0.3 and colour >= 0.5 and colour >= b_colour + 0.3
    assert (run / "final" / "projections" / "modality_adapters.safetensors").exists() and json.loads((run / "final" / "projections" / "projector.json").read_text())["projector"] == "llava"


def test_a_tiny_vlm_learns_the_colour_with_c_abs(tmp_path_factory, shapes, tmp_path):
    # C-Abstractor pooling the 4x4 patch grid to 2x2 (n = 4). Measured: colour 0.825, shape 0.32 after 150 steps at lr 5e-4
    # (at 1e-3 and 2e-3 it stayed at chance: the deeper projector wants the smaller step). Chance: colour 1/6.
    run, s, (colour, shape, _) = trained(tmp_path_factory, shapes, "c_abs", 4, 150, 5e-4)
    b_colour, b_shape, _ = before(shapes, "c_abs", 4, tmp_path)
    print(f"c_abs: colour {b_colour:.3f} -> {colour:.3f} (chance {1/6:.3f}); shape {b_shape:.3f} -> {shape:.3f} (chance {1/3:.3f})")
    assert b_colour < 0.3 and colour >= 0.5 and colour >= b_colour + 0.3


def test_pickle_reader_matches_reading_images(llava_run, shapes, tmp_path):
    "Preprocessed features (reader pickle + is_pickle) give the same training losses and the same greedy answers as reading images live."
    from alignlab.preprocess import preprocess_images
    from alignlab.run import train
    from alignlab.inference import run_inference
    cfg = {"modality": "image", "reader_settings": {"reader_type": "clip", "reader_path": "tiny-clip"},
           "encoder_settings": {"modality_encoder_type": "clip", "encoder_path": "tiny-clip"}, "dataset_path": str(shapes / "images"),
           "batch_size": 64, "output_file_path": str(shapes / "images")}
    (tmp_path / "pre.json").write_text(json.dumps(cfg))
    from alignlab.cli import main
    assert main(["preprocess_multimodal_dataset", "--settings_path", str(tmp_path / "pre.json")]) == 0
    runs = {}
    for pickle in (False, True):
        s = train(experiment(tmp_path / f"t{pickle}", shapes, "llava", 16, 3, 1e-3, pickle=pickle, bs=4), progress=False)
        runs[pickle] = [s["train_loss_first"], s["final_loss"], s["train_loss_mean"]]
    # float tolerance: the encoder ran on batches of 64 (preprocessing) vs 4 (live); same pixels, same weights
    assert runs[False] == pytest.approx(runs[True], rel=1e-4, abs=1e-4)
    run = llava_run[0]
    live = run_inference(inference_settings(run, shapes, "llava", 16, tmp_path / "live"), "multimodal")
    pre = run_inference(inference_settings(run, shapes, "llava", 16, tmp_path / "pre", pickle=True), "multimodal")
    a, b = (accuracy(p / "multimodal_m0_g0.jsonl", shapes)[2] for p in (live, pre))
    assert a == b and len(a) == 120
    # batched generation: the same greedy answers one prompt at a time (a sample of 8)
    one = run_inference({**inference_settings(run, shapes, "llava", 16, tmp_path / "one", batch=1),
                         "dataset_settings": {**ds_settings(shapes, "val", 16), "sources": [{"name": "val", "records_path": str(shapes / "val.jsonl"), "num_samples": 8}]}}, "multimodal")
    c = {json.loads(l)["id"]: json.loads(l)["answers"][0]["content"] for l in (one / "multimodal_m0_g0.jsonl").read_text().splitlines()}
    assert all(a[k] == v for k, v in c.items())


def test_fluent_vision_chain_equals_the_json(tmp_path):
    "Experiment().model().vision().multimodal_dataset().lora().fit() trains the same run as the JSON: bit-identical adapter and projector."
    from safetensors.torch import load_file
    from alignlab.experiment import Experiment
    from alignlab.run import train
    folder = zoo.get("multimodal")
    lora = {"name": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}  # .lora()'s dropout default is 0
    cfg = experiment(tmp_path / "json", folder, "c_abs", 4, 3, peft=lora, bs=4)
    train(cfg, progress=False)
    e = (Experiment(run_dir=tmp_path / "chain", seed=3).model("tiny-llama", transformers_settings={"torch_dtype": "float32"})
         .vision(encoder="tiny-clip", projector="c_abs", n_modality_embeddings=4)
         .multimodal_dataset(str(folder / "train.jsonl"), template=TPL, max_tokens_count=64, only_answer_loss=True)
         .lora(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).trainer(**cfg["trainer_settings"]))
    assert e.settings().objective == "multimodal"
    e.fit(progress=False)
    for f in ("adapter_model.safetensors", "projections/modality_adapters.safetensors"):
        a, b = load_file(str(tmp_path / "json" / "final" / f)), load_file(str(tmp_path / "chain" / "final" / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
