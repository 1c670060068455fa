"""The GPU check (``make gpu-check``): everything a GPU machine can tell us, in one command, inside 8 minutes on one
H200 (``--quick`` / ``GPU_CHECK=quick``: the tests and the op benchmark at N = 16K, inside 4 minutes).

GPU time is scarce (15 minutes a task, the machine's start included), so the check runs under a budget
(``--budget-s``: 450 s, quick 210 s): each stage gets what is left of it, capped at the stage's own limit, and a
stage that would not fit its minimum is skipped and said so. ``summary.md`` is rewritten after every stage, so a
run cut short still returns what it measured. Expected durations on one H200 (the stages' caps in brackets):
tests ~120 s [200 s], op benchmark ~90 s [150 s], filtering ~50 s [90 s], loss ~45 s [80 s], step ~45 s [80 s],
attention ~40 s [70 s].

1. the environment (GPU, capability, torch, Triton, CUDA) -> ``environment.json``;
2. the gpu-marked tests (``tests/test_gpu.py``: every backend mode vs float64 at bf16 / fp16 / fp32, N·V > 2^31,
   determinism, autotuned tiles, memory bounds) -> ``tests.xml`` and their counts;
3. the op benchmark (``bench_linear_logprobs.py --gpu``: bf16, D = 4096, V = 128256, N = 4K / 16K / 64K; ours
   deterministic and with one recomputation, naive, torch ``F.linear_cross_entropy``, Cut-Cross-Entropy, Liger;
   time, peak ``torch.cuda.max_memory_allocated``, TFLOP/s counted as 6·N·V·D), and gradient filtering
   (``--gpu-filter``: bf16 ``filter_eps="auto"`` on LM-like inputs at N = 16K, both Triton schedules with and without
   it, Cut-Cross-Entropy);
4. the loss benchmark (``bench_loss.py --gpu``) and one LOGO step of a 1B-scale Llama at 32K
   (``bench_step.py --gpu``);
5. ``summary.md``: the tables and the targets (at N = 16K: ours <= 0.8x the materialised baseline's time, <= 5% of
   its extra memory, faster than Cut-Cross-Entropy), CSV + PNG of every benchmark, all under ``--out``.

A peer that is not installed (Liger, Cut-Cross-Entropy: ``make gpu-wheels`` fetches their wheels where a network
exists) is skipped with the reason in its CSV row. ``--cpu-smoke`` runs every step on tiny CPU / interpreter shapes
(the tests use it). Exit code: 0 when the tests pass, 1 otherwise (the benchmarks run either way).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": None, "capability": None}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for module in ("cut_cross_entropy", "liger_kernel", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001 - a peer's absence is reported, not fatal
            info[module] = f"not installed ({type(error).__name__})"
    return info


def run(command, log, env=None, timeout=1800) -> int:
    """Runs ``command`` (output to the log); returns its exit code, or 124 when it ran past ``timeout``."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    started = time.time()
    try:
        code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        code = 124
    log.write(f"(exit {code} after {time.time() - started:.0f} s)\n\n")
    log.flush()
    return code


# (name, expected seconds on one H200, cap, minimum worth starting)
STAGES = [("tests", 120, 200, 60), ("linear_logprobs", 90, 150, 40), ("filter", 50, 90, 30), ("loss", 45, 80, 30),
          ("step", 45, 80, 30), ("attention", 40, 70, 25)]
QUICK_STAGES = ("tests", "linear_logprobs")


