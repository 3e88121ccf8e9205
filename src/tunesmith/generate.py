"""Using a run: load exactly what was trained (or its untouched base), generate, chat, and export merged weights.

Reads only the run folder: the manifest says which base model and which saved weights to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tunesmith.artifacts import open_run
from tunesmith.errors import RunError
from tunesmith.model import load_model, resolve_model


@dataclass
class Loaded:
    """A model ready to answer: weights, tokenizer and the run's generation config."""

    model: Any
    tokenizer: Any
    generation_config: Any
    label: str
    context: list[dict[str, str]] = field(default_factory=list)  # put before every conversation (a fewshot run)


def load_run(path: str | Path, base: bool = False, dtype=None) -> Loaded:
    """The run's tuned model (adapter applied, or full weights), or with `base=True` its untouched base model.

    A run that prompts instead of training (method: fewshot) is its base model with the run's shots as `context`.
    """
    run = open_run(path)  # a wrong folder fails fast, before torch is imported
    if not base:
        _refuse_classifier(run)
    context = [] if base else _prompting_context(run)
    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.methods.adapters import load_base_for, load_trained, run_adapter

    manifest = run.read_manifest()
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = GenerationConfig.from_pretrained(run.root)
    bm = manifest["base_model"]
    if base or manifest["saved"] == "none":
        model = load_model(resolve_model(bm["name"], bm.get("cache_dir")), dtype=dtype)
        label = f"base ({bm['resolved']})" if base else f"{manifest['method']} ({run.root})"
    else:
        base_model = None
        if manifest["saved"] == "adapter":  # adapters load onto their base (4-bit again for qlora)
            params = run_adapter(run, manifest)
            base_model = load_base_for(params.adapter, params, resolve_model(bm["name"], bm.get("cache_dir")),
                                       dtype=dtype)
        model = load_trained(run, manifest, base_model, dtype=dtype)
        label = f"tuned ({run.root})"
    model.eval()
    model.config.use_cache = True
    return Loaded(model, tokenizer, generation_config, label, context)


def _refuse_classifier(run) -> None:
    """A classifier run (classify, features, ensemble, reward) answers with labels or scores, not text: generate,
    chat and export (of a classifier with no standalone form) would otherwise load its base language model and
    silently leave the head out."""
    from tunesmith.methods import REGISTRY

    name = run.read_manifest().get("method", "")
    method = REGISTRY.get(name)
    if method is not None and method.predict is not None:
        raise RunError(f"{run.root}: `method: {name}` made a classifier: it answers with labels, not text",
                       f"label texts with `tunesmith predict {run.root} TEXT …` (or `--data FILE`); measure it on "
                       f"labelled rows with `tunesmith eval {run.root} --data FILE`")


def _prompting_context(run) -> list[dict[str, str]]:
    """The shots a prompting run (method: fewshot) puts before every conversation; [] for other runs."""
    from tunesmith.methods import REGISTRY
    from tunesmith.methods.fewshot import shot_messages

    method = REGISTRY.get(run.read_manifest().get("method", ""))
    if method is None or method.prompting is None:
        return []
    return shot_messages(method.prompting(run.root).fixed())


def prompt_text(loaded: Loaded, conversation: list[dict[str, str]]) -> str:
    """The conversation in the run's own chat template (a fewshot run's shots in front), ready for the answer."""
    from tunesmith.methods.fewshot import with_context

    return loaded.tokenizer.apply_chat_template(with_context(conversation, loaded.context), tokenize=False,
                                                add_generation_prompt=True)


def prompt_ids(loaded: Loaded, conversation: list[dict[str, str]]) -> list[int]:
    """`prompt_text` as the token ids the model reads (the template holds every special token)."""
    return loaded.tokenizer(prompt_text(loaded, conversation), add_special_tokens=False)["input_ids"]


def generate_tokens(loaded: Loaded, conversations: list[list[dict[str, str]]], max_new_tokens: int = 128,
                    temperature: float = 0.0, batch_size: int = 8) -> list[list[int]]:
    """The new token ids answering each conversation (up to and including the end-of-turn token, no padding);
    greedy when temperature is 0."""
    import torch

    tok, answers = loaded.tokenizer, []
    stops = set(end_of_turn_ids(loaded))
    for start in range(0, len(conversations), batch_size):
        texts = [prompt_text(loaded, c) for c in conversations[start:start + batch_size]]
        batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.inference_mode():
            out = loaded.model.generate(**batch, generation_config=loaded.generation_config,
                                        max_new_tokens=max_new_tokens, **sampling)
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in stops]
            answers.append(row[:ends[0] + 1] if ends else row)
    return answers


