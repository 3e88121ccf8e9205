"""The run folder: a self-describing directory every later stage reads without the recipe or the trainer.

    recipe.yaml        resolved recipe            manifest.json    versions, data hashes, counts, seed, git, timings
    adapter/ | model/  peft / transformers format tokenizer/       with its chat template
    generation_config.json                        metrics.jsonl    one JSON object per logged step / evaluation
    tensorboard/       event files                checkpoints/     checkpoint-N folders for --resume
    rejects.jsonl      every unused input row with file, line and reason
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tunesmith.errors import RunError

PACKAGES = ("tunesmith", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "gguf", "tokenizers")


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run folder."""

    root: Path

    recipe = property(lambda self: self.root / "recipe.yaml")
    manifest = property(lambda self: self.root / "manifest.json")
    adapter = property(lambda self: self.root / "adapter")
    model = property(lambda self: self.root / "model")
    tokenizer = property(lambda self: self.root / "tokenizer")
    generation_config = property(lambda self: self.root / "generation_config.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    rejects = property(lambda self: self.root / "rejects.jsonl")

    def read_manifest(self) -> dict[str, Any]:
        """The manifest, or a RunError saying the folder is not a finished run."""
        if not self.manifest.exists():
            raise RunError(f"{self.root}: not a finished tunesmith run (no manifest.json)",
                           "give the folder `tunesmith train` wrote (output.dir), after it finished")
        return json.loads(self.manifest.read_text())

    def read_recipe(self) -> dict[str, Any]:
        return yaml.safe_load(self.recipe.read_text())

    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint-N folder, or None."""
        found = sorted(self.checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return found[-1] if found else None


def open_run(path: str | Path) -> RunDir:
    """A finished run folder, checked."""
    run = RunDir(Path(path))
    if not run.root.is_dir():
        raise RunError(f"{run.root}: no such run folder", "give the output.dir of a `tunesmith train` run")
    run.read_manifest()
    return run


def versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_sha(cwd: Path | None = None) -> str | None:
    """The git commit of the working directory (with -dirty when it has changes), or None."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return sha.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict[str, Any]:
    """A short description of the hardware the run used."""
    import os

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "argv": sys.argv}
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (write a temp file, then rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl file."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics logged after `last_step` (a resumed run re-does those steps)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
