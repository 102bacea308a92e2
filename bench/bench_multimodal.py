"""Multimodal speed (issue 16): preprocessing images/s vs the bare CLIP forward on the same batches, and training steps/s with
pre-encoded features (reader pickle + is_pickle) vs images read live. Usage: python bench/bench_multimodal.py [n_images] [pre]"""
import json, sys, tempfile, time
from pathlib import Path
import torch

torch.set_num_threads(1)
from alignlab.sample_data import build_multimodal
from alignlab.images import ClipReader
from alignlab.vision import CLIPImageEncoder
from alignlab.preprocess import preprocess_images, list_images

n = int(sys.argv[1]) if len(sys.argv) > 1 else 240
d = Path(tempfile.mkdtemp()); build_multimodal(d, n_images=n, seed=11)
imgs, bs = list_images(d / "images"), 64
reader, enc = ClipReader("tiny-clip"), CLIPImageEncoder("tiny-clip")
def best(f, k=2):
    ts = []
    for _ in range(k): t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)
pix = [reader.read(imgs[i:i + bs]) for i in range(0, len(imgs), bs)]
bare_fwd = best(lambda: [enc(x) for x in pix])
bare_read_fwd = best(lambda: [enc(reader.read(imgs[i:i + bs])) for i in range(0, len(imgs), bs)])
cfg = {"modality": "image", "reader_settings": {"reader_type": "clip", "reader_path": "tiny-clip"},
       "encoder_settings": {"modality_encoder_type": "clip", "encoder_path": "tiny-clip"}, "dataset_path": str(d / "images"),
       "batch_size": bs, "output_file_path": str(d / "images")}
pre = best(lambda: preprocess_images(cfg, log=lambda *a: None, reader=reader, encoder=enc))
pre_load = best(lambda: preprocess_images(cfg, log=lambda *a: None), k=1)
print(json.dumps(dict(images=len(imgs), batch=bs, bare_forward_s=bare_fwd, bare_read_forward_s=bare_read_fwd, preprocess_s=pre, preprocess_with_loading_s=pre_load,
                      images_per_s=len(imgs) / pre, ratio_vs_read_forward=pre / bare_read_fwd, ratio_vs_forward=pre / bare_fwd)))

if "pre" in sys.argv[2:]: sys.exit()  # preprocessing only
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_multimodal import experiment
from alignlab.run import train
out = {}
for pickle in (False, True):
    for rep in range(1):
        s = train(experiment(d / f"run{pickle}{rep}", d, "llava", 16, 20, 1e-3, pickle=pickle, bs=8), progress=False)
        out.setdefault(pickle, []).append(20 / s["train_seconds"])
print(json.dumps({"live_steps_per_s": max(out[False]), "pickle_steps_per_s": max(out[True])}))