def end_of_turn_ids(loaded: Loaded) -> list[int]:
    """The token ids that end an answer (the run's generation config)."""
    eos = loaded.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def generate(loaded: Loaded, conversations: list[list[dict[str, str]]], max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 8) -> list[str]:
    """Answer each conversation (a list of chat messages ending with a user turn); greedy when temperature is 0."""
    return [loaded.tokenizer.decode(ids, skip_special_tokens=True).strip()
            for ids in generate_tokens(loaded, conversations, max_new_tokens, temperature, batch_size)]


def chat_loop(loaded: Loaded, read: Callable[[str], str] = input, write: Callable[[str], None] = print,
              system_prompt: str | None = None, max_new_tokens: int = 256, temperature: float = 0.0) -> int:
    """An interactive chat on the terminal; `/reset` clears the history, `/exit` or end-of-input quits."""
    history: list[dict[str, str]] = [{"role": "system", "content": system_prompt}] if system_prompt else []
    write(f"chatting with {loaded.label} — /reset clears the history, /exit quits")
    turns = 0
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return turns
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return turns
        if line == "/reset":
            history = history[:1] if system_prompt else []
            write("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        answer = generate(loaded, [history], max_new_tokens=max_new_tokens, temperature=temperature)[0]
        history.append({"role": "assistant", "content": answer})
        write(f"model> {answer}")
        turns += 1


def export_merged(path: str | Path, out: str | Path, overwrite: bool = False,
                  verify: Callable[[Path], None] | None = None) -> Path:
    """Write a standalone model folder (weights, tokenizer, generation config), the adapter merged in; a classify or
    reward run becomes a sequence-classification folder (its method's `export`). Other classifier runs are refused.

    `out` is checked before anything is read or loaded: not the run nor a folder holding it, not the base model's
    folder, and an existing folder is replaced only with `overwrite` and only when tunesmith exported it (its
    EXPORT_MARKER). The folder is built beside `out` and moved into place when complete. Adapters that can't be
    merged exactly (qlora, prefix, prompt, bottleneck) raise a RunError saying why, before anything is loaded.
    `verify` (the parity check of `tunesmith export`) is called on a merged language model's complete folder
    before it is moved into place; what it raises leaves nothing behind.
    """
    from tunesmith.artifacts import staged_dir, write_json
    from tunesmith.methods import REGISTRY
    from tunesmith.methods.adapters import check_mergeable, merge_for_export, run_adapter

    run = open_run(path)
    manifest = run.read_manifest()
    out = export_target(run, manifest, out, overwrite)
    method = REGISTRY.get(manifest.get("method", ""))
    standalone = method.export if method is not None else None  # a classifier that stands alone (classify, reward)
    if standalone is None:
        _refuse_classifier(run)
    if manifest["saved"] == "none":
        raise RunError(f"{run.root}: a {manifest['method']} run has no trained weights to export",
                       "its base model is the model: use model.name from its recipe.yaml directly")
    adapter = run_adapter(run, manifest).adapter
    check_mergeable(adapter)
    with staged_dir(out, replace=True) as stage:
        if standalone is not None:
            standalone(run.root, stage)
        else:
            loaded = load_run(path)
            merge_for_export(loaded.model, adapter).save_pretrained(stage)
            loaded.tokenizer.padding_side = "right"
            loaded.tokenizer.save_pretrained(stage)
            loaded.generation_config.save_pretrained(stage)
            if verify is not None:
                del loaded  # the merged weights: verify loads the run afresh
                verify(stage)
        write_json(stage / EXPORT_MARKER, {"tunesmith_export": 1, "run": str(run.root.resolve()),
                                           "method": manifest.get("method"), "adapter": adapter})
    return out


EXPORT_MARKER = "tunesmith_export.json"  # in every folder `tunesmith export` writes: only such a folder is replaced


def export_target(run, manifest: dict[str, Any], out: str | Path, overwrite: bool) -> Path:
    """`out` checked as export's output folder (see export_merged); a RunError naming --out otherwise."""
    from tunesmith.artifacts import check_output

    bm = manifest.get("base_model") or {}
    bases = [p for p in (bm.get("name"), bm.get("resolved")) if isinstance(p, str) and Path(p).expanduser().exists()]
    out = check_output(out, "--out", inputs=bases, folder=True)
    root, target = run.root.resolve(), out.resolve()
    if target == root or target in root.parents:
        raise RunError(f"--out {out}: the output would replace the run {run.root} it exports from",
                       f"give a new folder, e.g. --out {run.root / 'merged'} (the default)")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"--out {out}: already exists",
                           "choose another --out folder, or pass --overwrite to replace an earlier export")
        if not (out / EXPORT_MARKER).is_file():
            raise RunError(f"--out {out}: not a folder tunesmith exported (no {EXPORT_MARKER}); --overwrite "
                           "replaces only those", "choose a new --out folder, or move this one away yourself")
    return out


def conversations_from_prompts(prompts: Iterable[str], system_prompt: str | None = None) -> list[list[dict]]:
    """One single-turn conversation per prompt."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [head + [{"role": "user", "content": p}] for p in prompts]
