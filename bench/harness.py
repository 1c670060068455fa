"""Shared benchmark harness: one fresh process per measured case, warm-up, medians, peak RSS, CSV, plots.

A bench script defines its cases and a ``measure(case) -> dict`` function that runs *in the worker
process*; ``run_cases`` starts ``python SCRIPT --worker JSON`` for each case so that every method starts
from a clean heap and its peak RSS (``ru_maxrss`` over the baseline taken just before the first call) is
its own. Results are appended to a CSV as they come, so an interrupted sweep keeps what it measured.
"""
from __future__ import annotations

import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Resets this process's resident-memory high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """High-water mark of resident memory since the last :func:`reset_peak_rss` (or process start)."""
    try:
        return _status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_runs(step: Callable[[], None], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """Runs ``step`` warmup + repeats times; returns median / min / max seconds of the timed runs and the
    peak resident memory over the resident memory just before the first call (warm-up included: it
    allocates the same). The high-water mark is reset first, so setting up the inputs does not count."""
    baseline = current_rss_bytes()
    if not reset_peak_rss():
        baseline = peak_rss_bytes()  # no reset: the best we can do is the high-water mark so far
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
        "times": times,
        "peak_extra_mib": (peak_rss_bytes() - baseline) / 2**20,
    }


def time_runs_cuda(step: Callable[[], None], repeats: int, warmup: int = 1) -> Dict[str, float]:
    """:func:`time_runs` for CUDA work: synchronises around every run and reports the peak of
    ``torch.cuda.max_memory_allocated`` over the memory allocated before the first call."""
    import torch

    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "times": times, "peak_extra_mib": (torch.cuda.max_memory_allocated() - baseline) / 2**20}


def worker_main(measure: Callable[[dict], dict]) -> None:
    """Entry of a worker process: ``SCRIPT --worker '<case json>'`` prints one JSON line of results."""
    case = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    result = measure(case)
    print("RESULT " + json.dumps(result), flush=True)


