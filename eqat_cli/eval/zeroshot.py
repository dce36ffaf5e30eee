"""Zero-shot accuracy through lm-evaluation-harness, on the model object eqat loaded.

The loaded model (full precision or with :class:`~eqat_cli.quant.linear.PackedLinear` layers) is
wrapped in lm-eval's ``HFLM`` as is, so lm-eval scores exactly what eqat runs.

Two task sources:

* **data dir set** (``--data-dir`` / ``EQAT_DATA_DIR``): the ``*_local`` task configs shipped in
  ``eqat_cli/eval/tasks/`` read the local copies. They use the same prompts, choices, targets
  and metrics as lm-eval's standard tasks; PIQA and ARC-Easy are the same data, HellaSwag is
  llama.cpp's pre-processed text form and is therefore reported as ``hellaswag_local``.
* **no data dir**: lm-eval's own standard tasks, which download from the Hub. Names eqat knows
  load from their task folders only (fast); any other lm-eval task name needs lm-eval's full
  index (about 12 s).

No Rich, no typer: progress goes through :class:`eqat_cli.progress.Progress` as
``("task", {"label": task key, "done": requests scored, "total": requests})``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from eqat_cli.errors import BadInputError, EqatError, MissingDependencyError
from eqat_cli.hub import hub_access
from eqat_cli.progress import Progress, count
from eqat_cli.registry import get_registry

TASKS_DIR = Path(__file__).parent / "tasks"
DATA_DIR_KEY = "eqat_data_dir"  # metadata key read by tasks/local_data.py

HELLASWAG_NOTE = (
    "local HellaSwag is llama.cpp's pre-processed text form (hellaswag_val_full.txt), not the "
    "original JSONL: the query is activity_label + ': ' + ctx without lm-eval's "
    "ctx_b.capitalize(), so accuracy is close to, but not identical with, lm-eval `hellaswag`"
)

# user-facing name -> (task config in eqat_cli/eval/tasks, results key, note)
LOCAL_TASKS: dict[str, tuple[str, str, Optional[str]]] = {
    "piqa": ("piqa_local", "piqa", None),
    "arc_easy": ("arc_easy_local", "arc_easy", None),
    "hellaswag": ("hellaswag_local", "hellaswag_local", HELLASWAG_NOTE),
}
# user-facing name -> folder of lm-eval's standard task (loaded without the full index)
STANDARD_TASK_DIRS = {"piqa": "piqa", "arc_easy": "arc", "hellaswag": "hellaswag"}



@dataclass
class TaskPlan:
    """One requested task, resolved to an lm-eval task and a data source (nothing loaded yet)."""

    name: str  # as requested
    key: str  # key in results
    lm_eval_task: str
    include_path: Optional[Path]  # folder to index; None = lm-eval's full index
    source: str
    local: bool
    note: Optional[str] = None


@dataclass
class TaskResult:
    key: str
    task: str  # lm-eval task name
    acc: Optional[float]
    acc_stderr: Optional[float]
    acc_norm: Optional[float]
    acc_norm_stderr: Optional[float]
    n: int
    n_total: int
    seconds: float
    source: str
    note: Optional[str] = None
    metrics: dict = field(default_factory=dict)  # every metric lm-eval reported
    samples: Optional[list] = None  # per-document log-likelihoods (log_samples=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("samples")
        return d


# ---------------------------------------------------------------------- planning


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or spec.origin is None:
        raise MissingDependencyError("lm-eval", "zero-shot evaluation", "pip install lm-eval")
    return Path(spec.origin).parent / "tasks"


@functools.lru_cache(maxsize=4)
def _task_manager(include: tuple[str, ...], include_defaults: bool, data_dir: Optional[str]):
    from lm_eval.tasks import TaskManager

    meta = {DATA_DIR_KEY: data_dir} if data_dir else None
    with quiet_lm_eval():
        return TaskManager(
            include_path=list(include) or None, include_defaults=include_defaults, metadata=meta
        )


def _local_files(name: str, data_dir: Path) -> list[Path]:
    spec = get_registry().dataset(name)
    return [Path(data_dir) / rel for _, rel in sorted(spec.local_files.items())]


def plan_tasks(names: list[str], data_dir: Optional[Path]) -> list[TaskPlan]:
    """Resolve task names; raise a one-line :class:`EqatError` for anything unusable.

    Cheap for eqat's named tasks (checks files exist); an unknown name without a data dir is
    looked up in lm-eval's full task index.
    """
    plans: list[TaskPlan] = []
    for name in names:
        if data_dir is not None:
            if name not in LOCAL_TASKS:
                raise BadInputError(
                    f"unknown task {name!r}: with a data dir ({data_dir}) the local tasks are "
                    f"{', '.join(sorted(LOCAL_TASKS))}",
                    hint="unset --data-dir / EQAT_DATA_DIR to use any lm-eval task from the Hub",
                )
            files = _local_files(name, data_dir)
            for f in files:
                if not f.is_file():
                    raise EqatError(
                        f"no local copy of task {name!r}: expected file {f}",
                        hint="put the file there, or unset --data-dir / EQAT_DATA_DIR to use the Hub",
                    )
            task, key, note = LOCAL_TASKS[name]
            plans.append(TaskPlan(
                name, key, task, TASKS_DIR, "local:" + ",".join(map(str, files)), True, note
            ))
        elif name in STANDARD_TASK_DIRS:
            plans.append(TaskPlan(
                name, name, name, lm_eval_tasks_dir() / STANDARD_TASK_DIRS[name], "hub", False
            ))
        else:
            tm = _task_manager((), True, None)
            if name not in tm.all_tasks:
                raise BadInputError(
                    f"unknown task {name!r}: not an eqat task ({', '.join(sorted(LOCAL_TASKS))}) "
                    "nor an lm-eval task, group or tag",
                    hint="`lm-eval ls tasks` lists lm-eval's tasks",
                )
            plans.append(TaskPlan(name, name, name, None, "hub", False))
    keys = [p.key for p in plans]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise BadInputError(f"task listed twice: {', '.join(dup)}")
    return plans


# ---------------------------------------------------------------------- running


class quiet_lm_eval:
    """Silence lm-eval's INFO/WARNING chatter and its per-task tqdm bar (restored afterwards).

    eqat draws its own progress bar; lm-eval's request-building loop calls ``tqdm``
    unconditionally, so the ``tqdm`` name in that one module is swapped for the duration.
    """

    def __enter__(self):
        import lm_eval.api.task as task_mod

        self.logger = logging.getLogger("lm_eval")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)
        self.task_mod = task_mod
        self.tqdm = getattr(task_mod, "tqdm", None)
        if self.tqdm is not None:
            task_mod.tqdm = functools.partial(self.tqdm, disable=True)
        return self

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        if self.tqdm is not None:
            self.task_mod.tqdm = self.tqdm
        return False


def make_lm(model: Any, tokenizer: Any, batch_size: int = 1, max_length: Optional[int] = None):
    """lm-eval ``HFLM`` around an already-loaded model, reporting progress per model call."""
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.progress: Optional[Callable[[int, int], None]] = None
            self._done = 0
            self._total = 0

        def _report(self):
            if self.progress:
                self.progress(self._done, self._total)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            self._total, self._done = len(requests), 0
            self._report()
            out = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            self._done = self._total
            self._report()
            return out

        def _model_call(self, inps, attn_mask=None, labels=None):
            out = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            # Requests sharing a context share a row; the count catches up at the end.
            self._done = min(self._total, self._done + int(inps.shape[0]))
            self._report()
            return out

    if batch_size < 1:
        raise BadInputError(f"--batch-size must be at least 1, got {batch_size}")
    with quiet_lm_eval():
        return ProgressHFLM(
            pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=batch_size,
            max_length=max_length,
        )


def _metric(res: dict, name: str) -> Optional[float]:
    v = res.get(f"{name},none")
    return float(v) if isinstance(v, (int, float)) else None


def run_task(
    lm: Any,
    plan: TaskPlan,
    data_dir: Optional[Path],
    limit: Optional[int] = None,
    progress: Optional[Progress] = None,
    log_samples: bool = False,
) -> list[TaskResult]:
    """Evaluate one planned task (a group or tag yields one result per sub-task)."""
    from lm_eval.evaluator import evaluate

    if limit is not None and limit < 1:
        raise BadInputError(f"--limit must be at least 1, got {limit}")
    t0 = time.perf_counter()
    include = (str(plan.include_path),) if plan.include_path else ()
    tm = _task_manager(include, plan.include_path is None, str(data_dir) if plan.local else None)

    with quiet_lm_eval():
        try:
            with hub_access(datasets=True) if not plan.local else contextlib.nullcontext() as offline:
                loaded = tm.load([plan.lm_eval_task])
        except EqatError:
            raise
        except Exception as e:  # dataset download / parse failures surface here
            first = (str(e).splitlines() or [type(e).__name__])[0]
            if offline:
                first = f"{offline} and no cached copy exists"
            where = "the local copy" if plan.local else "the Hugging Face Hub"
            raise EqatError(
                f"cannot load task {plan.name!r} from {where}: {first}",
                hint=None if plan.local else "pass --data-dir / set EQAT_DATA_DIR to local copies",
            ) from e
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=1234)
        lm.progress = (lambda d, t: count(progress, "task", plan.key, d, t)) if progress else None
        try:
            out = evaluate(lm=lm, task_dict=loaded, limit=limit, log_samples=log_samples)
        finally:
            lm.progress = None
    seconds = time.perf_counter() - t0
    results = []
    for tname, res in out["results"].items():
        if tname not in loaded["tasks"]:
            continue  # group aggregates
        task_obj = loaded["tasks"][tname]
        n = out.get("n-samples", {}).get(tname, {})
        source = plan.source
        if not plan.local:
            ds = task_obj.config.dataset_path
            source = f"hub:{ds}" + (f" ({task_obj.config.dataset_name})" if task_obj.config.dataset_name else "")
        key = plan.key if len(loaded["tasks"]) == 1 else tname
        results.append(TaskResult(
            key=key,
            task=tname,
            acc=_metric(res, "acc"),
            acc_stderr=_metric(res, "acc_stderr"),
            acc_norm=_metric(res, "acc_norm"),
            acc_norm_stderr=_metric(res, "acc_norm_stderr"),
            n=int(n.get("effective", 0)),
            n_total=int(n.get("original", 0)),
            seconds=seconds,
            source=source,
            note=plan.note,
            metrics={k: v for k, v in res.items() if k != "alias"},
            samples=out.get("samples", {}).get(tname) if log_samples else None,
        ))
    return results


def zeroshot(
    model: Any,
    tokenizer: Any,
    plans: list[TaskPlan],
    data_dir: Optional[Path] = None,
    limit: Optional[int] = None,
    batch_size: int = 1,
    progress: Optional[Progress] = None,
    log_samples: bool = False,
) -> list[TaskResult]:
    """Run every planned task on ``model``; results in plan order."""
    lm = make_lm(model, tokenizer, batch_size)
    out: list[TaskResult] = []
    for plan in plans:
        out.extend(run_task(lm, plan, data_dir, limit, progress, log_samples))
    return out
