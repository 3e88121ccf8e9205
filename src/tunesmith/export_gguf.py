"""`tunesmith export --format gguf|ollama`: the run's merged weights as one GGUF file (llama.cpp, Ollama,
LM Studio), and for Ollama a Modelfile beside it, handed over only when the export answers like the run.

Llama-architecture models only (LlamaForCausalLM, the default model's family) with a byte-level BPE tokenizer
(SmolLM/SmolLM2; SentencePiece tokenizers such as Llama 2's and TinyLlama's, and Llama 3.1's llama3 rope scaling,
are refused). Written: llama.cpp's tensor names, its Q/K permutation (convert_hf_to_gguf.py's
`LlamaModel.permute`: the rotary halves interleaved the way ggml's rope reads them), hyper-parameters, the
tokenizer and the run's chat template in the metadata. The parity gate (serve/parity.export_report) loads the file
back and compares it with the run; a failed export is kept under OUT.failed and the command fails saying what
differs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from tunesmith.errors import RunError

FORMATS = ("merged", "gguf", "ollama")
DTYPES = ("f32", "f16", "q8_0")
SUPPORTED = {"llama": "LlamaForCausalLM"}  # model_type -> architecture; others are refused before loading weights
GGUF_NAME = "model.gguf"
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's general.file_type (ALL_F32, MOSTLY_F16, MOSTLY_Q8_0)


def check_exportable(run, manifest: dict[str, Any], fmt: str) -> None:
    """Refuse, before any weights are read, what can't become a GGUF: classifier runs, runs with no weights,
    adapters that don't merge exactly, and models that are not Llama-architecture causal LMs."""
    from tunesmith.methods import REGISTRY
    from tunesmith.methods.adapters import check_mergeable, run_adapter

    method = REGISTRY.get(manifest.get("method", ""))
    if method is not None and method.predict is not None:
        raise RunError(f"{run.root}: `method: {manifest.get('method')}` made a classifier; --format {fmt} writes a "
                       "causal language model (llama.cpp and Ollama generate text, they don't run a classifier head)",
                       f"export it with --format merged (a sequence-classification folder), or predict with "
                       f"`tunesmith predict {run.root}`")
    if manifest.get("saved") == "none":
        raise RunError(f"{run.root}: a {manifest.get('method')} run has no trained weights to export",
                       "its base model is the model: use model.name from its recipe.yaml directly")
    check_mergeable(run_adapter(run, manifest).adapter)
    model_type, where = base_architecture(manifest)
    if model_type not in SUPPORTED:
        raise RunError(f"{where}: the model is `{model_type}`; --format {fmt} writes Llama-architecture models only "
                       f"({', '.join(SUPPORTED.values())} with a byte-level BPE tokenizer, e.g. SmolLM2)",
                       "export with --format merged and convert that folder with llama.cpp's convert_hf_to_gguf.py")


def base_architecture(manifest: dict[str, Any]) -> tuple[str, str]:
    """(model_type, the file it was read from) of the run's base model, from its config.json or GGUF header."""
    from tunesmith.errors import TunesmithError
    from tunesmith.model import resolve_model

    bm = manifest.get("base_model") or {}
    try:
        source = resolve_model(bm.get("name", ""), bm.get("cache_dir"))
    except TunesmithError as exc:
        raise RunError(f"the run's base model: {exc.message}",
                       exc.hint or "the base model must be where it was at training time") from None
    if source.gguf_file:
        import gguf

        path = source.path / source.gguf_file
        field = gguf.GGUFReader(path).fields.get("general.architecture")
        return (field.contents() if field is not None else "unknown"), str(path)
    path = source.path / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: can't read the base model's config ({exc})",
                       "the base model folder must hold the config.json it was trained with") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return str(model_type or "unknown"), str(path)


# ----------------------------------------------------------------------------------------------- the GGUF file


