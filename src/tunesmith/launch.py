"""Starting a run on several processes or machines with torch's own launcher: torchrun's elastic agent on this
machine (`tunesmith train RECIPE --nproc N`), or one `torchrun` command per machine of a cluster
(`tunesmith launch RECIPE --print --nnodes K`). Each process then runs `tunesmith train` as one rank."""

from __future__ import annotations

import logging
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Callable

from tunesmith import distributed
from tunesmith.errors import TunesmithError

DEFAULT_PORT = 29500


def worker_arguments(recipe_path: str | Path, overrides: list[str], resume: bool, force: bool) -> list[str]:
    """`tunesmith train` as each rank runs it (the recipe's path as given: every rank starts in this folder)."""
    return ["train", str(recipe_path), *overrides] + (["--resume"] if resume else []) + (["--force"] if force else [])


def run_here(d, arguments: list[str], echo: Callable[[str], None] = print, nnodes: int = 1, node_rank: int = 0,
             master: str | None = None) -> int:
    """Run `d.nproc` ranks of `tunesmith ARGUMENTS` on this machine under torchrun's elastic agent; return the exit
    code of the first rank that failed (0 when all finished). One machine: a private rendezvous on localhost; a
    cluster: the static rendezvous at `master` (HOST:PORT, node 0's address), this machine being `node_rank`."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the ranks say what went wrong
    os.environ.update(distributed.worker_environment(d))
    if nnodes == 1:
        rendezvous = {"rdzv_backend": "c10d", "rdzv_endpoint": "localhost:0", "run_id": uuid.uuid4().hex}
    else:
        rendezvous = {"rdzv_backend": "static", "rdzv_endpoint": master or "", "run_id": "tunesmith",
                      "rdzv_configs": {"rank": node_rank}}
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=d.nproc, max_restarts=0,
                          start_method="spawn", monitor_interval=0.5, **rendezvous)
    echo(f"launching {d.nproc} process(es) on this machine (torchrun, {distributed.backend()}"
         + (f", node {node_rank} of {nnodes}, rendezvous {master}" if nnodes > 1 else "") + ")")
    try:
        elastic_launch(config, sys.executable)("-m", "tunesmith", *arguments)
    except ChildFailedError as exc:
        codes = [f.exitcode for _, f in sorted(exc.failures.items()) if f.exitcode]
        return next((c for c in codes if c > 0), 1)
    return 0


def cluster_commands(d, recipe_path: str | Path, overrides: list[str], master: str, run_dir: str,
                     resume: bool = False) -> str:
    """One `torchrun` command per machine (node 0 first; `master` is node 0's HOST:PORT), with the environment
    each needs, ready to paste; `run_dir`: the run folder every machine must see."""
    host, port = split_master(master)
    env = distributed.worker_environment(d) if not distributed.has_cuda() else {}
    env.pop("OMP_NUM_THREADS", None)  # each machine shares out its own cores: set it there if needed
    prefix = "".join(f"{k}={v} " for k, v in env.items())
    sizes = [f"distributed.nproc={d.nproc}", f"distributed.nnodes={d.nnodes}"]
    train = worker_arguments(recipe_path, [*overrides, *sizes], resume, False)
    lines = [f"# {d.nnodes} machine(s) x {d.nproc} process(es) = {d.world_size} ranks, strategy "
             f"{d.effective()}; run each command on its machine, node 0 on {host}.",
             "# Every machine needs the same tunesmith, model and recipe paths, and the run folder "
             f"{run_dir} on storage they all see."]
    for node in range(d.nnodes):
        lines.append(f"# node {node}")
        lines.append(prefix + " ".join(shlex.quote(a) for a in [
            "torchrun", "--nnodes", str(d.nnodes), "--nproc_per_node", str(d.nproc), "--node_rank", str(node),
            "--master_addr", host, "--master_port", str(port), "-m", "tunesmith", *train]))
    return "\n".join(lines)


def split_master(master: str) -> tuple[str, int]:
    """HOST[:PORT] -> (host, port); a bad value is a TunesmithError naming --master."""
    host, _, port = master.rpartition(":") if ":" in master else (master, "", str(DEFAULT_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TunesmithError(f"--master {master!r}: not HOST or HOST:PORT (port 1-65535)",
                             f"give node 0's address, e.g. --master 10.0.0.1:{DEFAULT_PORT}")
    return host, int(port)
