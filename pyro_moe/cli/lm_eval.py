"""``pyro-moe lm-eval``: lm-evaluation-harness tasks (``--tasks``, local ones with ``--include-path``) under a saved
posterior, with the harness's results and pyro-moe's NLL, ECE, Brier, mutual information (and OoD AUROC with
``--ood-tasks``) of the multiple-choice tasks (needs ``pyro-moe[lm-eval]``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from pyro_moe.atomic_files import write_text_atomically
from pyro_moe.cli.errors import BadInput
from pyro_moe.cli.inputs import check_path, load_model
from pyro_moe.cli.options import add_allow_other_model, add_common, add_model_options, integer
from pyro_moe.cli.settings import CommandEntry, ModelOptions, RunOptions

__all__ = ["LmEvalOptions", "add_parser", "run_lm_eval"]


@dataclass(frozen=True)
class LmEvalOptions:
    """``lm-eval``: the model, the ``--tasks`` and ``--ood-tasks`` (comma-separated, as typed), ``--include-path``,
    ``--limit`` per task, and the saved ``--posterior`` with its predictive ``--mode`` and ``--batch-size``."""

    run: RunOptions
    model: ModelOptions
    tasks: str
    ood_tasks: str | None = None
    include_path: Path | None = None
    limit: int | None = None
    posterior: Path | None = None
    mode: str = "model-average"
    batch_size: int = 4
    allow_other_model: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``lm-eval`` and its options."""
    harness = commands.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks with a posterior, and their calibration from the logged samples"
    )
    add_model_options(harness)
    tasks = harness.add_argument_group("tasks")
    tasks.add_argument("--tasks", required=True, help="harness task names, comma-separated, e.g. arc_easy,sciq")
    tasks.add_argument("--ood-tasks", help="tasks whose questions are out of distribution (OoD AUROC), comma-separated")
    tasks.add_argument("--include-path", type=Path, help="a folder of local task YAML files")
    tasks.add_argument("--limit", type=integer(1), help="at most this many questions per task")
    scoring = harness.add_argument_group("posterior")
    scoring.add_argument("--posterior", type=Path, help="a posterior folder written by pyro-moe fit (default: none)")
    scoring.add_argument(
        "--mode",
        choices=("model-average", "routing-average"),
        default="model-average",
        help="predictive mode (default model-average)",
    )
    scoring.add_argument(
        "--batch-size", type=integer(1), default=4, help="choices of one question per pass (default 4)"
    )
    add_allow_other_model(harness)
    add_common(harness, "S, posterior samples per question (default 8)")
    harness.set_defaults(run=CommandEntry(LmEvalOptions, run_lm_eval), samples=8)


def _task_names(text: str | None, option: str) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if text is not None and not names:
        raise BadInput(f"{option} needs comma-separated task names, got {text!r}.")
    return names


def run_lm_eval(options: LmEvalOptions) -> None:
    """``lm-eval``: the harness's tasks (:func:`lm_eval.simple_evaluate`) with the ``pyro-moe`` model
    (:mod:`pyro_moe.integrations.lm_eval`) under ``--posterior`` (default the plain model); writes the harness's
    ``results.json`` and its logged samples, and pyro-moe's calibration of the multiple-choice tasks
    (:mod:`pyro_moe.integrations.lm_eval_metrics`) as ``pyro_moe_metrics.json`` and ``pyro_moe_metrics.md``."""
    tasks, ood_tasks = _task_names(options.tasks, "--tasks"), _task_names(options.ood_tasks, "--ood-tasks")
    if set(tasks) & set(ood_tasks):
        raise BadInput(f"tasks both in --tasks and --ood-tasks: {sorted(set(tasks) & set(ood_tasks))}.")
    if options.include_path is not None:
        check_path(options.include_path, "include-path")
    if options.posterior is not None:
        check_path(options.posterior, "posterior")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable

        from pyro_moe.integrations.lm_eval import PyroMoELM
        from pyro_moe.integrations.lm_eval_metrics import choice_report, choice_sets, markdown_table
    except ImportError:
        raise BadInput("lm-eval needs lm-evaluation-harness: pip install 'pyro-moe[lm-eval]'.") from None
    manager = TaskManager(include_path=None if options.include_path is None else str(options.include_path))
    unknown = [name for name in tasks + ood_tasks if name not in manager.all_tasks]
    if unknown:
        raise BadInput(f"unknown harness tasks {unknown}; `lm_eval ls tasks` lists them (local ones: --include-path).")
    model, tokenizer, _ = load_model(options.model)
    if options.posterior is not None:
        from pyro_moe.inference.fitting import FittedPosterior

        model = FittedPosterior.load(options.posterior, model, allow_other_model=options.allow_other_model)
    samples, seed, out = options.run.samples, options.run.seed, options.run.out
    lm = PyroMoELM(
        model=model,
        tokenizer=tokenizer,
        mode=options.mode,
        num_samples=samples,
        batch_size=options.batch_size,
        seed=seed,
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks + ood_tasks, task_manager=manager, limit=options.limit, log_samples=True
    )
    logged_samples = results.pop("samples")
    paths = [
        write_text_atomically(
            out / "results.json", json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
        )
    ]
    for task, logged in logged_samples.items():
        lines = "".join(json.dumps(sample, default=handle_non_serializable) + "\n" for sample in logged)
        paths.append(write_text_atomically(out / f"samples_{task}.jsonl", lines))
    choices = choice_sets({**results, "samples": logged_samples}, lm.draw_log_likelihoods)
    report = choice_report(choices, tasks, ood_tasks)
    report["settings"] = {"mode": options.mode, "num_samples": samples, "seed": seed, "limit": options.limit}
    table = markdown_table(report)
    paths.append(write_text_atomically(out / "pyro_moe_metrics.json", json.dumps(report, indent=2) + "\n"))
    paths.append(write_text_atomically(out / "pyro_moe_metrics.md", table))
    print(table, end="")
    print("written:", *paths)
