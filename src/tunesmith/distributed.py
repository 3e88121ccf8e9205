"""Training on more than one process, on torch's own engines: DDP, FSDP2 and DeepSpeed ZeRO through the Trainer,
launched by torchrun. Nothing here is an engine of ours; this module checks the recipe against the device, starts
the process group with the recipe's timeout, hands each strategy's settings to the Trainer, verifies that the
strategy asked for is the one in effect, and turns a stuck collective into an error that names the rank and step.

Inside a launched run every process runs `train_run`; only rank 0 writes the run folder, prints and checks the
data, and the others receive the rows it formatted (`share`), so every rank trains on the same split.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from tunesmith.errors import RecipeError, RunError

STEP_KEY = "tunesmith/step/{rank}"  # each rank's last step, in the rendezvous store (read when a collective hangs)


# ----------------------------------------------------------------------------------------------- where we are


def rank() -> int:
    """This process's rank (0 outside a launched run)."""
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in this run (1 outside a launched run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched() -> bool:
    """Whether this process was started by torchrun (or another torch launcher): it is one rank of a run."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def is_main() -> bool:
    """Rank 0: the one process that writes the run folder and prints."""
    return rank() == 0


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def needs_launcher(d) -> bool:
    """Whether a run of the `distributed` section `d` must be started by torchrun (more than one process, or an
    engine that needs a process group even on one)."""
    return d.world_size > 1 or d.effective() in ("fsdp", "deepspeed")


# ----------------------------------------------------------------------------------------------- the device


def device_problems(d) -> list[str]:
    """What the `distributed` section asks that this machine can't run, in recipe wording."""
    strategy, out = d.effective(), []
    if strategy in ("none",):
        return out
    cuda = has_cuda()
    if strategy == "fsdp" and not cuda:
        out.append("`distributed.strategy`: fsdp needs GPUs — on a CPU the Trainer (accelerate) enables FSDP only "
                   "for GPU backends and would silently run DDP instead; use distributed.strategy=ddp here")
    if strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        out.append("`distributed.strategy`: deepspeed is not installed; `pip install deepspeed` (it builds its "
                   "CPU ops on first use), or use distributed.strategy=ddp")
    if strategy == "deepspeed" and not cuda and d.offload != "none":
        out.append(f"`distributed.offload`: {d.offload} on a CPU-only machine moves nothing (the weights are in CPU "
                   "memory already) and needs DeepSpeed's compiled CPU Adam; set distributed.offload=none")
    if cuda and d.nproc > device_count():
        out.append(f"`distributed.nproc`: {d.nproc} processes but this machine has {device_count()} GPU(s); "
                   f"one process per GPU: set distributed.nproc={device_count()}")
    return out


def device_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_device(d, source: str = "recipe") -> None:
    """Raise a RecipeError listing what the `distributed` section asks that this machine can't run."""
    problems = device_problems(d)
    if problems:
        raise RecipeError(source, problems)


def backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def worker_environment(d) -> dict[str, str]:
    """Environment each rank starts with: threads shared out over the cores, DeepSpeed's CPU accelerator."""
    env = {}
    if not has_cuda():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // d.nproc))
        if d.effective() == "deepspeed":
            env["DS_ACCELERATOR"] = "cpu"
    return env


# ----------------------------------------------------------------------------------------------- the process group


def start(d) -> None:
    """In a launched run: check the world matches the recipe and start the process group with its timeout (the
    Trainer then uses this group). Outside one, nothing; `strategy: ddp|fsdp|deepspeed` there is an error."""
    if not launched():
        if needs_launcher(d):
            raise RunError(f"`distributed.strategy` {d.effective()} over {d.world_size} process(es) needs a launcher",
                           f"run `tunesmith train RECIPE --nproc {d.nproc}` (it starts torchrun), or "
                           "`tunesmith launch RECIPE --print` for a cluster")
        return
    if world_size() != d.world_size:
        raise RunError(f"launched with {world_size()} process(es), but the recipe's distributed.nproc x nnodes = "
                       f"{d.nproc} x {d.nnodes} = {d.world_size}",
                       f"use `tunesmith train RECIPE --nproc N`, which keeps the two in step, or set "
                       f"distributed.nproc={world_size() // max(d.nnodes, 1)}")
    import torch
    import torch.distributed as dist

    if d.effective() == "deepspeed" and not has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if has_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend(), timeout=datetime.timedelta(seconds=d.timeout_s))


