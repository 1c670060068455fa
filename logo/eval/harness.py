"""``python -m logo.eval harness``: lm-evaluation-harness on the model as training saved it.

A thin wrapper: the model (HF directory or ``logo.train`` run: LoRA applied, the run's RoPE settings) is loaded
by :func:`logo.eval.loading.load_for_eval`, wrapped in lm-eval's ``HFLM`` and run with ``simple_evaluate`` on
``--tasks`` — built-in task names (LongBench, RULER, MMLU, ... where their data is reachable) or task YAMLs found
under ``--include-path`` (e.g. a YAML whose ``dataset_path: json`` points at a local JSONL file: offline).
The hub is never contacted (``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``). Needs ``pip install 'logo-kernels[eval]'``
(lm-eval pinned).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

from ..errors import ConfigError


@dataclass
class HarnessOptions:
    tasks: Sequence[str] = ()
    include_path: Optional[str] = None
    batch_size: int = 8
    max_length: Optional[int] = None
    limit: Optional[float] = None
    num_fewshot: Optional[int] = None
    apply_chat_template: bool = False
    seed: int = 0
    gen_kwargs: Dict = field(default_factory=dict)

    def validate(self) -> "HarnessOptions":
        if not self.tasks:
            raise ConfigError("--tasks names no task")
        if self.include_path is not None and not os.path.isdir(self.include_path):
            raise ConfigError(f"--include-path: {self.include_path} is not a directory")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self


def _offline() -> None:
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(name, "1")


def task_manager(options: HarnessOptions):
    """lm-eval's TaskManager over ``--include-path`` (or the built-in tasks); unknown task names are refused."""
    _offline()
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ConfigError(f"logo.eval harness needs lm-evaluation-harness: pip install 'logo-kernels[eval]' ({error})") from None
    manager = TaskManager(include_path=options.include_path, include_defaults=options.include_path is None)
    unknown = [t for t in options.tasks if t not in manager.all_tasks and not os.path.isfile(t)]
    if unknown:
        raise ConfigError(f"--tasks: unknown task(s) {unknown}" + (f" (none in {options.include_path})"
                                                                  if options.include_path else ""))
    return manager


def run(model, tokenizer, options: HarnessOptions, manager=None) -> Dict:
    """lm-eval's results for the tasks; returns {"results" (lm-eval's), "rows" (task, metric, value), "options"}."""
    options.validate()
    manager = manager or task_manager(options)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, max_length=options.max_length)
    results = simple_evaluate(model=lm, tasks=list(options.tasks), task_manager=manager, limit=options.limit,
                              num_fewshot=options.num_fewshot, apply_chat_template=options.apply_chat_template,
                              random_seed=options.seed, numpy_random_seed=options.seed, torch_random_seed=options.seed,
                              fewshot_random_seed=options.seed, bootstrap_iters=0, log_samples=False,
                              gen_kwargs=options.gen_kwargs or None)
    rows: List[dict] = []
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filter_name = key.split(",", 1)
            rows.append({"task": task, "metric": metric, "filter": filter_name, "value": float(value)})
    slim = {k: results[k] for k in ("results", "n-samples", "versions", "configs") if k in results}
    return {"options": asdict(options), "rows": rows, "results": _jsonable(slim)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def bars(rows: List[dict], title: str = ""):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    labels = [f"{r['task']}\n{r['metric']}" for r in rows]
    ax.bar(labels, [r["value"] for r in rows], color="tab:blue")
    ax.set_ylim(0, max([1.0] + [r["value"] for r in rows]))
    ax.set_title(f"{title} lm-eval".strip(), fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return fig
