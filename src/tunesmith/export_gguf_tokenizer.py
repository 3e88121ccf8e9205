"""The tokenizer as GGUF metadata (llama.cpp's `tokenizer.ggml.*` keys) for byte-level BPE tokenizers ("gpt2" in
llama.cpp's words: SmolLM2, Llama 3, Qwen …): tokens with their types, merges, special ids, add_bos, the chat
template. The same keys llama.cpp's convert_hf_to_gguf.py writes, so llama.cpp, Ollama and transformers read them.
"""

from __future__ import annotations

import json
from typing import Any

from tunesmith.errors import RunError

# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def tokenizer_fields(tokenizer, vocab_size: int, end_of_turn: list[int]) -> dict[str, Any]:
    """The metadata for `tokenizer` (a fast Hugging Face tokenizer with a BPE model) padded to the model's
    `vocab_size`; `end_of_turn` are the run's end-of-turn ids (the first is written as eos, a second as eot).
    A RunError naming the tokenizer when it is not byte-level BPE."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise RunError(f"the run's tokenizer is {model.get('type') or type(tokenizer).__name__}, not byte-level BPE: "
                       "GGUF export writes llama.cpp's `gpt2` (BPE) vocabulary only",
                       "export --format merged and convert with llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    size = max(vocab_size, max(reverse) + 1)
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i].content)
            types.append(CONTROL if added[i].special else USER_DEFINED)
        elif i in reverse:
            tokens.append(reverse[i])
            types.append(NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    fields: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre_tokenizer_name(tokens),
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.add_bos_token": bool(bos is not None and probe and probe[0] == bos),
        "tokenizer.ggml.add_space_prefix": False,
    }
    eos = end_of_turn[0] if end_of_turn else tokenizer.eos_token_id
    for key, value in (("bos", bos), ("eos", eos), ("eot", end_of_turn[1] if len(end_of_turn) > 1 else None),
                       ("unknown", tokenizer.unk_token_id), ("padding", tokenizer.pad_token_id)):
        if value is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = int(value)
    return fields


def pre_tokenizer_name(tokens: list[str]) -> str:
    """llama.cpp's name for the pre-tokenizer (`tokenizer.ggml.pre`): the bundled default model's (SmolLM2,
    "smollm") when the vocabulary is SmolLM2's, else "default" (llama.cpp's generic byte-level split)."""
    from tunesmith.errors import TunesmithError

    try:
        reference = _default_vocab()
    except (TunesmithError, OSError, ValueError):
        return "default"
    return reference[0] if tokens[:len(reference[1])] == reference[1] else "default"


_DEFAULT_VOCAB: list = []


def _default_vocab() -> tuple[str, list[str]]:
    """(pre-tokenizer name, tokens) of the bundled default model's GGUF, read once."""
    if not _DEFAULT_VOCAB:
        import gguf

        from tunesmith.model import default_gguf

        reader = gguf.GGUFReader(default_gguf())
        _DEFAULT_VOCAB.append((reader.fields["tokenizer.ggml.pre"].contents(),
                               reader.fields["tokenizer.ggml.tokens"].contents()))
    return _DEFAULT_VOCAB[0]


def add_fields(writer, fields: dict[str, Any]) -> None:
    """Write `fields` (from tokenizer_fields, plus the chat template) with the GGUF writer's typed adders (lists of
    ints become int32 arrays, as llama.cpp's token types are)."""
    for key, value in fields.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