def run_case(script: str, case: dict, timeout_s: float) -> dict:
    """Measures one case in a fresh process; returns case + results, or case + an ``error``."""
    cmd = [sys.executable, script, "--worker", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {**case, "error": f"timeout after {timeout_s:.0f}s"}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**case, "error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return {**case, **json.loads(lines[-1][len("RESULT "):])}


def _groups(cases: List[dict], series: str) -> List[List[dict]]:
    """Consecutive cases that differ only in ``series`` (e.g. the methods of one shape)."""
    groups: List[List[dict]] = []
    key = lambda c: {k: v for k, v in c.items() if k not in (series, "skip")}  # noqa: E731
    for case in cases:
        if groups and key(groups[-1][0]) == key(case):
            groups[-1].append(case)
        else:
            groups.append([case])
    return groups


def _pool(case: dict, results: List[dict]) -> dict:
    """One row from a case's per-round results: times pooled, peak memory the largest seen."""
    errors = [r["error"] for r in results if "error" in r]
    if errors or not results:
        return {**case, "error": errors[0] if errors else case.get("skip", "not run")}
    times = [t for r in results for t in r["times"]]
    return {**case, "rounds": len(results), "runs": len(times), "median_s": statistics.median(times),
            "min_s": min(times), "max_s": max(times), "peak_extra_mib": max(r["peak_extra_mib"] for r in results)}


def run_cases(script: str, cases: Iterable[dict], csv_path: str, timeout_s: float = 1800, rounds: int = 1,
              series: str = "method", log: Callable[[str], None] = print) -> List[dict]:
    """Runs every case in fresh processes and writes one row per case to ``csv_path`` (atomically).

    Cases that differ only in ``series`` form a group; each of ``rounds`` rounds runs every case of the
    group once, one process each, so that machine drift over minutes (~30% here) hits every method
    alike; a case's timed runs are pooled over the rounds (median, min, max).
    """
    rows: List[dict] = []
    for group in _groups(list(cases), series):
        results: List[List[dict]] = [[] for _ in group]
        for _ in range(rounds):
            for i, case in enumerate(group):
                if case.get("skip") or any("error" in r for r in results[i]):
                    continue
                results[i].append(run_case(script, case, timeout_s))
        for case, case_results in zip(group, results):
            row = _pool(case, case_results)
            row.pop("skip", None)
            rows.append(row)
            write_csv(rows, csv_path)
            log(format_row(row))
    return rows


def format_row(row: dict) -> str:
    keys = [k for k in row if k not in ("median_s", "min_s", "max_s", "peak_extra_mib", "error", "skip", "rounds",
                                        "runs", "repeats", "threads")]
    head = " ".join(f"{k}={row[k]}" for k in keys)
    if "error" in row:
        return f"{head}: skipped ({row['error']})"
    return f"{head}: {row['median_s']:.3f}s median, +{row['peak_extra_mib']:.0f} MiB peak RSS"


def write_csv(rows: List[dict], path: str) -> None:
    """Writes rows (union of keys, first-seen order) to ``path`` via a temp file + rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fields: List[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".csv.tmp")
    with os.fdopen(fd, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def available_memory_bytes() -> Optional[int]:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def memory_skip_reason(need_bytes: float, device: str = "cpu") -> Optional[str]:
    """Why a case needing ``need_bytes`` cannot run here (over 80% of the available host memory, or of the
    free GPU memory for ``device="cuda"``), or None."""
    if device == "cuda":
        import torch

        available = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    else:
        available = available_memory_bytes()
    if available is not None and need_bytes > 0.8 * available:
        return f"does not fit: needs ~{need_bytes / 2**30:.0f} GiB, {available / 2**30:.0f} GiB available"
    return None


def save_figure(fig, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".png.tmp")
    os.close(fd)
    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    os.replace(tmp, path)


def add_relative(rows: List[dict], group_keys: Iterable[str], baseline: str = "naive",
                 series: str = "method") -> None:
    """Adds ``time_vs_<baseline>`` and ``memory_vs_<baseline>`` to measured rows, per group of rows that
    share ``group_keys`` (e.g. one shape)."""
    group_keys = tuple(group_keys)
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        if not r.get("error"):
            groups.setdefault(tuple(r.get(k) for k in group_keys), {})[r[series]] = r
    for members in groups.values():
        base = members.get(baseline)
        if base is None:
            continue
        for r in members.values():
            r[f"time_vs_{baseline}"] = round(float(r["median_s"]) / float(base["median_s"]), 3)
            r[f"memory_vs_{baseline}"] = round(float(r["peak_extra_mib"]) / max(float(base["peak_extra_mib"]), 1e-9), 3)


def plot_sweep(rows: List[dict], path: str, *, x: str, panel_keys: Iterable[str], series: str = "method",
               series_order: Optional[List[str]] = None, title: str = "") -> None:
    """Two rows of log-log panels (median time, peak RSS) vs ``x``, one column per distinct value of
    ``panel_keys``, one line per ``series`` value; skipped / failed rows are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel_keys = tuple(panel_keys)
    ok = [r for r in rows if not r.get("error")]
    panels = sorted({tuple(str(r.get(k)) for k in panel_keys) for r in ok})
    if not panels:
        return
    names = series_order or sorted({r[series] for r in ok})
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 8), squeeze=False)
    for col, panel in enumerate(panels):
        label = ", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel))
        for name in names:
            pts = sorted((float(r[x]), float(r["median_s"]), max(float(r["peak_extra_mib"]), 0.1)) for r in ok
                         if r[series] == name and tuple(str(r.get(k)) for k in panel_keys) == panel)
            if pts:
                xs, secs, mib = zip(*pts)
                axes[0][col].plot(xs, secs, marker="o", label=name)
                axes[1][col].plot(xs, mib, marker="o", label=name)
        axes[0][col].set_title(f"{title} time\n{label}", fontsize=9)
        axes[1][col].set_title(f"{title} peak RSS over baseline\n{label}", fontsize=9)
        axes[0][col].set_ylabel("seconds (median)")
        axes[1][col].set_ylabel("MiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(x)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)
    plt.close(fig)


def save_results(rows: List[dict], prefix: str, **plot_kwargs) -> None:
    """Writes ``PREFIX.csv`` and the ``PREFIX.png`` sweep plot (``plot_sweep`` arguments) and says so."""
    write_csv(rows, prefix + ".csv")
    plot_sweep(rows, prefix + ".png", **plot_kwargs)
    print(f"wrote {prefix}.csv and {prefix}.png")


def script_main(main: Callable[[], None], measure: Callable[[dict], dict]) -> None:
    """Entry point of a bench script: a worker process measures one case, otherwise the sweep runs."""
    if "--worker" in sys.argv:
        worker_main(measure)
    else:
        main()


def add_run_arguments(parser, default_out: str) -> None:
    """The harness's own options, shared by every bench script: rounds, repeats, threads, timeout, out."""
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds over the methods of a shape (one process per method per round)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per process, after one warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    parser.add_argument("--out", default=os.path.join(RESULTS_DIR, default_out),
                        help="output prefix: writes PREFIX.csv and PREFIX.png")
