"""The run folder: a self-describing directory every later stage reads without the recipe or the trainer.

    recipe.yaml        resolved recipe            manifest.json    versions, data hashes, counts, seed, git, timings
    adapter/ | model/  peft / transformers format tokenizer/       with its chat template
    generation_config.json                        metrics.jsonl    one JSON object per logged step / evaluation
    tensorboard/       event files                checkpoints/     checkpoint-N folders for --resume
    rejects.jsonl      every unused input row with file, line and reason
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

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
        """The manifest, or a RunError saying the folder is not a finished run (or the manifest is damaged)."""
        if not self.manifest.exists():
            raise RunError(f"{self.root}: not a finished tunesmith run (no manifest.json)",
                           "give the folder `tunesmith train` wrote (output.dir), after it finished")
        try:
            manifest = json.loads(self.manifest.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RunError(f"{self.manifest}: damaged, not readable JSON ({exc})",
                           "the run folder is damaged (cut short?); train the run again") from None
        if not isinstance(manifest, dict) or "method" not in manifest:
            raise RunError(f"{self.manifest}: not a tunesmith manifest (no `method`)",
                           "the run folder is damaged; train the run again")
        return manifest

    def read_recipe(self) -> dict[str, Any]:
        """The run's resolved recipe as a dict; a RunError naming the file when it is damaged."""
        try:
            recipe = yaml.safe_load(self.recipe.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunError(f"{self.recipe}: missing", "the run folder is damaged; train the run again") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise RunError(f"{self.recipe}: damaged ({str(exc).splitlines()[0]})",
                           "the run folder is damaged; train the run again") from None
        if not isinstance(recipe, dict):
            raise RunError(f"{self.recipe}: not a recipe", "the run folder is damaged; train the run again")
        return recipe

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint-N folder (the Trainer writes trainer_state.json last), or None."""
        found = sorted((p for p in self.checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
                       key=lambda p: int(p.name.split("-")[-1]))
        complete = [p for p in found if _complete_checkpoint(p)]
        return complete[-1] if complete else None

    def check_complete(self, manifest: dict[str, Any]) -> None:
        """Raise a RunError naming the first file a finished run should have and lacks: the folder it saved
        (adapter/ with its config and weights, model/ with config.json and weights) and tokenizer/."""
        saved = manifest.get("saved")
        if saved not in ("adapter", "model"):
            return
        folder = self.root / saved
        config = folder / ("config.json" if saved == "model" else "adapter_config.json")
        if saved == "adapter" and (folder / "bottleneck_config.json").is_file():  # our own bottleneck adapters
            config = folder / "bottleneck_config.json"
        weights = [p for pattern in ("*.safetensors", "*.bin") for p in folder.glob(pattern)]
        for path, ok in ((config, config.is_file()), (folder / "*.safetensors", bool(weights)),
                         (self.tokenizer / "tokenizer_config.json", (self.tokenizer / "tokenizer_config.json").is_file())):
            if not ok:
                raise RunError(f"{path}: missing from the run folder",
                               "the run folder is damaged or was copied in part; train the run again")


def _complete_checkpoint(path: Path) -> bool:
    """A checkpoint whose trainer_state.json (written last) is there and parses."""
    try:
        json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        return True
    except (OSError, ValueError):
        return False


def open_run(path: str | Path) -> RunDir:
    """A finished run folder, checked: its manifest reads, and what it saved (weights, tokenizer) is there."""
    run = RunDir(expand_user(path, "run folder"))
    if not run.root.is_dir():
        raise RunError(f"{run.root}: no such run folder", "give the output.dir of a `tunesmith train` run")
    run.check_complete(run.read_manifest())
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

    info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "argv": mask_secrets(sys.argv)}
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


SECRET_WORDS = {"token", "password", "passwd", "pwd", "passphrase", "secret", "secrets", "apikey", "auth",
                "authorization", "credential", "credentials", "cookie"}
NOT_SECRET_TOKENS = {"pad", "eos", "bos", "unk", "sep", "cls", "mask", "special", "start", "end", "stop"}  # x_token
SECRET_SHAPES = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|"
                           r"github_pat_\w{20,}|xox[abprs]-[\w-]{10,}|AKIA[0-9A-Z]{16})")
NAME_VALUE = re.compile(r"(?P<name>[\w.-]+)(?P<sep>\s*=\s*|:\s+)(?P<value>(?:Bearer\s+|Basic\s+)?[^\s&;,]+)")


def is_secret_name(name: str) -> bool:
    """True for option, key or header names that hold secrets: `--token`, `--api-key`, `HF_TOKEN`, `model.key`,
    `Authorization`, … (not `--max-new-tokens`, `--tokenizer` or `pad_token`)."""
    words = [w for w in re.split(r"[-_.\s]+", name.lower()) if w]
    if not words:
        return False
    if words[-1] == "token" and len(words) > 1 and words[-2] in NOT_SECRET_TOKENS:
        return False
    return bool(SECRET_WORDS & set(words)) or words[-1] == "key"


def mask_secrets(argv: list[str]) -> list[str]:
    """The command line with the values of secret-looking options, KEY=VALUE overrides, headers, URL passwords
    and well-known token shapes replaced by `***`."""
    out, mask_next = [], False
    for arg in argv:
        if mask_next and not arg.startswith("--"):
            out.append("***")
            mask_next = False
            continue
        mask_next = arg.startswith("-") and "=" not in arg and is_secret_name(arg)
        text = NAME_VALUE.sub(lambda m: f"{m['name']}{m['sep']}***" if is_secret_name(m["name"]) else m[0], arg)
        text = re.sub(r"(?i)\b(Bearer|Basic)\s+[^\s*][^\s]*", r"\1 ***", text)
        text = re.sub(r"(\w+://[^/\s:@]+:)[^/\s@]+@", r"\1***@", text)  # https://user:PASSWORD@host
        out.append(SECRET_SHAPES.sub("***", text))
    return out


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (write a temp file, then rename)."""
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# ----------------------------------------------------------------------------------------------- safe writing


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; rename it into place on success, remove it on failure.

    For writers that want a file name (pyarrow, sqlite, csv): `with atomic_path(out) as tmp: table.write(tmp)`.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; the file gets the mode a plain open() gives
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes to `path` through a temporary that is renamed into place."""
    with atomic_path(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")


@contextlib.contextmanager
def staged_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `target`; on success move it into place (`place_dir`), on failure
    remove it. Callers check first that an existing `target` is theirs to replace."""
    staging = new_staging(target)
    try:
        yield staging
        place_dir(staging, target, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def new_staging(target: str | Path) -> Path:
    """A new empty folder beside `target` (same file system, so it can be renamed into place)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return _staging_dir(f".{target.name}.", target.parent)


def _staging_dir(prefix: str, parent: Path) -> Path:
    """A new hidden folder in `parent`, with the mode mkdir would give it (mkdtemp makes it private)."""
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".staging", dir=parent))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def place_dir(staging: Path, target: Path, replace: bool = False) -> None:
    """Rename the finished `staging` folder to `target`. An existing empty `target` is replaced; a non-empty one
    only with `replace` (swapped out first, removed after the new folder is in place)."""
    target = Path(target)
    if target.exists() and (replace or (target.is_dir() and not any(target.iterdir()))):
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)


@contextlib.contextmanager
def staged_files(folder: str | Path, protect: list[str | Path] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder for writers that write one or more files (report + page, rows + rejects);
    on success each file in it moves into `folder` (made if missing), replacing a file of the same name; on
    failure nothing lands and the temporary folder is removed. A file that would land on (or over a folder, or on
    one of `protect`, the command's inputs) is refused before any moves, with a TunesmithError naming both."""
    from tunesmith.errors import TunesmithError

    folder = Path(folder)
    home = folder if folder.is_dir() else folder.parent  # stage on the same file system, so moves are renames
    staging = _staging_dir(".tunesmith-", home)
    try:
        yield staging
        if not folder.is_dir():
            os.replace(staging, folder)
            return
        for item in staging.iterdir():
            target = folder / item.name
            hit = next((p for p in protect if p is not None and related(target, p)), None)
            if hit is not None or target.is_dir():
                raise TunesmithError(f"{target}: writing it would replace " + (f"the input {hit}" if hit is not None
                                                                                 else "a folder"),
                                     "write the output somewhere else")
        for item in staging.iterdir():
            os.replace(item, folder / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def related(a: str | Path, b: str | Path) -> bool:
    """True when `a` and `b` are the same path or one lies inside the other (after resolving links)."""
    a, b = Path(a).expanduser().resolve(), Path(b).expanduser().resolve()
    return a == b or a in b.parents or b in a.parents


def check_output(path: str | Path, option: str, inputs: list[str | Path] = (), folder: bool = False) -> Path:
    """Check an output path before anything is computed: its parent exists, it is not the wrong kind of thing,
    and it is not (nor contains, nor lies inside) one of `inputs`. Returns it, `~` expanded."""
    from tunesmith.errors import TunesmithError

    path = expand_user(path, option)
    for item in inputs:
        if item is not None and related(path, item):
            raise TunesmithError(f"{option} {path}: the output would be (or contain, or lie inside) the input {item}",
                                 "write the output somewhere else")
    if not path.parent.is_dir():
        raise TunesmithError(f"{option} {path}: the folder {path.parent} does not exist",
                             "create it first, or give a path in an existing folder")
    if not folder and path.is_dir():
        raise TunesmithError(f"{option} {path}: is a folder; give a file name", f"e.g. {option} {path / 'out.jsonl'}")
    if folder and path.exists() and not path.is_dir():
        raise TunesmithError(f"{option} {path}: is a file; give a folder", "choose a new folder name")
    return path


def expand_user(path: str | Path, option: str) -> Path:
    """`~` and `~user` expanded; an unknown user is a TunesmithError naming the option."""
    from tunesmith.errors import TunesmithError

    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise TunesmithError(f"{option} {path}: can't expand {str(path).split('/')[0]!r} (no such user)",
                             "give the path without ~, or with ~/ for your own home folder") from None


def is_run_folder(path: str | Path) -> bool:
    """True when `path` is a folder tunesmith made: a run (manifest.json or recipe.yaml saying so)."""
    path = Path(path)
    manifest = path / "manifest.json"
    try:
        if manifest.is_file() and "tunesmith_run" in json.loads(manifest.read_text(encoding="utf-8")):
            return True
    except (OSError, ValueError):
        pass
    return (path / RUN_MARKER).is_file()


RUN_MARKER = ".tunesmith-run"  # written first into every run folder tunesmith builds


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl file. A torn last line (a run killed mid-write) is left out; a damaged line
    before it is a RunError naming the file and line."""
    if not path.exists():
        return []
    lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
             if line.strip()]
    rows = []
    for i, (number, line) in enumerate(lines):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1:
                break
            raise RunError(f"{path}, line {number}: damaged (not a JSON object)",
                           "remove that line, or train the run again") from None
        rows.append(row)
    return rows


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metrics logged after `last_step` (a resumed run re-does those steps), and a torn last line."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))
