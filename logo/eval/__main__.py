"""``python -m logo.eval {niah,ppl,harness} --model PATH --out DIR [options]`` (see logo.eval).

    python -m logo.eval niah --model runs/logo-default --out runs/eval/niah --format kv --lengths 512 1024
    python -m logo.eval niah --model /models/Llama-3-8B-Instruct-80K --out eval/niah --lengths 8192 32768 65536 \\
        --dtype bf16 --attn eager --retrieval-score
    python -m logo.eval ppl --model runs/llama3-logo --out eval/ppl --lengths 8192 32768 65536 --file books.jsonl
    python -m logo.eval harness --model runs/llama3-logo --out eval/lb --tasks longbench_qasper --batch-size 4
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from ..errors import StorageError, run_cli


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory or logo.train run directory")
    parser.add_argument("--out", required=True, help="output directory (JSON + CSV + PNG), written atomically")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                        help="attention implementation (eager for --retrieval-score)")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--rope-theta", type=float, default=None, help="override the model's RoPE base")
    parser.add_argument("--max-position-embeddings", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m logo.eval", description="LOGO's evaluations (paper §4), offline",
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                                         "\n\n", 1)[1] + "\n--debug: show the traceback of a user error too")
    sub = parser.add_subparsers(dest="evaluation", required=True, metavar="{niah,ppl,harness}")
    niah = sub.add_parser("niah", help="single-needle and multi-value needle-in-a-haystack (recall, exact match, "
                                       "retrieval score) over context lengths x depths")
    _common(niah)
    niah.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="real context tokens")
    niah.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    niah.add_argument("--modes", nargs="+", default=["single", "multi"], choices=["single", "multi"])
    niah.add_argument("--values", type=int, default=4, help="values of the multi-value needle")
    niah.add_argument("--samples", type=int, default=4, help="samples per (mode, length, depth)")
    niah.add_argument("--format", default="ruler", choices=["ruler", "kv"],
                      help="ruler: magic numbers (real models); kv: the synthetic task's pairs (the embedded toy)")
    niah.add_argument("--max-new-tokens", type=int, default=64)
    niah.add_argument("--batch-size", type=int, default=8)
    niah.add_argument("--retrieval-score", action="store_true", help="retrieval heads score (needs --attn eager)")
    niah.add_argument("--seed", type=int, default=0)
    ppl = sub.add_parser("ppl", help="perplexity per position bucket over long documents (paper Fig. 4)")
    _common(ppl)
    ppl.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="window tokens")
    ppl.add_argument("--bucket", type=int, default=256, help="positions per bucket")
    ppl.add_argument("--documents", type=int, default=4, help="windows per length")
    ppl.add_argument("--file", default=None, help=".txt (one document) or .jsonl ({'text'} per line); default: "
                                                 "the shipped public-domain text")
    ppl.add_argument("--batch-size", type=int, default=1)
    ppl.add_argument("--seed", type=int, default=0)
    harness = sub.add_parser("harness", help="lm-evaluation-harness tasks (LongBench, RULER, MMLU, local YAMLs)")
    _common(harness)
    harness.add_argument("--tasks", nargs="+", required=True)
    harness.add_argument("--include-path", default=None, help="directory of task YAMLs (local datasets)")
    harness.add_argument("--batch-size", type=int, default=8)
    harness.add_argument("--max-length", type=int, default=None)
    harness.add_argument("--limit", type=float, default=None, help="samples per task (testing only)")
    harness.add_argument("--num-fewshot", type=int, default=None)
    harness.add_argument("--apply-chat-template", action="store_true")
    harness.add_argument("--seed", type=int, default=0)
    return parser


def _options(args):
    """The evaluation module and its validated options (before anything is loaded)."""
    if args.evaluation == "niah":
        from . import niah as module

        options = module.NiahOptions(args.lengths, args.depths, args.modes, args.values, args.samples, args.format,
                                     args.max_new_tokens, args.batch_size, args.retrieval_score, args.seed)
        if args.retrieval_score and args.attn != "eager":
            from ..errors import ConfigError

            raise ConfigError("--retrieval-score reads attention weights: load the model with --attn eager")
    elif args.evaluation == "ppl":
        from . import ppl as module

        options = module.PplOptions(args.lengths, args.bucket, args.documents, args.batch_size, args.seed)
    else:
        from . import harness as module

        options = module.HarnessOptions(args.tasks, args.include_path, args.batch_size, args.max_length, args.limit,
                                        args.num_fewshot, args.apply_chat_template, args.seed)
        options.validate()
        options.manager = module.task_manager(options)  # unknown tasks are refused before loading
        return module, options
    return module, options.validate()


def _main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    from .loading import load_for_eval
    from .outputs import OutputDirectory

    module, options = _options(args)
    documents = module.read_documents(args.file) if args.evaluation == "ppl" and args.file else None
    out = OutputDirectory(args.out, overwrite=args.overwrite)  # refused before anything is loaded
    try:
        loaded = load_for_eval(args.model, dtype=args.dtype, attn_implementation=args.attn, device=args.device,
                               rope_theta=args.rope_theta, max_position_embeddings=args.max_position_embeddings)
        progress = not args.no_progress
        if args.evaluation == "niah":
            result = module.run(loaded.model, loaded.tokenizer, options, progress=progress)
            out.csv("niah.csv", result["rows"])
            out.csv("cells.csv", result["cells"])
            out.png("niah.png", module.heatmap(result["cells"]))
            print(niah_table(result))
        elif args.evaluation == "ppl":
            result = module.run(loaded.model, loaded.tokenizer, options, documents, progress=progress)
            out.csv("ppl.csv", result["rows"])
            out.png("ppl.png", module.curve(result["rows"]))
            for length, s in result["summary"].items():
                print(f"window {length}: perplexity {s['ppl']:.3f} over {s['windows']} window(s)")
        else:
            result = module.run(loaded.model, loaded.tokenizer, options, manager=options.manager)
            out.csv("harness.csv", result["rows"])
            out.png("harness.png", module.bars(result["rows"]))
            for row in result["rows"]:
                print(f"{row['task']} {row['metric']} ({row['filter']}): {row['value']:.4f}")
        out.json("results.json", {"model": loaded.source, "evaluation": args.evaluation,
                                  **{k: v for k, v in result.items() if k != "rows"}})
        out.commit()
    except StorageError as error:
        out.abandon()
        raise error.with_intact(f"nothing was written to --out {args.out} (an earlier one is as it was)") from None
    except BaseException:
        out.abandon()
        raise
    print(f"logo.eval: wrote {args.out}")
    return 0


def niah_table(result) -> str:
    """The per-length recall / exact match table of a NIAH run (all depths)."""
    lines = [f"{'mode':<8}{'length':>8}{'recall':>9}{'exact':>8}"]
    for cell in sorted((c for c in result["cells"] if c["depth"] == "all"), key=lambda c: (c["mode"], c["length"])):
        lines.append(f"{cell['mode']:<8}{cell['length']:>8}{cell['recall']:>9.1%}{cell['exact_match']:>8.1%}")
    if "retrieval_score" in result["summary"]:
        lines.append(f"retrieval score {result['summary']['retrieval_score']:.3f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli("logo.eval", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
