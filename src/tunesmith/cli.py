"""The `tunesmith` command. Bad input exits with code 2 and a message (a traceback only with --debug)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tunesmith import cli_data, cli_plan, cli_synth, cli_tune
from tunesmith.cli_common import non_negative_float, non_negative_int, path, port, positive_float, positive_int
from tunesmith.cli_common import quiet_libraries as _quiet_libraries
from tunesmith.errors import TunesmithError


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    from tunesmith.methods import REGISTRY

    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand that wasn't given --debug must not reset `tunesmith --debug COMMAND` to False
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
    recipe_args = argparse.ArgumentParser(add_help=False)
    recipe_args.add_argument("recipe", type=path, help="recipe YAML file")
    recipe_args.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                             help="override recipe keys, e.g. train.learning_rate=1e-4 method.adapter=full")

    parser = argparse.ArgumentParser(prog="tunesmith", parents=[common],
                                     description="Fine-tune open language models on your own data.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", parents=[common], help="write a commented starter recipe")
    p.add_argument("path", nargs="?", type=path, default="recipe.yaml")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")

    sub.add_parser("validate", parents=[common, recipe_args], help="check a recipe and its files; report every problem")

    p = sub.add_parser("train", parents=[common, recipe_args], help="fine-tune as the recipe says")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="train on N processes of this machine (torchrun; one per GPU): sets distributed.nproc")
    p.add_argument("--force", action="store_true", help="train even when the plan says it will not fit")

    p = sub.add_parser("launch", parents=[common, recipe_args], help="train on several machines (torchrun): print "
                       "each machine's command, or run this machine's share")
    p.add_argument("--print", dest="print_only", action="store_true", help="print one torchrun command per machine")
    p.add_argument("--nnodes", type=positive_int, default=None, help="machines (default: distributed.nnodes)")
    p.add_argument("--nproc", type=positive_int, default=None,
                   help="processes per machine (default: distributed.nproc)")
    p.add_argument("--master", default=None, metavar="HOST[:PORT]",
                   help="node 0's address that every machine can reach (default port 29500)")
    p.add_argument("--node-rank", type=non_negative_int, default=0, help="this machine's number, 0 to nnodes-1")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")

    cli_plan.register(sub, common, recipe_args)
    cli_tune.register(sub, common, recipe_args)

    data = sub.add_parser("data", parents=[common], help="check, clean, split, balance, grow and preview data")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    cli_data.register(dsub, common, recipe_args)
    cli_synth.register(dsub, common)

    for name, text in (("generate", "answer prompts with a run's model"), ("chat", "chat with a run's model")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("run", type=path, help="run folder written by `tunesmith train`")
        if name == "generate":
            p.add_argument("prompts", nargs="+", help="one or more prompts")
        p.add_argument("--base", action="store_true", help="answer with the untouched base model")
        p.add_argument("--system", default=None, help="system prompt")
        p.add_argument("--max-new-tokens", type=positive_int, default=256)
        p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)")

    p = sub.add_parser("eval", parents=[common], help="tuned vs base vs few-shot on the same held-out rows, "
                       "with confidence intervals, forgetting and leakage checks")
    p.add_argument("run", type=path, help="run folder written by `tunesmith train`")
    p.add_argument("--data", type=path, default=None,
                   help="data file to evaluate on (default: the rows the run held out)")
    p.add_argument("--against", default="base,fewshot",
                   help="comparisons: base, fewshot and/or other run folders, comma-separated (default base,fewshot)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N rows only")
    p.add_argument("--shots", type=non_negative_int, default=4,
                   help="in-context examples for the few-shot baseline (default 4)")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--include-leaked", action="store_true", help="keep rows that match training rows (reported "
                   "either way)")
    p.add_argument("--no-forgetting", action="store_true", help="skip the general-ability (forgetting) check")
    p.add_argument("--name", default=None, help="folder under RUN/eval/ (default: the data file's name or heldout)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--reward-model", type=path, default=None, metavar="RUN",
                   help="a reward-model run: score every system's "
                   "answers, the tuned model's win rate against each, and its KL to the base model")

    p = sub.add_parser("score", parents=[common], help="score replies to a prompt with a reward-model run")
    p.add_argument("run", type=path, help="run folder of a `method: reward` run")
    p.add_argument("--prompt", required=True, help="the user's message (or a '\\n\\nHuman: … Assistant:' transcript)")
    p.add_argument("--response", action="append", required=True, help="a reply to score; repeat to compare several")
    p.add_argument("--system", default=None, help="system prompt")

    p = sub.add_parser("compare", parents=[common, recipe_args], help="train one task under several methods with "
                       "the same data and budget; one table of cost and validation metric with 95%% intervals")
    p.add_argument("--methods", required=True, help="comma-separated arms: adapters (lora, qlora, dora, ia3, prefix, "
                   "prompt, adapter, freeze, full), methods (e.g. features), METHOD:ADAPTER (e.g. classify:lora), "
                   "zero-shot, fewshot")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key for every arm (like the KEY=VALUE arguments)")
    p.add_argument("--arm-set", action="append", default=[], metavar="ARM:KEY=VALUE",
                   help="override a recipe key for one arm, e.g. prompt:train.learning_rate=3e-2")
    p.add_argument("--out", type=path, default=None, help="folder for the arms' run folders and the table "
                   "(default runs/compare-RECIPE_NAME)")
    p.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N validation rows only")
    p.add_argument("--shots", type=non_negative_int, default=4,
                   help="solved examples in the fewshot baseline's prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16, help="evaluation batch size")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the bootstrap and the few-shot examples "
                   "(training uses train.seed)")
    p.add_argument("--fresh", action="store_true", help="retrain every arm, even one whose run folder matches")
    p.add_argument("--verbose", action="store_true", help="show each arm's output here, not only in OUT/logs/")

    p = sub.add_parser("report", parents=[common], help="write RUN/report.html: curves, evaluations, human review, "
                       "data check (one file, opens offline)")
    p.add_argument("run", type=path, help="run folder written by `tunesmith train`")

    p = sub.add_parser("review", parents=[common], help="blinded pairwise human review of two runs (or a run and its "
                       "base) in a local web page; votes kept in RUN_A/review/")
    p.add_argument("run_a", type=path, help="run folder")
    p.add_argument("run_b", type=path, help="another run folder, or 'base' for RUN_A's untouched base model")
    p.add_argument("--data", type=path, default=None,
                   help="rows whose prompts are answered (any data file tunesmith reads)")
    p.add_argument("--limit", type=positive_int, default=None, help="review the first N prompts")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds which answer is shown on the left")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8765, help="port (0 = any free port)")
    p.add_argument("--reviewer", default=None, help="your name (the page asks otherwise)")
    p.add_argument("--results", action="store_true", help="print the win rate so far and exit")
    p.add_argument("--export", type=path, default=None, metavar="CSV", help="write every vote to CSV and exit")
    p.add_argument("--reward-model", type=path, default=None, metavar="RUN",
                   help="with --results: how often this reward model "
                   "prefers the answer the reviewers preferred")

    p = sub.add_parser("predict", parents=[common], help="label texts with a run: a classifier's (classify, features, "
                       "ensemble) or a text generator's answer among allowed labels, with probabilities")
    p.add_argument("run", type=path, help="run folder written by `tunesmith train`")
    p.add_argument("texts", nargs="*", help="texts to label (or --data)")
    p.add_argument("--data", type=path, default=None, help="label every row of this JSONL, CSV or Parquet file")
    p.add_argument("--column", default="text", help="the column of --data that holds the text (default text)")
    p.add_argument("--out", type=path, default=None,
                   help="where --data's predictions go (.jsonl, .csv or .parquet; default "
                   "RUN/predictions/DATA_NAME.jsonl)")
    p.add_argument("--top", type=positive_int, default=3,
                   help="labels to list per text, most probable first (default 3)")
    p.add_argument("--labels", default=None, help="for a run that answers in text (sft, fewshot, …): the answers to "
                   "choose from, comma-separated (default: the labels of the classification rows it trained on)")
    p.add_argument("--batch-size", type=positive_int, default=16)

    p = sub.add_parser("export", parents=[common], help="write a standalone model folder")
    p.add_argument("run", type=path, help="run folder written by `tunesmith train`")
    p.add_argument("--format", choices=("merged", "gguf", "ollama"), default=None,
                   help="merged: a Hugging Face folder, the adapter merged in; gguf: one GGUF file for llama.cpp / "
                   "LM Studio (Llama-architecture models); ollama: the GGUF plus a Modelfile")
    p.add_argument("--merge", action="store_true", help="the same as --format merged")
    p.add_argument("--dtype", choices=("f32", "f16", "q8_0"), default=None,
                   help="GGUF weights: f32, f16 (default) or q8_0 (8-bit blocks); not for --format merged")
    p.add_argument("--out", type=path, default=None, help="output folder (default RUN/merged, RUN/gguf or RUN/ollama)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a folder tunesmith exported")

    p = sub.add_parser("retrain", parents=[common], help="the run's recipe on its rows plus new ones (from `data "
                       "from-log`) into a new run, compared with the run on its held-out rows: PROMOTE or KEEP",
                       usage="tunesmith retrain RUN [KEY=VALUE ...] --add FILE [--out NEW_RUN] [--limit N] "
                             "[--max-new-tokens N] [--batch-size N] [--seed N]")
    p.add_argument("run", type=path, help="the run in service (a folder written by `tunesmith train`)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="override recipe keys of the new run, right after "
                   "RUN, e.g. train.max_steps=200 (not data.train, data.validation or output.dir)")
    p.add_argument("--add", type=path, required=True, help="rows to add, in the run's format (JSONL, CSV or Parquet)")
    p.add_argument("--out", type=path, default=None, help="the new run folder (default RUN-retrain-N beside RUN)")
    p.add_argument("--limit", type=positive_int, default=None, help="compare on the first N held-out rows only")
    p.add_argument("--max-new-tokens", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seed", type=non_negative_int, default=0, help="seeds the bootstrap")

    p = sub.add_parser("monitor", parents=[common], help="latency, throughput, errors and input drift of a served run "
                       "from its request log: a terminal summary, an offline HTML page and a verdict")
    p.add_argument("log", type=path, nargs="?", default=None,
                   help="the request log `tunesmith serve` writes (RUN/serve/requests.sqlite)")
    p.add_argument("--parity", default=None, metavar="URL", help="instead of a log: ask the OpenAI-compatible server "
                   "at URL (e.g. a vLLM deployment from `serve --print-vllm`) the run's parity prompts, greedy, and "
                   "compare with the run's own answers; exit 1 when any differs (needs --run)")
    p.add_argument("--model", dest="served_model", default=None,
                   help="with --parity: the model name the server answers to (default: the run folder's name)")
    p.add_argument("--api-key-env", default=None, metavar="VAR", help="with --parity: the environment variable "
                   "holding the server's API key")
    p.add_argument("--run", type=path, default=None, help="the served run, whose training rows the inputs are "
                   "compared with (default: the run folder holding LOG)")
    p.add_argument("--out", type=path, default=None, help="the HTML page (default monitor.html beside LOG)")
    p.add_argument("--since", type=iso_time, default=None, metavar="ISO",
                   help="only requests received at or after this time, e.g. 2026-05-01T12:00 (UTC unless it says)")
    p.add_argument("--window", type=positive_float, default=None, metavar="MIN",
                   help="minutes per time window in the charts (default: ≤ 24 windows over the log)")

    p = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP server for a run (and adapters "
                       "of its base), with metrics, a request log and a start-up parity check")
    p.add_argument("run", type=path, help="run folder written by `tunesmith train`")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN",
                   help="serve another LoRA run of the same base as model NAME; repeat for several")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs "
                   "--api-key-env)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="environment variable holding the key clients send as `Authorization: Bearer KEY`")
    p.add_argument("--max-waiting", type=positive_int, default=64, help="requests that may wait for a place in "
                   "the batch; more are answered 429 (default 64)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-tokens", type=positive_int, default=1024, help="new tokens one request may ask for "
                   "(default 1024)")
    p.add_argument("--timeout", type=positive_float, default=None, metavar="S",
                   help="seconds a generation may take; past it the request is answered 408")
    p.add_argument("--log", type=path, default=None, help="request log (default RUN/serve/requests.sqlite)")
    p.add_argument("--log-content", action="store_true", help="keep prompts and answers in the request log "
                   "(personal data masked)")
    p.add_argument("--print-vllm", action="store_true", help="write the equivalent `vllm serve` command, the chat "
                   "template and the parity prompts to RUN/serve/, print the command and exit")
    p.add_argument("--no-parity", action="store_true", help="skip the start-up check that the served answers equal "
                   "`tunesmith generate`'s")

    sub.add_parser("methods", parents=[common], help=f"list training methods ({', '.join(REGISTRY)})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, dispatch, and turn TunesmithErrors into a message and exit code 2 (argparse's own
    errors also return 2); a reader that stops early (`tunesmith methods | head -1`) ends the command quietly."""
    try:
        code = _dispatch(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # inside the try: a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a command killed by the closed pipe would


def _dispatch(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return COMMANDS[args.command](args) or 0
    except TunesmithError as exc:
        if getattr(args, "debug", False):
            raise
        if exc.silent:
            return exc.exit_code
        print(f"error: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush into a closed pipe raises nothing."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a file descriptor (captured in tests)
        pass
    finally:
        os.close(devnull)


def cmd_init(args) -> int:
    from tunesmith.artifacts import atomic_write
    from tunesmith.recipe import starter_recipe

    path = Path(args.path)
    if path.is_dir():
        raise TunesmithError(f"{path}: is a folder; `init` writes a recipe file",
                             f"give a file name, e.g. tunesmith init {path / 'recipe.yaml'}")
    if path.exists() and not args.force:
        raise TunesmithError(f"{path} already exists", "pass --force to overwrite it, or give another path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TunesmithError(f"{path}: can't make the folder {path.parent} ({exc.strerror})",
                             "give a path in a folder you can write to") from None
    atomic_write(path, starter_recipe(path.name))
    print(f"wrote {path}; edit data.train, then `tunesmith validate {path}`")
    return 0


def cmd_validate(args) -> int:
    from tunesmith.recipe import load_recipe

    from tunesmith.distributed import check_device

    recipe = load_recipe(args.recipe, args.overrides)
    check_device(recipe.distributed, str(args.recipe))
    print(f"{args.recipe}: ok — method {recipe.method.name}, model {recipe.model.name}, "
          f"train {recipe.data.train}, run folder {recipe.output.dir}")
    return 0


def cmd_train(args) -> int:
    from tunesmith import distributed
    from tunesmith.recipe import load_recipe

    overrides = list(args.overrides) + ([f"distributed.nproc={args.nproc}"] if args.nproc else [])
    recipe = load_recipe(args.recipe, overrides)
    distributed.check_device(recipe.distributed, str(args.recipe))
    if distributed.needs_launcher(recipe.distributed) and not distributed.launched():
        from tunesmith.launch import run_here, worker_arguments

        if recipe.distributed.nnodes > 1:
            raise TunesmithError(f"{args.recipe}: distributed.nnodes = {recipe.distributed.nnodes}: `train` starts "
                                 "processes on this machine only",
                                 "print each machine's command with `tunesmith launch RECIPE --print`")
        return run_here(recipe.distributed, worker_arguments(args.recipe, overrides, args.resume, args.force))
    _quiet_libraries()
    from tunesmith.train import train_run

    train_run(recipe, resume=args.resume, recipe_path=args.recipe, force=args.force)
    if distributed.is_main():
        _write_report(recipe.output.dir)
    return 0


def cmd_launch(args) -> int:
    from tunesmith import distributed
    from tunesmith.launch import DEFAULT_PORT, cluster_commands, run_here, worker_arguments
    from tunesmith.recipe import load_recipe

    sizes = [f"distributed.{key}={value}" for key, value in (("nproc", args.nproc), ("nnodes", args.nnodes)) if value]
    overrides = list(args.overrides) + sizes
    recipe = load_recipe(args.recipe, overrides)
    d = recipe.distributed
    if args.node_rank >= d.nnodes:
        raise TunesmithError(f"--node-rank {args.node_rank}: there are {d.nnodes} machine(s), numbered 0 to "
                             f"{d.nnodes - 1}", "give each machine its own number below --nnodes")
    if args.print_only:
        print(cluster_commands(d, args.recipe, list(args.overrides), args.master or f"NODE0_HOST:{DEFAULT_PORT}",
                               recipe.output.dir, args.resume))
        return 0
    distributed.check_device(d, str(args.recipe))
    if d.nnodes > 1 and not args.master:
        raise TunesmithError("--master: a run over several machines needs node 0's address",
                             f"give --master HOST:{DEFAULT_PORT} on every machine (the same on all)")
    if args.master:
        from tunesmith.launch import split_master

        split_master(args.master)
    return run_here(d, worker_arguments(args.recipe, overrides, args.resume, False), nnodes=d.nnodes,
                    node_rank=args.node_rank, master=args.master)


def cmd_data(args) -> int:
    return {**cli_data.COMMANDS, **cli_synth.COMMANDS}[args.data_command](args)


def cmd_generate(args) -> int:
    _quiet_libraries()
    from tunesmith.generate import conversations_from_prompts, generate, load_run

    loaded = load_run(args.run, base=args.base)
    answers = generate(loaded, conversations_from_prompts(args.prompts, args.system),
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    for prompt, answer in zip(args.prompts, answers):
        if len(args.prompts) > 1:
            print(f"> {prompt}")
        print(answer)
    return 0


def cmd_chat(args) -> int:
    _quiet_libraries()
    from tunesmith.generate import chat_loop, load_run

    chat_loop(load_run(args.run, base=args.base), system_prompt=args.system,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    return 0


def cmd_eval(args) -> int:
    from tunesmith.evaluation.runner import EvalOptions, check_run

    check_run(args.run)
    against = tuple(x.strip() for x in args.against.split(",") if x.strip())
    options = EvalOptions(data=args.data, against=against, limit=args.limit, shots=args.shots,
                          max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          include_leaked=args.include_leaked, forgetting=not args.no_forgetting, seed=args.seed,
                          name=args.name, reward_model=args.reward_model)
    if args.reward_model:
        from tunesmith.methods.reward import load_reward_model

        load_reward_model(args.reward_model)  # a wrong folder fails before anything is generated
    _quiet_libraries()
    from tunesmith.evaluation.runner import evaluate_run
    from tunesmith.evaluation.view import results_text

    results = evaluate_run(args.run, options)
    print(results_text(results))
    print(f"wrote {results['folder']}/results.json, examples.jsonl" +
          (", regressions.jsonl" if "regressions" in results else ""))
    _write_report(args.run)
    return 0


def cmd_score(args) -> int:
    from tunesmith.evaluation.runner import check_run

    check_run(args.run)
    _quiet_libraries()
    from tunesmith.data.format import transcript_messages
    from tunesmith.methods.reward import load_reward_model

    model = load_reward_model(args.run)
    prompt = ([{"role": "system", "content": args.system}] if args.system else []) + transcript_messages(args.prompt)
    scores = model.score([prompt] * len(args.response), args.response)
    width = max(len(f"{s:.4f}") for s in scores)
    ranks = {i: rank for rank, i in enumerate(sorted(range(len(scores)), key=lambda i: -scores[i]), 1)}
    for i, (score, reply) in enumerate(zip(scores, args.response)):
        reply = " ".join(reply.split())
        print(f"{score:>{width}.4f}  {reply[:100] + ('…' if len(reply) > 100 else '')}"
              + (f"  (#{ranks[i]})" if len(scores) > 1 else ""))
    return 0


def cmd_predict(args) -> int:
    from tunesmith.predict import describe_file, describe_texts, predict_file, predict_texts

    if bool(args.texts) == bool(args.data):
        raise TunesmithError("give texts to label or --data FILE (one of the two)",
                             f"e.g. tunesmith predict {args.run} \"I lost my card\"  or  --data questions.jsonl")
    labels = [x.strip() for x in args.labels.split(",") if x.strip()] if args.labels else None
    if args.labels is not None and not labels:
        raise TunesmithError(f"--labels {args.labels!r}: no labels", "e.g. --labels positive,negative")
    if args.out:
        from tunesmith.artifacts import check_output

        check_output(args.out, "--out", inputs=[args.data])
    texts = _usable_texts(args.texts)
    _quiet_libraries()
    if args.data:
        print(describe_file(predict_file(args.run, args.data, args.column, args.out, args.top, args.batch_size,
                                         labels)))
    else:
        print(describe_texts(texts, predict_texts(args.run, texts, args.top, args.batch_size, labels=labels)))
    return 0


def _usable_texts(texts: list[str]) -> list[str]:
    """The command line's texts that have words; an empty one is rejected as `--data` rejects an empty row (its
    position and reason, and the counts, on stderr), and none usable is an error."""
    rejected = [i for i, text in enumerate(texts, 1) if not text.strip()]
    if not rejected:
        return texts
    for i in rejected:
        print(f"text {i}: rejected — empty field: the text has no words", file=sys.stderr)
    usable = [t for t in texts if t.strip()]
    print(f"{len(texts)} text{'s' * (len(texts) != 1)} given, {len(usable)} to label, {len(rejected)} rejected "
          f"(empty field ×{len(rejected)})", file=sys.stderr)
    if not usable:
        raise TunesmithError("no text to label: every text given is empty", "give the texts in quotes, e.g. "
                             "tunesmith predict RUN \"I lost my card\"")
    return usable


def cmd_compare(args) -> int:
    from tunesmith.compare import CompareOptions, run_compare

    options = CompareOptions(recipe=args.recipe, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                             overrides=[*args.overrides, *args.sets], arm_overrides=args.arm_set, out=args.out,
                             limit=args.limit, shots=args.shots, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, seed=args.seed, fresh=args.fresh, verbose=args.verbose)
    result = run_compare(options)
    failed = [a["name"] for a in result["arms"] if a["status"] != "ok"]
    if failed:
        print(f"{len(failed)} arm{'s' if len(failed) > 1 else ''} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _write_report(run) -> None:
    """Refresh RUN/report.html (after train and after eval)."""
    from tunesmith.report import write_report

    print(f"report: {write_report(run)}")


def cmd_report(args) -> int:
    _write_report(args.run)
    return 0


def cmd_review(args) -> int:
    import threading

    from tunesmith import review_app as ra
    from tunesmith.artifacts import check_output, open_run

    db = ra.review_db_path(args.run_a, args.run_b)
    if args.results or args.export:  # read what is there; generate nothing
        if not db.exists():
            raise TunesmithError(f"{db}: no review yet", "start one with --data FILE")
        if args.export:
            print(f"wrote {ra.export_csv(db, check_output(args.export, '--export', [db]))}")
        print(ra.format_results(ra.review_results(db)))
        if args.reward_model:
            _quiet_libraries()
            print(ra.format_agreement(ra.reward_agreement(db, args.reward_model)))
        return 0
    if not args.data:
        raise TunesmithError("--data is required to start or continue a review",
                             "give the file whose prompts both systems answer, e.g. --data heldout.jsonl")
    _quiet_libraries()
    open_run(args.run_a)
    server = ra.ReviewServer((args.host, args.port), db, args.reviewer)  # a port in use fails before generating
    try:
        ra.prepare_review(args.run_a, args.run_b, args.data, limit=args.limit, max_new_tokens=args.max_new_tokens,
                          seed=args.seed, db_path=db)
        server.start()
        print(f"review at {server.url} — keys 1 / 2 / t; Ctrl+C stops (every vote is saved as you go)")
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    print(ra.format_results(ra.review_results(db)))
    return 0


def cmd_export(args) -> int:
    _quiet_libraries()
    fmt = _export_format(args)
    if fmt != "merged":
        from tunesmith.export_gguf import export_gguf

        out, report = export_gguf(args.run, args.out or Path(args.run) / fmt, fmt, args.dtype or "f16",
                                  overwrite=args.overwrite)
        size = report["size_bytes"] / 1e6
        extra = (f"; load it into Ollama with `ollama create NAME -f {out / 'Modelfile'}`" if fmt == "ollama" else
                 f"; run it with `llama-cli -m {out / 'model.gguf'}` or open it in LM Studio")
        print(f"wrote {out / 'model.gguf'} ({args.dtype or 'f16'}, {size:.1f} MB) and {out / 'parity.json'}{extra}")
        return 0
    from tunesmith.artifacts import write_json
    from tunesmith.generate import EXPORT_MARKER, export_merged
    from tunesmith.serve.parity import export_report

    out_arg = args.out or Path(args.run) / "merged"

    def parity(folder: Path) -> None:  # the merged folder answers the run's validation prompts as the run does
        from tunesmith.errors import RunError
        from tunesmith.export_gguf import keep_failed

        report = export_report(args.run, folder, "merged", "f32")
        report.pop("check_seconds", None)
        write_json(folder / "parity.json", report)
        if not report["ok"]:
            write_json(folder / EXPORT_MARKER, {"tunesmith_export": 1, "format": "merged", "failed": True})
            kept = keep_failed(folder, Path(out_arg).expanduser())
            raise RunError(f"the merged export does not answer like the run, kept in {kept} (parity.json there): "
                           + "; ".join(report["failures"]), "see its parity.json")

    out = export_merged(args.run, out_arg, overwrite=args.overwrite, verify=parity)
    if (out / "tunesmith_classifier.json").exists():
        print(f"wrote merged classifier to {out} (load it with AutoModelForSequenceClassification.from_pretrained; "
              f"{out / 'README.md'} says how to put texts to it)")
    else:
        print(f"wrote merged model to {out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _export_format(args) -> str:
    """--format, with --merge as its old spelling; a TunesmithError for a missing or contradictory choice."""
    if args.merge and args.format not in (None, "merged"):
        raise TunesmithError(f"--merge and --format {args.format}: --merge means --format merged",
                             "give one of them")
    fmt = "merged" if args.merge else args.format
    if fmt is None:
        raise TunesmithError("export: say what to write with --format merged|gguf|ollama (or --merge)",
                             f"e.g. tunesmith export {args.run} --format gguf --dtype q8_0")
    if fmt == "merged" and args.dtype is not None:
        raise TunesmithError(f"--dtype {args.dtype}: only for --format gguf or ollama (a merged folder keeps the "
                             "run's own precision)", "drop --dtype, or add --format gguf")
    return fmt


def cmd_retrain(args) -> int:
    """Train the run's recipe on its rows plus --add into a new run, then PROMOTE or KEEP (serve swaps a promoted
    adapter in with POST /v1/load_lora_adapter)."""
    from tunesmith.artifacts import check_output
    from tunesmith.loop import RetrainOptions, retrain

    if args.out:
        check_output(args.out, "--out", inputs=[args.run, args.add], folder=True)
    _quiet_libraries()
    verdict = retrain(args.run, args.add, RetrainOptions(out=args.out, overrides=args.overrides, limit=args.limit,
                                                         max_new_tokens=args.max_new_tokens,
                                                         batch_size=args.batch_size, seed=args.seed))
    _write_report(verdict["new"])
    return 0


def iso_time(text: str) -> float:
    """An argparse type: an ISO 8601 time (UTC unless it names an offset) as unix seconds."""
    from datetime import datetime, timezone

    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time; write e.g. 2026-05-01T12:00 or "
                                         "2026-05-01T12:00+02:00") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def cmd_monitor(args) -> int:
    """Summarize a request log and write the monitoring page; the verdict ends the summary."""
    from tunesmith.artifacts import check_output
    from tunesmith.monitor import format_summary, monitor, write_html

    if args.parity:
        return _remote_parity(args)
    if args.log is None:
        raise TunesmithError("give the request log to summarize (LOG), or --parity URL --run RUN",
                             "e.g. tunesmith monitor runs/NAME/serve/requests.sqlite")
    out = check_output(args.out or Path(args.log).parent / "monitor.html", "--out", inputs=[args.log])
    _quiet_libraries()
    report = monitor(args.log, args.run, since=args.since, window_min=args.window)
    print(format_summary(report))
    print(f"page: {write_html(report, out)}")
    return 0


def _remote_parity(args) -> int:
    """`monitor --parity URL`: the run's parity prompts asked of another server; exit 1 when an answer differs."""
    from tunesmith.serve.parity import describe_remote, remote_parity

    if args.run is None or args.log is not None:
        raise TunesmithError("--parity needs --run RUN (the run the server should answer like) and no LOG",
                             f"e.g. tunesmith monitor --parity {args.parity} --run runs/NAME")
    from tunesmith.serve.startup import key_from_env

    key = key_from_env(args.api_key_env)
    _quiet_libraries()
    cases = remote_parity(args.run, args.parity, model=args.served_model, api_key=key)
    print(describe_remote(cases, args.parity))
    return 0 if all(c["same"] for c in cases) else 1


def cmd_methods(args) -> int:
    """Every method and adapter, each parameter with its type, default and meaning (from the recipe schema)."""
    from tunesmith.methods import REGISTRY
    from tunesmith.methods.adapters import ADAPTERS, SECTIONS
    from tunesmith.schema import field_table

    pad = " " * 10
    lines = []
    for name, method in REGISTRY.items():
        lines += [f"{name:<9} {method.summary}", f"{pad}trains on: {', '.join(method.record_types)}"]
        lines += field_table(method.params, "method", skip=("name", *SECTIONS), indent=pad)
    lines += ["", "adapters (method.adapter, for every method that has the key; settings in their own section):"]
    for name, spec in ADAPTERS.items():
        lines.append(f"{name:<9} {spec.summary}")
        key = spec.params_key
        lines += field_table(SECTIONS[key], f"method.{key}", indent=pad) if key else [f"{pad}(no settings)"]
    print("\n".join(lines))
    return 0


def cmd_serve(args) -> int:
    """Serve a run over HTTP (or, with --print-vllm, write the equivalent vLLM command)."""
    from tunesmith.serve.startup import ServeConfig, api_key, parse_adapters, serve, vllm_command

    config = ServeConfig(run=Path(args.run), adapters=parse_adapters(args.adapter), host=args.host, port=args.port,
                         api_key=api_key(args.host, args.api_key_env), max_waiting=args.max_waiting,
                         max_batch=args.max_batch, max_tokens=args.max_tokens, timeout_s=args.timeout,
                         log=Path(args.log) if args.log else None, log_content=args.log_content,
                         parity=not args.no_parity)
    if args.print_vllm:
        paths = vllm_command(config)
        print(paths.pop("script"), end="")
        print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    _quiet_libraries()
    try:
        return serve(config)
    except KeyboardInterrupt:
        return 0


COMMANDS = {"init": cmd_init, "validate": cmd_validate, "train": cmd_train, "launch": cmd_launch, "data": cmd_data,
            "generate": cmd_generate, "chat": cmd_chat, "eval": cmd_eval, "score": cmd_score, "report": cmd_report,
            "review": cmd_review, "export": cmd_export, "compare": cmd_compare, "predict": cmd_predict,
            "methods": cmd_methods, "serve": cmd_serve, "monitor": cmd_monitor, "retrain": cmd_retrain,
            **cli_plan.COMMANDS, **cli_tune.COMMANDS}
