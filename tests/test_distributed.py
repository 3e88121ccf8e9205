"""Training on two processes with gloo on this CPU, through torch's own engines: DDP (and DeepSpeed ZeRO-2/3 where
it is installed) reach the losses and weights of one process with the same global batch; only rank 0 writes; a
killed run resumes; a stuck rank stops every rank at the timeout with the rank and step named; a cluster's commands
are printed. Each two-process run is a real `torchrun` of `python -m tunesmith train` (or tests/rank_worker.py when
a fault is planted)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import write_jsonl
from tunesmith.artifacts import read_metrics
from tunesmith.recipe import load_recipe
from tunesmith.train import train_run

WORKER = Path(__file__).with_name("rank_worker.py")
CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"{i} plus {i} is {2 * i}{'!' * (i % 3)}"}]}
         for i in range(40)]
WORDS = ["apple", "river", "stone", "cloud", "music", "garden", "window", "engine", "paper", "forest"]
LABELLED = [{"text": f"the {w} {'was wonderful' if i % 2 == 0 else 'felt terrible'} on day {j}",
             "label": "pos" if i % 2 == 0 else "neg"} for j, (i, w) in enumerate(list(enumerate(WORDS)) * 4)]
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def write_recipe(folder: Path, model_dir: Path, method: dict, rows: list, check: bool = True, **train) -> Path:
    """A recipe (fp32, 4 rows per device) in `folder`, training on `rows` (`check`: the data check before)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "train.jsonl", rows)
    recipe = {"model": {"name": str(model_dir)},
              "data": {"train": "train.jsonl", "validation_fraction": 0.2, "check": {"enabled": check}},
              "method": method,
              "train": {"batch_size": 4, "max_steps": 4, "log_every": 1, "precision": "fp32", "max_seq_len": 64,
                        "learning_rate": 0.01, "seed": 3, **train},
              "eval": {"loss_rows": 8}, "output": {"dir": "run"}}
    path = folder / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def tunesmith(folder: Path, *args: str, plant: str | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    """`tunesmith ARGS` in `folder` as a user runs it (or, with `plant`, two torchrun ranks of rank_worker.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if plant is None:
        command = [sys.executable, "-m", "tunesmith", *args]
    else:
        env["PLANT"] = plant
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                   str(WORKER), *args]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


def adapter_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def one_process(folder: Path, **overrides) -> Path:
    """The same recipe on one process with the global batch (8), trained in this process."""
    settings = {"train.batch_size": 8, "output.dir": folder / "one", **overrides}
    recipe = load_recipe(folder / "r.yaml", [f"{k}={v}" for k, v in settings.items()])
    train_run(recipe, echo=lambda text: None)
    return folder / "one"


def assert_same_training(one: Path, two: Path, weights: bool = True) -> None:
    a, b = step_losses(one), step_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    if weights:
        wa, wb = adapter_weights(one), adapter_weights(two)
        assert wa.keys() == wb.keys()
        assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4  # 4 Adam steps of lr 0.01: ~4e-2


# ----------------------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("ddp-sft")
    write_recipe(folder, tiny_model_dir, {"name": "sft", "adapter": "lora", "lora": {"dropout": 0.0}}, CHATS,
                 save_every=2)
    return folder


@pytest.fixture(scope="module")
def sft_two(sft_folder) -> subprocess.CompletedProcess:
    """`tunesmith train r.yaml --nproc 2`: 2 ranks x 4 rows."""
    return tunesmith(sft_folder, "train", "r.yaml", "--nproc", "2")


def test_ddp_sft_matches_one_process_with_the_global_batch(sft_folder, sft_two):
    assert sft_two.returncode == 0, sft_two.stderr[-3000:]
    one = one_process(sft_folder)
    assert_same_training(one, sft_folder / "run")
    out = sft_two.stdout
    assert "distributed: ddp over 2 processes (1 machine(s), gloo) · batch 4 per device x 2 x accumulation 1 = 8 " \
           "rows per optimizer step" in out
    # rank 0 alone prints and writes: one summary, each step logged once, the manifest says what ran
    assert out.count("\nsummary\n") == 1 and out.count("data check:") == 1
    assert [r["step"] for r in read_metrics(sft_folder / "run" / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    manifest = json.loads((sft_folder / "run" / "manifest.json").read_text())
    assert manifest["training"]["steps"] == 4
    assert yaml.safe_load((sft_folder / "run" / "recipe.yaml").read_text())["distributed"]["nproc"] == 2
    assert "Traceback" not in sft_two.stderr


def test_a_killed_ddp_run_resumes_to_the_same_weights(sft_folder, sft_two, tmp_path):
    assert sft_two.returncode == 0
    killed = tunesmith(sft_folder, "train", "r.yaml", "output.dir=killed", "distributed.nproc=2",
                       plant="crash:1:3")
    assert killed.returncode != 0
    checkpoints = sorted(p.name for p in (sft_folder / "killed" / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["checkpoint-2"]
    resumed = tunesmith(sft_folder, "train", "r.yaml", "output.dir=killed", "--resume", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_training(sft_folder / "run", sft_folder / "killed")
    # another world size: the DDP checkpoint resumes on one process (4 rows per step from then on)
    crashed = tunesmith(sft_folder, "train", "r.yaml", "output.dir=other", "distributed.nproc=2", plant="crash:0:3")
    assert crashed.returncode != 0
    alone = tunesmith(sft_folder, "train", "r.yaml", "output.dir=other", "--resume")
    assert alone.returncode == 0, alone.stderr[-3000:]
    steps = step_losses(sft_folder / "other")
    assert sorted(steps) == [1, 2, 3, 4] and steps[2] == pytest.approx(step_losses(sft_folder / "run")[2], rel=1e-5)


def test_a_stuck_rank_stops_every_rank_at_the_timeout(sft_folder):
    started = time.time()
    stuck = tunesmith(sft_folder, "train", "r.yaml", "output.dir=stuck", "distributed.nproc=2",
                      "distributed.timeout_s=10", "train.save_every=1", plant="stall:1:2", timeout=180)
    assert stuck.returncode != 0
    assert time.time() - started < 120  # 10 s of waiting, not the 30-minute default of torch
    assert "error: rank 0: a collective did not complete within 10 s at step 2 (rank 0 at step 2, rank 1 at " \
           "step 2)" in stuck.stderr
    last = sft_folder / "stuck" / "checkpoints" / "checkpoint-1"
    assert json.loads((last / "trainer_state.json").read_text())["global_step"] == 1
    from safetensors.torch import load_file

    assert len(load_file(str(last / "adapter_model.safetensors"))) == 28  # 2 layers x 7 projections x (A, B)


def test_classify_ddp_matches_one_process(tmp_path, tiny_model_dir):
    folder = tmp_path / "classify"
    write_recipe(folder, tiny_model_dir, {"name": "classify", "adapter": "lora", "lora": {"dropout": 0.0}},
                 LABELLED, check=False, learning_rate=0.001)  # the rows are near-duplicates on purpose
    two = tunesmith(folder, "train", "r.yaml", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_training(one_process(folder), folder / "run")
    labels = json.loads((folder / "run" / "labels.json").read_text())
    assert labels["labels"] == ["neg", "pos"]


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (pip install deepspeed)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_one_process(sft_folder, stage):
    out = f"zero{stage}"
    two = tunesmith(sft_folder, "train", "r.yaml", f"output.dir={out}", "distributed.strategy=deepspeed",
                    f"distributed.zero_stage={stage}", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-3000:]
    assert f"distributed: ZeRO-{stage} over 2 processes" in two.stdout
    one = sft_folder / "one" if (sft_folder / "one").exists() else one_process(sft_folder)
    assert_same_training(one, sft_folder / out)  # ZeRO-3's saved adapter is gathered whole, not one rank's shard


# ----------------------------------------------------------------------------------------------- cluster


def test_launch_prints_one_command_per_machine(tmp_path, tiny_model_dir, capsys):
    from tunesmith.cli import main

    write_recipe(tmp_path, tiny_model_dir, {"name": "sft"}, CHATS)
    code = main(["launch", str(tmp_path / "r.yaml"), "train.epochs=2", "--print", "--nnodes", "3", "--nproc", "8",
                 "--master", "10.0.0.1:29400"])
    out = capsys.readouterr().out
    assert code == 0
    commands = [line for line in out.splitlines() if line.startswith("torchrun")]
    assert len(commands) == 3
    for node, line in enumerate(commands):
        assert line == (f"torchrun --nnodes 3 --nproc_per_node 8 --node_rank {node} --master_addr 10.0.0.1 "
                        f"--master_port 29400 -m tunesmith train {tmp_path / 'r.yaml'} train.epochs=2 "
                        "distributed.nproc=8 distributed.nnodes=3")
    assert "3 machine(s) x 8 process(es) = 24 ranks, strategy ddp" in out


def test_strategy_in_effect_is_checked(tmp_path):
    """accelerate on a CPU runs FSDP as DDP, and one process as none: asked and run must agree."""
    from types import SimpleNamespace

    from tunesmith import distributed
    from tunesmith.errors import RunError
    from tunesmith.recipe import DistributedSection

    def trainer(kind: str, world: int):
        return SimpleNamespace(accelerator=SimpleNamespace(distributed_type=SimpleNamespace(name=kind)),
                               args=SimpleNamespace(world_size=world, per_device_train_batch_size=4,
                                                    gradient_accumulation_steps=2))

    lines = []
    distributed.check_strategy(trainer("MULTI_CPU", 2), DistributedSection(nproc=2), lines.append)
    assert "batch 4 per device x 2 x accumulation 2 = 16 rows per optimizer step" in lines[0]
    with pytest.raises(RunError, match="asked for fsdp over 2 process\\(es\\), but the Trainer runs MULTI_CPU over 2"):
        distributed.check_strategy(trainer("MULTI_CPU", 2), DistributedSection(strategy="fsdp", nproc=2), print)
    with pytest.raises(RunError, match="asked for ddp over 2 process\\(es\\), but the Trainer runs NO over 1"):
        distributed.check_strategy(trainer("NO", 1), DistributedSection(nproc=2), print)
