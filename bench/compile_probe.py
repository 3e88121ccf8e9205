"""torch.compile of a LoRA SFT step on this CPU: the first (compiling) step and later steps, against the same
step uncompiled in the same process (BENCHMARKS.md, "Training speed (issue 23)").

    .venv/bin/python bench/compile_probe.py bf16|fp32
"""
import time, torch, sys
from peft import LoraConfig, get_peft_model
from tunesmith.methods.adapters import load_base_for
from tunesmith.model import ModelSource, default_model_dir
from tunesmith.methods.common import trained_token_loss
dt = sys.argv[1]
m = load_base_for("lora", None, ModelSource(default_model_dir()))
m.config.use_cache=False
m = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear"))
m.train()
ids = torch.randint(0, 40000, (8, 150)); labels = ids.clone(); labels[:, :90] = -100
def step(model):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt=="bf16"):
        loss, *_ = trained_token_loss(model, {"input_ids": ids, "labels": labels})
    loss.backward()
for name, model in (("eager", m), ("compiled", torch.compile(m))):
    t=time.perf_counter(); step(model); first=time.perf_counter()-t
    ts=[]
    for _ in range(3):
        t=time.perf_counter(); step(model); ts.append(time.perf_counter()-t)
    print(name, dt, f"first {first:.1f}s, then {min(ts):.2f}s/step", flush=True)