def test_counts(path: str) -> dict:
    if not os.path.isfile(path):
        return {"error": "no test report"}
    root = ElementTree.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def read_rows(path: str) -> list:
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _cell(value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "" if value is None else str(value)
    return f"{number:.4g}" if not number.is_integer() else str(int(number))


def table(rows: list, columns: list) -> str:
    if not rows:
        return "(no rows)\n"
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def targets(op_rows: list, n: int = 16384) -> list:
    """The issue's GPU targets at N = ``n``: (statement, measured, met)."""
    def row(method):
        return next((r for r in op_rows if r.get("method") == method and str(r.get("n")) == str(n)
                     and not r.get("error")), None)

    naive, cce = row("naive"), row("cce")
    out = []
    for method in ("ours_triton", "ours_triton_fast"):
        ours = row(method)
        if ours is None:
            out.append((f"{method} at N={n}", "not measured", False))
            continue
        if naive is not None:
            ratio = float(ours["median_s"]) / float(naive["median_s"])
            memory = float(ours["peak_extra_mib"]) / max(float(naive["peak_extra_mib"]), 1e-9)
            out.append((f"{method}: time <= 0.8x naive", f"{ratio:.2f}x", ratio <= 0.8))
            out.append((f"{method}: extra memory <= 5% of naive", f"{memory:.1%}", memory <= 0.05))
        if cce is not None:
            ratio = float(ours["median_s"]) / float(cce["median_s"])
            out.append((f"{method}: faster than Cut-Cross-Entropy", f"{ratio:.2f}x CCE's time", ratio < 1.0))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny CPU / interpreter shapes (tests the wiring)")
    parser.add_argument("--quick", action="store_true", help="the tests and the op benchmark at N = 16K only")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole check (450; quick 210)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    budget = args.budget_s if args.budget_s is not None else (210.0 if args.quick else 450.0)
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    info = environment()
    with open(os.path.join(args.out, "environment.json"), "w") as handle:
        json.dump(info, handle, indent=2)
    py = sys.executable
    log = open(os.path.join(args.out, "log.txt"), "w")
    run_args = ["--rounds", str(args.rounds), "--repeats", str(args.repeats)]
    if args.cpu_smoke:
        extras = {"linear_logprobs": ["--ns", "32", "--vocabs", "300", "--dim", "16", "--methods", "naive",
                                      "ours_torch", "ours_triton", "ours_triton_fast", "cce", "liger", "--device",
                                      "cpu"],
                  "loss": ["--tokens", "64", "--vocabs", "300", "--dim", "16", "--negatives", "2", "--heads",
                           "trainable"],
                  "step": ["--contexts", "32", "--negatives", "2", "--vocabs", "300", "--response", "8", "--dim",
                           "64", "--layers", "1"],
                  "attention": ["--prefixes", "64", "--response", "8", "--heads", "2", "--kv-heads", "1",
                                "--head-dim", "8"],
                  "filter": ["--ns", "32", "--vocabs", "300", "--dim", "16", "--inputs", "lm_like", "--methods",
                             "ours_triton", "ours_triton_filter", "--device", "cpu"]}
    else:
        extras = {"linear_logprobs": ["--gpu"] + (["--ns", "16384"] if args.quick else []),
                  "loss": ["--gpu", "--heads", "trainable", "frozen"], "step": ["--gpu"],
                  "attention": ["--gpu"],  # exact vs FlexAttention at 32K / 64K prefixes, 3 x 512-token responses
                  "filter": ["--gpu-filter"]}  # bf16 "auto" on LM-like inputs at N = 16K vs unfiltered and CCE
    scripts = {"linear_logprobs": "bench_linear_logprobs.py", "filter": "bench_linear_logprobs.py",
               "loss": "bench_loss.py", "step": "bench_step.py",
               "attention": "bench_attention.py"}
    env = dict(os.environ, TRITON_INTERPRET="1") if args.cpu_smoke else None  # the kernels' interpreter variant
    stages = [stage for stage in STAGES if not args.quick or stage[0] in QUICK_STAGES]
    tests, record = {"skipped": "--skip-tests"}, {}
    for name, expected, cap, minimum in stages:
        left = budget - (time.time() - started)
        if name == "tests" and args.skip_tests:
            record[name] = "skipped (--skip-tests)"
            continue
        if left < minimum and not args.cpu_smoke:
            record[name] = f"skipped: {left:.0f} s of the budget left, the stage needs {minimum} s at least"
            write_summary(args.out, info, started, tests, record)
            continue
        stage_started = time.time()
        timeout = max(minimum, min(cap, left)) if not args.cpu_smoke else 1800
        if name == "tests":
            report = os.path.join(args.out, "tests.xml")
            selection = ["tests/test_gpu.py", "-m", "gpu"] if not args.cpu_smoke else \
                ["tests/test_gpu.py", "-k", "cpu_suite", "-m", "gpu"]
            code = run([py, "-m", "pytest", "-q", *selection, f"--junitxml={report}", "-p", "no:cacheprovider"], log,
                       timeout=timeout)
            tests = test_counts(report) if code != 124 else {"error": f"cut at the stage's {timeout:.0f} s"}
        else:
            code = run([py, os.path.join(HERE, scripts[name]), *extras[name], *run_args, "--out",
                        os.path.join(args.out, name)], log, env=env, timeout=timeout)
        took = time.time() - stage_started
        record[name] = (f"{took:.0f} s (expected ~{expected} s on one H200)" +
                        ("" if code == 0 else f", exit {code}" + (" (cut at its time limit)" if code == 124 else "")))
        write_summary(args.out, info, started, tests, record)
    log.close()
    print(open(os.path.join(args.out, "summary.md")).read())
    print(f"wrote {args.out}/ (summary.md, environment.json, tests.xml, *.csv, *.png, log.txt)")
    failed = isinstance(tests, dict) and (tests.get("failures") or tests.get("errors") or "error" in tests)
    return 1 if failed else 0


def write_summary(out: str, info: dict, started: float, tests: dict, record: dict) -> None:
    """summary.md from what has run so far (rewritten after every stage, replaced atomically)."""
    op_rows = read_rows(os.path.join(out, "linear_logprobs.csv"))
    summary = [f"# GPU check — {info.get('device') or 'no CUDA device'}", "",
               f"torch {info['torch']} (CUDA {info['cuda']}), Triton {info.get('triton')}, capability "
               f"{info.get('capability')}; {time.time() - started:.0f} s so far.", "", "## Stages", ""]
    summary += [f"- {name}: {what}" for name, what in record.items()]
    summary += ["", f"## gpu-marked tests\n\n{json.dumps(tests)}", "",
                "## Targets (N = 16K, V = 128256, D = 4096, bf16)", ""]
    for statement, measured, met in targets(op_rows):
        summary.append(f"- {'met' if met else 'NOT met'}: {statement} — {measured}")
    summary += ["", "## Op: fwd + bwd with a per-token gradient", "",
                table(op_rows, ["method", "n", "median_s", "peak_extra_mib", "time_vs_naive", "memory_vs_naive",
                                "tflops_6nvd", "error"]),
                "## Gradient filtering (bf16, filter_eps=\"auto\", LM-like inputs, N = 16K)", "",
                table(read_rows(os.path.join(out, "filter.csv")),
                      ["method", "n", "median_s", "peak_extra_mib", "tflops_6nvd", "error"]),
                "## LOGO loss", "", table(read_rows(os.path.join(out, "loss.csv")),
                                          ["method", "head", "tokens", "negatives", "median_s", "peak_extra_mib",
                                           "time_vs_naive", "memory_vs_naive", "error"]),
                "## One LOGO step (1B-scale Llama, 32K context, M = 2)", "",
                table(read_rows(os.path.join(out, "step.csv")),
                      ["method", "context", "median_s", "peak_extra_mib", "time_vs_authors", "memory_vs_authors",
                       "error"]),
                "## Shared-prefix attention of one layer (32 / 8 heads of 128, 3 x 512-token responses)", "",
                table(read_rows(os.path.join(out, "attention.csv")),
                      ["method", "prefix", "median_s", "peak_extra_mib", "time_vs_exact", "memory_vs_exact",
                       "error"])]
    tmp = os.path.join(out, "summary.md.tmp")
    with open(tmp, "w") as handle:
        handle.write("\n".join(summary))
    os.replace(tmp, os.path.join(out, "summary.md"))


if __name__ == "__main__":
    sys.exit(main())