def share(value: Any = None) -> Any:
    """Rank 0's `value`, on every rank (rank 0 passes it; the others pass nothing). Outside a launched run: value."""
    if world_size() == 1:
        return value
    import torch.distributed as dist

    box = [value if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish() -> None:
    """Wait for every rank, then end the process group (quietly: at exit a live group warns)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- the Trainer


def trainer_arguments(d) -> dict[str, Any]:
    """TrainingArguments keywords for the recipe's strategy (none: nothing)."""
    strategy = d.effective()
    if strategy == "none":
        return {}
    # every trainable weight takes part in each step's loss (adapters, heads): no search for unused ones
    args: dict[str, Any] = {"ddp_backend": backend(), "ddp_timeout": d.timeout_s, "ddp_find_unused_parameters": False}
    if strategy == "fsdp":
        options = ["full_shard", "auto_wrap"] + (["offload"] if d.offload == "parameters" else [])
        config: dict[str, Any] = {"fsdp_version": 2, "reshard_after_forward": d.fsdp.reshard_after_forward,
                                  "state_dict_type": "FULL_STATE_DICT" if d.fsdp.state_dict_type == "full"
                                  else "SHARDED_STATE_DICT"}
        if d.fsdp.auto_wrap:
            config["transformer_layer_cls_to_wrap"] = [d.fsdp.auto_wrap]
        args.update(fsdp=" ".join(options), fsdp_config=config)
    elif strategy == "deepspeed":
        args["deepspeed"] = deepspeed_config(d)
    return args


def deepspeed_config(d) -> dict[str, Any]:
    """A DeepSpeed config for ZeRO stage `d.zero_stage`; "auto" values are filled from the Trainer's arguments."""
    zero: dict[str, Any] = {"stage": d.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    if d.offload in ("optimizer", "parameters"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": has_cuda()}
    if d.offload == "parameters":
        zero["offload_param"] = {"device": "cpu", "pin_memory": has_cuda()}
    if d.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}


EXPECTED = {"none": ("NO",), "ddp": ("MULTI_CPU", "MULTI_GPU"), "fsdp": ("FSDP",), "deepspeed": ("DEEPSPEED",)}


@dataclass
class InEffect:
    """What the Trainer actually runs: its accelerate distributed type, processes, and batch sizes."""

    kind: str
    world: int
    per_device: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_device * self.world * self.accumulation


def in_effect(trainer) -> InEffect:
    args = trainer.args
    kind = getattr(trainer.accelerator.distributed_type, "name", str(trainer.accelerator.distributed_type))
    return InEffect(kind, args.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps)


def check_strategy(trainer, d, echo: Callable[[str], None]) -> None:
    """Verify that the Trainer runs the strategy and world size the recipe asked for (a mismatch is an error, not a
    warning: accelerate turns fsdp into DDP on a CPU, and `accelerate launch --cpu` starts one process), and print
    it. One process without a strategy prints nothing."""
    strategy = d.effective()
    got = in_effect(trainer)
    if got.kind not in EXPECTED[strategy] or got.world != d.world_size:
        raise RunError(f"asked for {strategy} over {d.world_size} process(es), but the Trainer runs "
                       f"{got.kind} over {got.world}",
                       "launch with `tunesmith train RECIPE --nproc N` (torchrun); fsdp needs GPUs")
    if strategy == "none":
        return
    detail = f"ZeRO-{d.zero_stage}" if strategy == "deepspeed" else strategy
    offload = f", offload {d.offload}" if d.offload != "none" else ""
    echo(f"distributed: {detail}{offload} over {got.world} processes ({d.nnodes} machine(s), {backend()}) · "
         f"batch {got.per_device} per device x {got.world} x accumulation {got.accumulation} = "
         f"{got.global_batch} rows per optimizer step · collective timeout {d.timeout_s} s")


def wrapped_callback(trainer, d):
    """A Trainer callback that stops at the first step unless the model is wrapped as the strategy says (DDP's
    gradient all-reduce in place): a run whose ranks do not share gradients must not pass for a distributed one."""
    from transformers import TrainerCallback

    class _Wrapped(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            name = type(trainer.model_wrapped).__name__
            if d.effective() == "ddp" and name != "DistributedDataParallel":
                raise RunError(f"ddp over {world_size()} processes, but the model the Trainer trains is a plain "
                               f"{name}: the ranks would not share gradients",
                               "report this with the versions `pip show transformers accelerate` prints; "
                               "train with --nproc 1 meanwhile")

    return _Wrapped()


def heartbeat_callback():
    """A Trainer callback writing this rank's step into the rendezvous store at each step's start, so that the rank
    that times out can say where the others were."""
    from transformers import TrainerCallback

    class _Heartbeat(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            store = _store()
            if store is not None:
                store.set(STEP_KEY.format(rank=rank()), str(state.global_step + 1))

    return _Heartbeat()


def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError, ImportError):
        return None


def _where_ranks_are() -> str:
    """`rank 0 at step 3, rank 1 at step 2` from the store (best effort: a dead store gives an empty string)."""
    store = _store()
    if store is None:
        return ""
    parts = []
    try:
        store.set_timeout(datetime.timedelta(seconds=2))
        for r in range(world_size()):
            key = STEP_KEY.format(rank=r)
            parts.append(f"rank {r} at step {store.get(key).decode()}" if store.check([key])
                         else f"rank {r} before its first step")
    except (RuntimeError, ValueError):
        return ", ".join(parts)
    return ", ".join(parts)


def _timed_out(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def _peer_gone(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "connection closed by peer" in text or "connection reset by peer" in text or "broken pipe" in text


@contextlib.contextmanager
def collectives_watched(trainer, d) -> Iterator[None]:
    """Turn a collective that did not complete within `distributed.timeout_s` into a RunError naming this rank, the
    step and where the other ranks were. torchrun then stops every rank; checkpoints already written are kept."""
    if world_size() == 1:
        yield
        return
    try:
        yield
    except RuntimeError as exc:  # torch.distributed.DistBackendError is a RuntimeError
        step = trainer.state.global_step + 1
        if _peer_gone(exc):
            raise RunError(f"rank {rank()}: stopped at step {step} because another rank stopped (its connection "
                           "closed)", "that rank's own error is printed above, or torchrun names its exit code; "
                           "resume with --resume from the last checkpoint") from exc
        if not _timed_out(exc):
            raise
        where = _where_ranks_are()
        raise RunError(f"rank {rank()}: a collective did not complete within {d.timeout_s} s at step {step}"
                       + (f" ({where})" if where else "") + "; another rank is stuck or died",
                       "the rank behind the others is the one to look at (its own error is printed above, if "
                       "any); resume with --resume from the last checkpoint, or raise distributed.timeout_s "
                       "for steps that are slow on purpose") from exc


@contextlib.contextmanager
def gathered(model) -> Iterator[None]:
    """Every rank enters this together: under DeepSpeed ZeRO-3 the weights are gathered whole while inside (to save
    them); otherwise nothing happens."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
