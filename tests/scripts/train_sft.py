"""LoRA SFT of the zoo's tiny Llama on the zoo chat sample through alignlab.train; used by test_resume.py and test_accelerate.py.

python train_sft.py RUN_DIR [--steps N] [--save_steps K] [--resume] [--dropout P]
Writes RUN_DIR/progress (the last finished step, rewritten after every step) and the fit summary to RUN_DIR/train_summary.json (alignlab.train.fit does).
"""
import argparse, json, os, sys
from pathlib import Path

p = argparse.ArgumentParser()
p.add_argument("run_dir")
p.add_argument("--steps", type=int, default=40)
p.add_argument("--save_steps", type=int, default=5)
p.add_argument("--batch", type=int, default=4)
p.add_argument("--dropout", type=float, default=0.05)
p.add_argument("--resume", action="store_true")
p.add_argument("--n_train", type=int, default=200)
a = p.parse_args()

import torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from alignlab import zoo
from alignlab.datasets import build_dataset
from alignlab.models import load_model
from alignlab.run import make_trainer
from alignlab.train import fit

class Progress(TrainerCallback):
    "Tell the parent test which step has finished (a plain file, replaced atomically)."
    def on_step_end(self, args, state, control, **kw):
        if state.is_world_process_zero:
            tmp = Path(a.run_dir)/".progress.tmp"; tmp.write_text(str(state.global_step)); os.replace(tmp, Path(a.run_dir)/"progress")

def chat(split, n):
    src = {"name": f"chat-{split}", "records_path": str(zoo.get("chat")/f"{split}.jsonl"), "num_samples": n}
    return build_dataset({"sources": [src], "dataset_type": "chat", "max_tokens_count": 128}, tok)

torch.manual_seed(0)  # the LoRA init: the same in every run (a resumed run loads the checkpoint's weights anyway)
model, tok = load_model({"model_path": "tiny-llama", "transformers_settings": {"torch_dtype": "float32"}, "peft_settings": {"name": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": a.dropout,
                                                                       "target_modules": ["q_proj", "v_proj"]}})
settings = dict(max_steps=a.steps, per_device_train_batch_size=a.batch, per_device_eval_batch_size=16, gradient_accumulation_steps=1,
                learning_rate=2e-3, lr_scheduler_type="cosine", warmup_steps=3, save_steps=a.save_steps, save_total_limit=2,
                eval_steps=10, logging_steps=5, disable_tqdm=True, dataloader_num_workers=0)
Path(a.run_dir).mkdir(parents=True, exist_ok=True)
trainer = make_trainer("sft", model, tok, chat("train", a.n_train), chat("val", 16), settings, a.run_dir, callbacks=[Progress()], seed=0)
summary = fit(trainer, resume=a.resume)

print(f"RANK {trainer.args.process_index} of {trainer.args.world_size} done, steps {summary['steps']}", flush=True)
# a clean shutdown: a gloo group left to the interpreter's exit can abort a rank ("terminate called without an active
# exception", SIGABRT) after training finished (seen once, two suites at once on 2 cores)
if torch.distributed.is_available() and torch.distributed.is_initialized(): torch.distributed.destroy_process_group()