def permute_qk(weights, n_head: int, n_head_kv: int | None = None):
    """llama.cpp's Q/K permutation (convert_hf_to_gguf.py, LlamaModel.permute): each head's rows from
    Hugging Face's [first half | second half] rotary layout to ggml's interleaved pairs."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def model_fields(config) -> dict[str, Any]:
    """llama.cpp's hyper-parameters for a LlamaConfig (`llama.*` keys); a RunError for rope scaling it can't
    express."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    fields: dict[str, Any] = {
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads,
        "attention.head_count_kv": config.num_key_value_heads or config.num_attention_heads,
        "rope.freq_base": float(theta), "attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size, "rope.dimension_count": head_dim,
    }
    if head_dim != config.hidden_size // config.num_attention_heads:
        fields["attention.key_length"] = fields["attention.value_length"] = head_dim
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "linear":
        fields["rope.scaling.type"] = "linear"
        fields["rope.scaling.factor"] = float(rope["factor"])
    elif kind != "default":
        raise RunError(f"the model's rope scaling `{kind}` is not written by this exporter (default and linear are)",
                       "export with --format merged and convert with llama.cpp's convert_hf_to_gguf.py")
    return fields


def template_fields(chat_template: str | None) -> dict[str, Any]:
    """The run's chat template as `tokenizer.chat_template` (llama.cpp's server, LM Studio and transformers use it)."""
    return {"tokenizer.chat_template": chat_template} if chat_template else {}


def encode(data, dtype: str):
    """(array, raw GGML type or None) for one tensor in `dtype`: 1-D tensors (norms, biases) stay f32 as in
    llama.cpp's files; q8_0 quantizes matrices whose rows split into 32-value blocks, f16 otherwise."""
    import gguf
    import numpy as np

    data = np.ascontiguousarray(data, dtype=np.float32)
    if dtype == "f32" or data.ndim < 2:
        return data, None
    if dtype == "q8_0" and data.shape[-1] % 32 == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), None


def write_gguf(model, tokenizer, chat_template: str | None, path: Path, dtype: str, end_of_turn: list[int],
               name: str) -> None:
    """The merged Llama `model` with its tokenizer and template as a GGUF file at `path` (written under a
    temporary name and renamed into place)."""
    import gguf

    from tunesmith.export_gguf_tokenizer import add_fields, tokenizer_fields

    config = model.config
    hparams = model_fields(config)
    token_fields = tokenizer_fields(tokenizer, config.vocab_size, end_of_turn)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        writer.add_name(name)
        writer.add_file_type(FILE_TYPES[dtype])
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in hparams.items():
            full = f"llama.{key}"
            if isinstance(value, float):
                writer.add_float32(full, value)
            elif isinstance(value, str):
                writer.add_string(full, value)
            else:
                writer.add_uint32(full, int(value))
        add_fields(writer, {**token_fields, **template_fields(chat_template)})
        for hf_name, tensor in model.state_dict().items():
            if (tied and hf_name == "lm_head.weight") or "rotary_emb" in hf_name:
                continue  # tied: llama.cpp reads the output matrix from token_embd, as its converter writes it
            target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise RunError(f"the merged model has a tensor `{hf_name}` llama.cpp's Llama layout has no place for",
                               "export with --format merged")
            data = tensor.detach().float().cpu().numpy()
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_qk(data, n_head, n_head)
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_qk(data, n_head, n_kv)
            data, raw = encode(data, dtype)
            writer.add_tensor(target, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------- export + gate


def export_gguf(run_path: str | Path, out: str | Path, fmt: str = "gguf", dtype: str = "f16",
                overwrite: bool = False, echo: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Write OUT/model.gguf (and for `fmt` "ollama" OUT/Modelfile), check it against the run (parity.json in
    OUT), and move it into place; (OUT, the parity report). An export that fails its check is kept under
    OUT.failed (see keep_failed) and a RunError names what differs."""
    import time

    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.artifacts import new_staging, open_run, place_dir, write_json
    from tunesmith.export_gguf_ollama import modelfile
    from tunesmith.export_gguf_tokenizer import tokenizer_fields
    from tunesmith.generate import EXPORT_MARKER, end_of_turn_ids, export_target, load_run
    from tunesmith.methods.adapters import merge_for_export, run_adapter
    from tunesmith.serve.parity import export_report

    if fmt not in ("gguf", "ollama") or dtype not in DTYPES:
        raise RunError(f"--format {fmt} --dtype {dtype}: not a GGUF export", f"--format gguf|ollama, "
                       f"--dtype {'|'.join(DTYPES)}")
    run = open_run(run_path)
    manifest = run.read_manifest()
    out = export_target(run, manifest, out, overwrite)
    check_exportable(run, manifest, fmt)
    system_prompt = (run.read_recipe().get("data") or {}).get("system_prompt") if run.recipe.exists() else None
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    tokenizer_fields(tokenizer, 0, [])  # a tokenizer llama.cpp's BPE vocabulary can't hold is refused here
    template = tokenizer.chat_template
    eos = GenerationConfig.from_pretrained(run.root).eos_token_id  # the run's end-of-turn ids (end_of_turn_ids)
    stops = [tokenizer.convert_ids_to_tokens(i) for i in ([] if eos is None else [eos] if isinstance(eos, int)
                                                          else eos)]
    ollama = modelfile(_ollama_template(template, run.tokenizer), stops, system_prompt) if fmt == "ollama" else None
    started = time.monotonic()  # everything above refuses before the weights load
    loaded = load_run(run.root)
    model = merge_for_export(loaded.model, run_adapter(run, manifest).adapter)
    stage = new_staging(out)
    try:
        write_gguf(model, loaded.tokenizer, template, stage / GGUF_NAME, dtype, end_of_turn_ids(loaded),
                   name=f"{run.root.name} ({manifest.get('method')})")
        del model, loaded
        if ollama is not None:
            (stage / "Modelfile").write_text(ollama, encoding="utf-8")
        write_json(stage / EXPORT_MARKER, {"tunesmith_export": 1, "run": str(run.root.resolve()), "format": fmt,
                                           "dtype": dtype, "method": manifest.get("method")})
        written = time.monotonic() - started
        report = export_report(run.root, stage, fmt, dtype, echo=echo)
        report["seconds"] = {"write": round(written, 1), "check": report.pop("check_seconds")}
        report["size_bytes"] = (stage / GGUF_NAME).stat().st_size
        write_json(stage / "parity.json", report)
        if not report["ok"]:
            kept = keep_failed(stage, out)
            raise RunError(f"the {fmt} export does not answer like the run, kept in {kept} (parity.json there): "
                           + "; ".join(report["failures"]),
                           "see its parity.json; an export that fails this check is not handed over")
        place_dir(stage, out, replace=True)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out, report


def _ollama_template(template: str | None, tokenizer_dir: Path) -> str:
    from tunesmith.export_gguf_ollama import ollama_template

    if not template:
        raise RunError(f"{tokenizer_dir}: the run's tokenizer has no chat template to translate for Ollama",
                       "use --format gguf, or train with a tokenizer that has a chat template")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return ollama_template(lambda m: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True))


def keep_failed(stage: Path, out: Path) -> Path:
    """Move a failed export to OUT.failed: replacing an earlier failed export of tunesmith's, never a folder
    tunesmith did not make (then OUT.failed-2, -3, …)."""
    from tunesmith.artifacts import place_dir
    from tunesmith.generate import EXPORT_MARKER

    for n in range(1, 100):
        target = out.with_name(f"{out.name}.failed" + (f"-{n}" if n > 1 else ""))
        if not target.exists() or (target / EXPORT_MARKER).is_file():
            place_dir(stage, target, replace=True)
            return target
    raise RunError(f"{out}.failed … {out}.failed-99 all exist", "remove the old failed exports")
