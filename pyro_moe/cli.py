"""The ``pyro-moe`` command line: the demo, and the experiments on any HF MoE checkpoint and MCQA data.

Commands (``pyro-moe COMMAND --help`` lists the options of each):

* ``demo``: the offline demo on the embedded benchmark (:mod:`pyro_moe.experiments.demo`);
* ``stability``: routing stability under router-input noise and the susceptible layers;
* ``fit``: fit a guide family (SVI, or post-hoc for the Laplace families) and save the posterior;
  on MCQA questions (``--data``) or plain text (``--text``: one document per line, the next-token
  likelihood); or run a recipe by name on MCQA questions (``--recipe``: starting scale chosen on
  calibration questions, iwae with learned prior scales, a temperature per predictive mode;
  :mod:`pyro_moe.inference.recipes`);
* ``laplace``: ``fit`` with a Laplace family (``laplace``, ``kron-laplace``, ``expert-laplace``);
* ``evaluate``: calibration (and OoD detection with ``--ood-data``) of a saved posterior or of guide
  families fitted on the spot, against the deterministic model and temperature scaling; with
  ``--text``, the held-out perplexity of a saved posterior and of the deterministic model;
* ``diagnose``: ArviZ ``InferenceData`` (netCDF), ``az.summary`` and the collapse report of a saved posterior;
* ``compare``: calibration and OoD of several guide families side by side;
* ``bench``: latency, peak memory and FLOPs of the families' predictions;
* ``lm-eval``: lm-evaluation-harness tasks (``--tasks``, local ones with ``--include-path``) under a saved
  posterior, with the harness's results and pyro-moe's NLL, ECE, Brier, mutual information (and OoD AUROC
  with ``--ood-tasks``) of the multiple-choice tasks (needs ``pyro-moe[lm-eval]``);
* ``generate``: text after prompts with per-token predictive entropy and mutual information, under a saved
  posterior or the prior of ``--sites``: the uncertain tokens marked on the terminal, ``generations.jsonl``,
  ``generations.html`` (tokens shaded by mutual information) and ``generations.png``.

Without ``--model`` the embedded benchmark model is used, without ``--data`` its splits. A model is
loaded with ``AutoModelForCausalLM.from_pretrained`` (a local folder, or an HF id, downloaded as
transformers does when there is a network), remote code only with ``--trust-remote-code``.
Bad input ends with exit code 2 and a one-line reason, before anything but ``pyro-moe.log`` is
written into ``--out`` (a folder: an existing file there is refused). Every command locks ``--out``
first (:mod:`pyro_moe.run_lock`): a second command writing into the same folder is refused with exit
code 2 naming the first one's PID and command. ``evaluate`` and ``diagnose`` refuse a ``--posterior``
fitted on another model unless ``--allow-other-model`` (:mod:`pyro_moe.inference.checkpoint`). Data
rows that are skipped (broken lines, rows that fit no schema) are named by file line in a warning on
stderr and in the log.

``fit`` and ``laplace`` run data-parallel when a launcher starts several processes (torchrun,
accelerate launch; see :mod:`pyro_moe.distributed`): rank 0 writes the log, the posterior and the
summary. A process that died or stopped answering ends the others with exit code 1 within
``--timeout`` seconds.

    torchrun --nproc_per_node=4 -m pyro_moe fit --model path/to/moe --data train.jsonl --device cuda --out runs/fit

    pyro-moe fit --model path/to/moe --data train.jsonl --guide mfvr --layers susceptible --out runs/fit
    pyro-moe fit --model path/to/moe --data train.jsonl --calibration-data calib.jsonl --recipe mfvr-iwae-layer \
        --scale 0.75 --out runs/recipe
    python -m pyro_moe evaluate --model path/to/moe --posterior runs/fit/posterior --data test.jsonl --out runs/eval
    pyro-moe fit --model path/to/moe --text train.txt --guide mfvr --sites logits --out runs/text-fit
    pyro-moe evaluate --model path/to/moe --text held_out.txt --posterior runs/text-fit/posterior --out runs/text-eval
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_moe.atomic_files import remove_folder, write_atomically, write_text_atomically
from pyro_moe.errors import DataError, DistributedError, PyroMoEError
from pyro_moe.validation import check_integer, check_number

if TYPE_CHECKING:  # torch, transformers and the library load on first use: --help and bad input answer at once
    from torch import Tensor, nn

    from pyro_moe.data import MCQAExample, TextDataset
    from pyro_moe.distributed import DataParallel
    from pyro_moe.experiments.stability import StabilityResults
    from pyro_moe.inference.fitting import FittedPosterior
    from pyro_moe.inference.resume import CheckpointOptions

__all__ = ["DATA_PARALLEL_COMMANDS", "EXIT_BAD_INPUT", "EXIT_DISTRIBUTED", "EXIT_INTERRUPTED", "build_parser", "main"]

EXIT_BAD_INPUT = 2
EXIT_DISTRIBUTED = 1
"""Exit code of a data-parallel run whose collective failed (another process died or hung)."""
EXIT_INTERRUPTED = 130
"""Exit code after SIGINT (Ctrl-C), 128 + the signal's number as shells report it."""
CHECKPOINT_NAME = "checkpoint"
"""``fit`` and ``laplace`` write their run checkpoints into ``--out/checkpoint``."""
MIN_ROWS = 4
"""``--min-rows`` default: the fewest usable training rows (questions or documents) a fit accepts."""
CHECKPOINT_STEPS = 100
"""``--checkpoint-every`` default (:data:`pyro_moe.inference.resume.CHECKPOINT_STEPS`; the parser imports no torch)."""
CHECKPOINT_MINUTES = 5
"""The time cadence of the checkpoints (:data:`pyro_moe.inference.resume.CHECKPOINT_SECONDS`), for the help."""
RESUMABLE_OPTIONS = ("checkpoint_every", "device", "device_map", "timeout")
"""Options a ``--resume`` may change (besides ``--resume`` and ``--out``): they do not change what is fitted."""
DATA_PARALLEL_COMMANDS = ("fit", "laplace")
LOG_NAME = "pyro-moe.log"
DTYPES = ("bfloat16", "float16", "float32")
"""``--dtype`` choices (names of torch dtypes)."""
CALIBRATION_FRACTION = 4
"""With one ``--data`` file, ``evaluate`` fits temperature scaling on its first quarter and measures on the rest;
``fit --recipe`` (without ``--calibration-data``) chooses and calibrates on its first quarter and fits on the rest."""
DEFAULT_STEPS = 200
"""SVI steps of a guide fitted by name when ``--steps`` is not given (a recipe has its own)."""

logger = logging.getLogger("pyro_moe.cli")


class BadInput(PyroMoEError):
    """A command-line input that cannot be used."""


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _recipe_name(text: str) -> str:
    """An argparse ``type``: a registered recipe name, checked at parsing (the registry imports no torch)."""
    from pyro_moe.inference.recipes import named_recipe

    try:
        return named_recipe(text).name
    except PyroMoEError as error:
        raise argparse.ArgumentTypeError(str(error).removesuffix(".")) from None


def _integer(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``, refused at parsing (exit 2, one line)."""

    def parse(text: str) -> int:
        try:
            return check_integer("the value", int(text), minimum=minimum)
        except (ValueError, PyroMoEError):
            accepted = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
            raise argparse.ArgumentTypeError(f"must be {accepted}, got {text!r}") from None

    return parse


def _positive_number(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    try:
        return check_number("the value", float(text))
    except (ValueError, PyroMoEError):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None


# ---------------------------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """A command's model, tokenizer, answer-letter ids ``(choices,)`` and splits ``{name: questions}``."""

    model: nn.Module
    tokenizer: Any
    answer_token_ids: Tensor
    splits: dict[str, list[MCQAExample]]


@dataclass
class TextInputs:
    """A command's model, tokenizer and the documents of ``--text``."""

    model: nn.Module
    tokenizer: Any
    documents: TextDataset


def _check_path(value: str, what: str) -> None:
    """A value that names a local path (starts with ``.``, ``/`` or ``~``, or exists) must exist."""
    path = Path(value).expanduser()
    if value.startswith((".", "/", "~")) and not path.exists():
        raise BadInput(f"{what} {value}: no such file or folder.")


def check_out(out: Path) -> None:
    """``--out`` must be a folder or a path where one can be made: neither it nor a folder above it is a file."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == out else f"is under the file {path}"
            raise BadInput(f"--out {out} {where}: --out needs a folder (existing or new) to write the results into.")


def available_devices() -> list[str]:
    """The devices torch can use here: ``cpu``, every ``cuda:i``, ``mps`` and every ``xpu:i`` present."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        devices += [f"xpu:{index}" for index in range(xpu.device_count())]
    return devices


def check_device(text: str | None) -> None:
    """``--device`` must name a device that exists here (a type without an index: its first device); refused
    before any work with the devices that exist."""
    if text is None:
        return
    import torch

    devices = available_devices()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is not None:
        name = device.type if device.type in ("cpu", "mps") else f"{device.type}:{device.index or 0}"
        if name in devices:
            return
    reason = "is not a device type torch knows" if device is None else "is not available on this machine"
    raise BadInput(f"--device {text} {reason}; the devices here: {', '.join(devices)}.")


def join_process_group(args: argparse.Namespace) -> DataParallel | None:
    """Under a launcher (``WORLD_SIZE`` > 1) ``fit`` and ``laplace`` join the process group, where
    ``--device cuda`` means the process's own GPU; other commands run in one process only."""
    if args.command not in DATA_PARALLEL_COMMANDS:
        world_size = os.environ.get("WORLD_SIZE", "1")
        if world_size not in ("", "0", "1"):
            raise BadInput(
                f"{args.command} runs in one process, but WORLD_SIZE is {world_size}; only "
                f"{' and '.join(DATA_PARALLEL_COMMANDS)} run data-parallel (launch {args.command} with plain python)."
            )
        return None
    if args.device_map is not None and os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        raise BadInput(
            "--device-map spreads one model over every GPU, but a launcher started several processes: run one "
            "process with --device-map, or data-parallel processes with --device cuda (one GPU each)."
        )
    import torch

    from pyro_moe.distributed import init_distributed

    parallel = init_distributed(**({} if args.timeout is None else {"timeout": args.timeout}))
    if parallel is not None and args.device == "cuda" and torch.cuda.is_available():
        args.device = f"cuda:{torch.cuda.current_device()}"
    return parallel


def load_model(args: argparse.Namespace) -> tuple[nn.Module, Any, dict[str, list[MCQAExample]] | None]:
    """The model (eval mode), tokenizer and, for the embedded benchmark (no ``--model``), its
    splits; a ``--model`` must hold MoE routers of a registered family."""
    if args.model is None:
        from pyro_moe.experiments.benchmark_model import load_benchmark

        loaded = load_benchmark(device=args.device or "cpu")
        return loaded.model, loaded.tokenizer, {name: list(split) for name, split in loaded.benchmark.splits.items()}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyro_moe.core.families import find_moe_routers

    _check_path(args.model, "model")
    options: dict[str, Any] = {"dtype": getattr(torch, args.dtype), "trust_remote_code": args.trust_remote_code}
    if args.device_map is not None:
        options["device_map"] = args.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(args.model, **options)
        tokenizer = AutoTokenizer.from_pretrained(
            args.tokenizer or args.model, trust_remote_code=args.trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as error:
        reason = " ".join(str(error).split())
        raise BadInput(f"cannot load model {args.model}: {reason[:300]}") from None
    if args.device_map is None and args.device is not None:
        model = model.to(args.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    find_moe_routers(model)  # NoMoELayersError / UnsupportedFamilyError before any work
    return model.eval(), tokenizer, None


def _examples(source: str, split: str | None) -> list[MCQAExample]:
    from pyro_moe.data import load_mcqa

    _check_path(source, "data")
    return list(load_mcqa(source, split=split))


def load_inputs(args: argparse.Namespace, roles: Sequence[str]) -> Inputs:
    """Model, tokenizer and the splits of ``roles``: the embedded benchmark's, or from ``--data``
    (every role from the same questions, except a calibration role beside ``test`` (``evaluate``) or
    ``train`` (``fit --recipe``): the first quarter calibrates, the rest is the other role, see
    :data:`CALIBRATION_FRACTION`), ``--calibration-data`` (the calibration split, the whole of ``--data``
    the other role) and ``--ood-data`` (``near_ood`` ... one split per file). Every prompt is bounded by
    the model's positions before any work (:func:`bound_splits`)."""
    data = getattr(args, "data", None)
    calibration_data = getattr(args, "calibration_data", None)
    files: dict[str, tuple[list[MCQAExample], str]] = {}  # split name: its questions and their file
    if calibration_data is not None:
        files["calibration"] = (_examples(calibration_data, None), calibration_data)
    cut, other = False, None
    if data is not None:  # the data first: a bad file is refused before a large model loads
        examples = _examples(data, args.split)
        check_row_count(args, data, len(examples), "questions")
        other = next((role for role in ("test", "train") if role in roles), None)
        cut = "calibration" in roles and other is not None and calibration_data is None
        if cut and len(examples) < 2:
            raise DataError(f"{data}: needs at least 2 usable questions (calibration and {other}).")
        files["data"] = (examples, data)
        for number, path in enumerate(getattr(args, "ood_data", None) or []):
            files[f"ood_{number}_{Path(path).stem}"] = (_examples(path, None), path)
    elif args.model is not None:
        raise BadInput("--model needs --data (an MCQA file or data-set name); only the embedded benchmark has its own.")
    model, tokenizer, benchmark_splits = load_model(args)
    if data is None:
        files = {name: (split, f"the benchmark's {name} split") for name, split in benchmark_splits.items()} | files
    splits = bound_splits(args, model, tokenizer, files)
    if data is not None:
        examples = splits.pop("data")
        splits = {role: splits.get(role, examples) for role in ("train", "test", "calibration")} | splits
        if cut:
            at = max(1, len(examples) // CALIBRATION_FRACTION)
            splits["calibration"], splits[other] = examples[:at], examples[at:]
    from pyro_moe.experiments.evaluation import default_answer_token_ids

    letters = default_answer_token_ids(tokenizer, splits["test"])
    return Inputs(model, tokenizer, letters.to(model.get_input_embeddings().weight.device), splits)


def check_row_count(args: argparse.Namespace, source: str | Path, count: int, what: str) -> None:
    """``fit`` and ``laplace``: training data with fewer usable rows than ``--min-rows`` is refused."""
    floor = getattr(args, "min_rows", None)
    if floor is not None and count < floor:
        raise DataError(
            f"{source}: {count} usable {what}, fewer than --min-rows {floor}; give more data, or lower --min-rows "
            "to fit on these anyway."
        )


def bound_splits(
    args: argparse.Namespace, model: nn.Module, tokenizer: Any, files: dict[str, tuple[list[MCQAExample], str]]
) -> dict[str, list[MCQAExample]]:
    """The questions of ``files`` (``{name: (questions, where they come from)}``) with every prompt within
    the model's positions and one batch's token budget (:func:`pyro_moe.data.bound_prompts`): a longer one is
    refused before any work, naming its file and position, or cut with ``--truncate-prompts`` (a warning
    counts them)."""
    from pyro_moe.data import DEFAULT_BATCH_TOKENS, PromptLimit, bound_prompts, model_positions

    positions = model_positions(model)
    limit = PromptLimit(min(positions or DEFAULT_BATCH_TOKENS, DEFAULT_BATCH_TOKENS), args.truncate_prompts)
    return {
        name: bound_prompts(examples, tokenizer, limit, source=str(source))[0]
        for name, (examples, source) in files.items()
    }


def load_text_inputs(args: argparse.Namespace) -> TextInputs:
    """Model, tokenizer and the documents of ``--text`` (the file first: a bad one is refused before a
    large model loads)."""
    from pyro_moe.data import load_text

    if getattr(args, "ood_data", None):
        raise BadInput("--ood-data holds MCQA questions; with --text, evaluate measures perplexity only.")
    documents = load_text(args.text)
    check_row_count(args, args.text, len(documents), "documents")
    model, tokenizer, _ = load_model(args)
    return TextInputs(model, tokenizer, documents)


def text_batches_of(args: argparse.Namespace, inputs: TextInputs, limit: int) -> list[dict[str, Tensor]]:
    """Batches of ``--batch-size`` of the first ``limit`` documents, each cut to ``--max-length``
    tokens (default: 512, or the model's ``max_position_embeddings`` when fewer; more is refused)."""
    from pyro_moe.data import DEFAULT_MAX_LENGTH, text_batches

    positions = getattr(inputs.model.config, "max_position_embeddings", None)
    max_length = args.max_length or min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions is not None and max_length > positions:
        raise BadInput(
            f"--max-length {max_length} exceeds the model's {positions} positions (max_position_embeddings)."
        )
    documents = inputs.documents.documents[:limit]
    return list(text_batches(documents, inputs.tokenizer, args.batch_size, max_length=max_length))


def parse_sites(args: argparse.Namespace) -> dict[str, Any] | None:
    """``--sites`` (JSON, or comma-separated kinds) with ``--prior`` as the family of every sampled site."""
    sites: dict[str, Any] | None = None
    if args.sites is not None:
        text = args.sites.strip()
        try:
            parsed = json.loads(text) if text.startswith("{") else {kind.strip(): None for kind in text.split(",")}
        except json.JSONDecodeError as error:
            raise BadInput(
                f"--sites is not valid JSON ({error}); e.g. '{{\"logits\": 2.0}}' or logits,weight."
            ) from None
        sites = dict(parsed)
    if args.prior is not None:
        from pyro_moe.models.priors import prior_family

        prior_family(args.prior)  # unknown names: ConfigurationError listing PRIOR_FAMILIES
        if sites is None:
            raise BadInput("--prior needs --sites (the sites whose prior family it sets), e.g. --sites logits.")
        for kind, option in sites.items():
            if kind == "dropout":
                continue
            option = dict(option) if isinstance(option, dict) else ({} if option is None else {"scale": option})
            if "scale" not in option:
                from pyro_moe.models.bayesian_router import DEFAULT_SCALES, SiteKind

                option["scale"] = DEFAULT_SCALES[SiteKind(kind)]
            sites[kind] = {**option, "family": args.prior}
    return sites


def guide_steps(args: argparse.Namespace) -> int:
    """The SVI steps of a guide fitted by name: ``--steps``, or :data:`DEFAULT_STEPS` (``fit``'s ``--steps``
    defaults to none, so that ``--recipe`` keeps its recipe's own)."""
    return DEFAULT_STEPS if args.steps is None else args.steps


def check_guides(names: Sequence[str]) -> list[str]:
    """Every guide name parses against the registry (errors list the registered names)."""
    from pyro_moe.guides.registry import parse_guide

    for name in names:
        parse_guide(name)
    return list(names)


def deterministic_stability(args: argparse.Namespace, inputs: Inputs) -> StabilityResults:
    """The deterministic model's routing stability on the first ``--examples`` test questions and
    its ``--susceptible-k`` susceptible layers, by the library's rule at its default noise level
    (:func:`pyro_moe.evaluation.stability.susceptible_layers`,
    :data:`~pyro_moe.evaluation.stability.DEFAULT_GAMMA`): what ``stability`` reports and
    ``--layers susceptible`` picks."""
    from pyro_moe.experiments.stability import StabilitySettings, stability_experiment

    settings = StabilitySettings(
        examples=args.examples, k=args.susceptible_k, batch_size=args.batch_size, seed=args.seed
    )
    return stability_experiment(inputs.model, inputs.tokenizer, inputs.splits, {}, settings)


def resolve_layers(args: argparse.Namespace, inputs: Inputs | None) -> str | list[int]:
    """``--layers``: ``all``, indices, or ``susceptible`` (the layers :func:`deterministic_stability`
    picks on the MCQA ``inputs``; refused without them, i.e. with ``--text``)."""
    if args.layers == ["all"]:
        return "all"
    if args.layers == ["susceptible"]:
        if inputs is None:
            raise BadInput(
                "--layers susceptible ranks the layers' routing stability on MCQA questions; with --text give "
                "all or layer indices."
            )
        result = deterministic_stability(args, inputs)
        logger.info("susceptible layers: %s", result.susceptible)
        return result.susceptible
    try:
        layers = [int(layer) for layer in args.layers]
    except ValueError:
        raise BadInput(f"--layers takes 'all', 'susceptible' or layer indices, got {' '.join(args.layers)}.") from None
    repeated = sorted({layer for layer in layers if layers.count(layer) > 1})
    if repeated:
        raise BadInput(f"--layers {' '.join(args.layers)} names layer(s) {repeated} more than once; give each once.")
    return layers


def _fit(
    args: argparse.Namespace,
    inputs: Inputs,
    guides: Sequence[str],
    layers: Any,
    in_place: bool = False,
    checkpoint: CheckpointOptions | None = None,
) -> dict[str, FittedPosterior]:
    """The ``guides`` fitted as the options say: ``evaluate`` and ``compare`` fit every family on its own
    copy of the model (the deterministic model is measured beside them); ``fit`` and ``laplace`` patch
    the loaded model itself (``in_place``: the command owns it, so no second copy of the MoE is made)
    and write run checkpoints (``checkpoint``)."""
    from pyro_moe.experiments.evaluation import FitSettings, fit_named_families

    fitting = FitSettings(
        examples=args.fit_examples,
        sites=parse_sites(args),
        layers=layers,
        steps=guide_steps(args),
        batch_size=args.batch_size,
        seed=args.seed,
        validation_examples=args.examples,
        checkpoint=checkpoint,
    )
    return fit_named_families(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        guides,
        fitting,
        answer_token_ids=inputs.answer_token_ids,
        in_place=in_place,
    )


# ---------------------------------------------------------------------------------------------- commands


def run_demo(args: argparse.Namespace) -> None:
    """``demo``: the demo pipeline on the embedded benchmark."""
    from pyro_moe.experiments.demo import HEADLINE_COLUMNS, QUICK, DemoSettings
    from pyro_moe.experiments.demo import run_demo as demo
    from pyro_moe.experiments.evaluation import markdown_table

    settings = QUICK if args.quick else DemoSettings()
    settings = replace(
        settings,
        seed=args.seed,
        steps=args.steps or settings.steps,
        recipe_steps=args.steps or settings.recipe_steps,
        samples=args.samples or settings.samples,
    )
    headline = demo(args.out, settings)
    print(markdown_table(headline, HEADLINE_COLUMNS))
    print(f"written: {args.out / 'report.md'}")


def run_stability(args: argparse.Namespace) -> None:
    """``stability``: Jaccard stability per layer and the susceptible layers."""
    from pyro_moe.experiments.evaluation import write_results

    results = deterministic_stability(args, load_inputs(args, ["test"]))
    paths = write_results(results, args.out)
    print(f"susceptible layers: {results.susceptible}")
    print("written:", paths["metrics"], paths["report"])


def _fit_text(args: argparse.Namespace, guide: str, checkpoint: CheckpointOptions) -> FittedPosterior:
    """``fit --text``: ``guide`` fitted with the next-token likelihood on the first ``--fit-examples``
    documents, on the loaded model itself; the family, sites and layers are checked before the model loads."""
    from pyro_moe.guides.registry import parse_guide
    from pyro_moe.inference.presets import family_specs, fit_families
    from pyro_moe.models.likelihoods import LikelihoodKind

    for family in parse_guide(guide).values():
        family.check_likelihood(LikelihoodKind.NEXT_TOKEN)
    steps = guide_steps(args)
    specs = family_specs([guide], parse_sites(args), steps)
    layers = resolve_layers(args, None)
    inputs = load_text_inputs(args)
    batches = text_batches_of(args, inputs, args.fit_examples)
    posteriors = fit_families(
        inputs.model,
        batches,
        specs,
        answer_token_ids=None,
        layers=layers,
        steps=steps,
        seed=args.seed,
        in_place=True,
        checkpoint=checkpoint,
    )
    return posteriors[guide]


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    """The options that decide what ``fit`` computes (all but ``--out``, ``--resume`` and
    :data:`RESUMABLE_OPTIONS`), JSON-ready: a checkpoint keeps them and ``--resume`` compares them."""
    skipped = {"run", "out", "resume", *RESUMABLE_OPTIONS}
    options = {key: value for key, value in vars(args).items() if key not in skipped}
    return {key: str(value) if isinstance(value, Path) else value for key, value in sorted(options.items())}


def _option_text(key: str, value: Any) -> str:
    """``--key value`` as typed (a flag: ``--key`` or ``no --key``)."""
    flag = "--" + key.replace("_", "-")
    if isinstance(value, bool) or value is None:
        return flag if value else f"no {flag}"
    return f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"


def run_checkpoint(args: argparse.Namespace) -> CheckpointOptions:
    """The run checkpoints of ``fit`` (``--out/checkpoint``, every ``--checkpoint-every`` steps), checked
    before any work: ``--resume`` needs a checkpoint written with the same options (the first that differs
    is named); without ``--resume`` a checkpoint there (an unfinished fit) is refused rather than lost."""
    from pyro_moe.inference.resume import CheckpointOptions, read_checkpoint

    folder, options = args.out / CHECKPOINT_NAME, _run_options(args)
    saved = read_checkpoint(folder)  # also the copy a save killed between its renames set aside
    if saved is not None and not args.resume:
        config = saved[1]
        raise BadInput(
            f"{folder} holds the checkpoint of an unfinished fit (step {config['step_count']} of "
            f"{config.get('steps', '?')}): add --resume to continue it, or delete that folder to start over."
        )
    if saved is None and args.resume:
        finished = " (the fit there finished: its posterior/ is written)" if (args.out / "posterior").exists() else ""
        raise BadInput(f"--resume: no checkpoint in {folder}{finished}; run without --resume to start a fit.")
    if saved is not None:
        before = saved[1]["checkpoint"].get("run", {})
        for key in sorted(set(before) | set(options)):
            if before.get(key) != options.get(key):
                changeable = ", ".join("--" + name.replace("_", "-") for name in RESUMABLE_OPTIONS)
                raise BadInput(
                    f"--resume: the checkpoint in {folder} was written with {_option_text(key, before.get(key))}, "
                    f"this run has {_option_text(key, options.get(key))}; resume with the checkpoint's options "
                    f"(only {changeable} may change)."
                )
    return CheckpointOptions(folder, every=args.checkpoint_every, resume=args.resume, run=options)


def _model_record(args: argparse.Namespace, posterior_folder: Path) -> dict[str, Any]:
    """What ``fit.json`` says of the model: ``--model`` (or the embedded benchmark) and the fingerprint the
    posterior's manifest binds it to (configuration hash, SHA-256 per Bayesian MoE block)."""
    from pyro_moe.inference.checkpoint import MANIFEST

    fingerprint = json.loads((posterior_folder / MANIFEST).read_text()).get("model") or {}
    return {
        "model": args.model or "embedded benchmark",
        "model_config_sha256": fingerprint.get("config_sha256"),
        "model_weights_sha256": fingerprint.get("weights"),
    }


def run_fit(args: argparse.Namespace) -> None:
    """``fit`` and ``laplace``: one guide family, saved as ``posterior/`` (safetensors + JSON); on MCQA
    questions, or with ``--text`` on plain text (the next-token likelihood); ``fit --recipe``:
    :func:`run_recipe`."""
    if getattr(args, "recipe", None) is not None:
        run_recipe(args)
        return
    for option in ("calibration_data", "calibration_examples", "scale", "scale_grid", "selection"):
        if getattr(args, option, None) is not None:
            flag = "--" + option.replace("_", "-")
            raise BadInput(f"{flag} is for --recipe (its scale selection, checks and temperatures).")
    guide = args.guide or ("laplace" if args.command == "laplace" else "mean-field")
    from pyro_moe.guides.registry import GUIDE_FAMILIES

    post_hoc = [name for name, family in GUIDE_FAMILIES.items() if family.post_hoc]
    if args.command == "laplace" and guide not in post_hoc:
        raise BadInput(f"laplace fits the post-hoc families {', '.join(post_hoc)}; got --guide {guide}.")
    check_guides([guide])
    parse_sites(args)
    checkpoint = run_checkpoint(args)
    if args.text is not None:
        posterior = _fit_text(args, guide, checkpoint)
    else:
        inputs = load_inputs(args, ["train"])
        layers = resolve_layers(args, inputs)
        posterior = _fit(args, inputs, [guide], layers, in_place=True, checkpoint=checkpoint)[guide]
    folder = posterior.save(args.out / "posterior")  # data-parallel: rank 0 writes
    if posterior.data_parallel is not None and not posterior.data_parallel.is_main:
        return
    remove_folder(checkpoint.folder)  # the posterior holds the same state
    last = posterior.history[-1] if posterior.history else {}
    processes = 1 if posterior.data_parallel is None else posterior.data_parallel.world_size
    summary = {"guide": guide, "layers": posterior.config["layers"], **_model_record(args, folder)}
    summary["processes"] = processes
    summary["likelihood"] = posterior.config["likelihood"]
    summary["last_step"] = last
    write_text_atomically(args.out / "fit.json", json.dumps(summary, indent=2) + "\n")
    print(f"{guide} on layers {posterior.config['layers']}: {len(posterior.history)} steps; written: {folder}")


def run_recipe(args: argparse.Namespace) -> None:
    """``fit --recipe``: the recipe on the loaded model itself (:func:`pyro_moe.inference.recipes.run_recipe`)
    on ``--fit-examples`` train questions, choosing (over ``--scale-grid``, or from ``--scale``; default the
    recipe's grid), checking and calibrating on ``--calibration-examples`` calibration questions (default all);
    writes ``posterior/`` (calibrated, with the recipe and the selection), ``fit.json``, ``recipe.md`` and
    ``scales.png`` (the learned scales' trajectory)."""
    from pyro_moe.experiments.evaluation import FitSettings, fit_named_recipes

    if args.sites is not None or args.prior is not None:
        raise BadInput("--recipe patches its own logit sites (learned prior scales); drop --sites and --prior.")
    if args.text is not None:
        raise BadInput("--recipe fits MCQA questions (its temperatures calibrate answers); --text is for --guide.")
    checkpoint = run_checkpoint(args)
    inputs = load_inputs(args, ["train", "calibration"])
    fitting = FitSettings(
        examples=args.fit_examples,
        layers=resolve_layers(args, inputs),
        batch_size=args.batch_size,
        seed=args.seed,
        validation_examples=args.calibration_examples,
        checkpoint=checkpoint,
    )
    (result,) = fit_named_recipes(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        [args.recipe],
        fitting,
        answer_token_ids=inputs.answer_token_ids,
        steps=args.steps,
        in_place=True,
        scale=args.scale,
        scale_grid=args.scale_grid,
        selection=args.selection,
    ).values()
    posterior = result.posterior
    folder = posterior.save(args.out / "posterior")  # data-parallel: rank 0 writes
    if posterior.data_parallel is not None and not posterior.data_parallel.is_main:
        return
    remove_folder(checkpoint.folder)  # the posterior holds the same state
    processes = 1 if posterior.data_parallel is None else posterior.data_parallel.world_size
    summary = {"guide": result.recipe.guide, "layers": posterior.config["layers"], **_model_record(args, folder)}
    summary |= {"processes": processes, "last_step": posterior.history[-1], **result.to_json()}
    write_text_atomically(args.out / "fit.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomically(args.out / "recipe.md", result.to_markdown())
    result.plot(args.out / "scales.png")
    chosen = result.selection.chosen
    temperatures = ", ".join(f"{mode} {scaling.temperature:.3f}" for mode, scaling in posterior.calibration.items())
    print(
        f"{args.recipe} on layers {posterior.config['layers']}: start scale {chosen.scale:g}, "
        f"{len(posterior.history)} steps, temperatures {temperatures or 'none'}; written: {folder}"
    )


def _posteriors(args: argparse.Namespace, inputs: Inputs, guides: Sequence[str]) -> dict[str, Any]:
    from pyro_moe.inference.fitting import FittedPosterior

    posteriors: dict[str, Any] = {}
    if getattr(args, "posterior", None) is not None:
        _check_path(str(args.posterior), "posterior")
        posteriors["posterior"] = FittedPosterior.load(
            args.posterior, copy.deepcopy(inputs.model), allow_other_model=args.allow_other_model
        )
    if guides:
        posteriors.update(_fit(args, inputs, guides, resolve_layers(args, inputs)))
    return posteriors


def evaluate_text(args: argparse.Namespace) -> None:
    """``evaluate --text``: held-out perplexity of ``--posterior`` (both modes where it has them) and of
    the deterministic model on the first ``--examples`` documents, written as ``perplexity/``."""
    from pyro_moe.experiments.evaluation import PredictionSettings, write_results
    from pyro_moe.experiments.perplexity import perplexity_experiment
    from pyro_moe.inference.fitting import FittedPosterior

    if args.guides:
        raise BadInput(
            "evaluate --text measures a saved --posterior (fit one with pyro-moe fit --text); --guides fits on "
            "MCQA questions."
        )
    if args.posterior is None:
        raise BadInput("evaluate --text needs --posterior (a folder written by pyro-moe fit).")
    if args.draws != "per-batch":
        raise BadInput("--draws per-question is for MCQA questions; evaluate --text draws per batch.")
    _check_path(str(args.posterior), "posterior")
    settings = PredictionSettings(num_samples=args.samples, seed=args.seed)
    inputs = load_text_inputs(args)
    batches = text_batches_of(args, inputs, args.examples)
    model = copy.deepcopy(inputs.model)
    posterior = FittedPosterior.load(args.posterior, model, allow_other_model=args.allow_other_model)
    results = perplexity_experiment(inputs.model, batches, {"posterior": posterior}, settings)
    paths = write_results(results, args.out / "perplexity")
    print(results.to_markdown())
    print("written:", paths["metrics"], paths["report"])


def run_evaluate(args: argparse.Namespace) -> None:
    """``evaluate`` and ``compare``: calibration, and OoD detection when there are OoD splits; ``evaluate
    --text``: held-out perplexity (:func:`evaluate_text`)."""
    from pyro_moe.experiments.calibration import CalibrationSettings, calibration_experiment
    from pyro_moe.experiments.evaluation import write_results
    from pyro_moe.experiments.ood import OoDSettings, ood_experiment

    if getattr(args, "text", None) is not None:
        evaluate_text(args)
        return
    guides = check_guides(args.guides or [])
    parse_sites(args)
    if args.command == "compare" and len(guides) < 2:
        raise BadInput("compare needs at least two --guides, e.g. --guides mean-field mfvr swag.")
    if args.command == "evaluate" and args.posterior is None and not guides:
        raise BadInput("evaluate needs --posterior (a folder written by pyro-moe fit) or --guides to fit.")
    inputs = load_inputs(args, ["calibration", "test"])
    ood_splits = [name for name in inputs.splits if "ood" in name]
    posteriors = _posteriors(args, inputs, guides)
    common = {"num_samples": args.samples, "batch_size": args.batch_size, "seed": args.seed, "draws": args.draws}
    calibration = calibration_experiment(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        posteriors,
        CalibrationSettings(test_examples=args.examples, **common),
        answer_token_ids=inputs.answer_token_ids,
    )
    paths = [write_results(calibration, args.out / "calibration")["report"]]
    if ood_splits:
        ood = ood_experiment(
            inputs.model,
            inputs.tokenizer,
            inputs.splits,
            posteriors,
            OoDSettings(ood_splits=ood_splits, examples=args.examples, **common),
            answer_token_ids=inputs.answer_token_ids,
        )
        paths.append(write_results(ood, args.out / "ood")["report"])
    print(calibration.to_markdown())
    print("written:", *paths)


def run_diagnose(args: argparse.Namespace) -> None:
    """``diagnose``: InferenceData (netCDF), its ``az.summary`` and the collapse report of a saved posterior."""
    from pyro_moe.diagnostics.arviz_export import to_inference_data
    from pyro_moe.diagnostics.collapse import collapse_report
    from pyro_moe.experiments.evaluation import split_batches
    from pyro_moe.inference.fitting import FittedPosterior

    _check_path(str(args.posterior), "posterior")
    inputs = load_inputs(args, ["test"])
    posterior = FittedPosterior.load(args.posterior, inputs.model, allow_other_model=args.allow_other_model)
    batches = split_batches(inputs.splits["test"], inputs.tokenizer, args.batch_size, args.examples)
    draws = args.samples or 100
    idata = to_inference_data(posterior, batches, num_draws=draws, seed=args.seed)
    report = collapse_report(posterior, batches, num_draws=draws, summary_draws=draws, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomically(args.out / "posterior.nc", idata.to_netcdf)
    write_atomically(args.out / "summary.csv", report.summary.to_csv)
    write_atomically(args.out / "collapse.csv", lambda path: report.table.to_csv(path, index=False))
    report.plot(args.out / "collapse.png")
    flags = {flag: report.flagged(flag) for flag in ("deterministic", "prior_collapse", "runaway_temperature")}
    flagged = {k: [list(v) for v in vs] for k, vs in flags.items()}
    write_text_atomically(args.out / "flags.json", json.dumps(flagged, indent=2))
    print(report.table.to_string(max_cols=8))
    print("written:", *(args.out / name for name in ("posterior.nc", "summary.csv", "collapse.csv", "collapse.png")))


def run_bench(args: argparse.Namespace) -> None:
    """``bench``: cost of the families' predictions (:mod:`pyro_moe.experiments.efficiency`)."""
    from pyro_moe.experiments.efficiency import EfficiencySettings, run_efficiency
    from pyro_moe.experiments.evaluation import FitSettings, write_results

    guides = check_guides(args.guides or ["mean-field", "mfvr"])
    settings = EfficiencySettings(num_samples=args.samples or 16, batch_size=args.batch_size, seed=args.seed)
    inputs = load_inputs(args, ["train", "test"])
    fitting = FitSettings(
        examples=args.fit_examples,
        sites=parse_sites(args),
        layers=resolve_layers(args, inputs),
        steps=args.steps,
        seed=args.seed,
    )
    results = run_efficiency(
        inputs.model,
        inputs.tokenizer,
        inputs.splits,
        guides,
        settings=settings,
        fitting=fitting,
        answer_token_ids=inputs.answer_token_ids,
    )
    paths = write_results(results, args.out)
    print(results.to_markdown())
    print("written:", paths["report"])


def read_prompts(args: argparse.Namespace) -> list[str]:
    """``--prompt`` or the non-empty lines of ``--prompts``; refused when there is none."""
    if args.prompt is not None:
        prompts = [args.prompt]
    else:
        _check_path(str(args.prompts), "prompts")
        if not args.prompts.is_file():
            raise BadInput(f"--prompts {args.prompts}: not a file (one prompt per line).")
        prompts = [line for line in args.prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts or not all(prompt.strip() for prompt in prompts):
        raise BadInput("no prompt to generate from: give --prompt TEXT or a --prompts file with one prompt per line.")
    return prompts


def generated_texts(generation: Any, tokenizer: Any, prompts: Sequence[str], input_ids: Tensor) -> list[Any]:
    """Every row of ``generation`` as a :class:`~pyro_moe.evaluation.token_report.GeneratedText`: each token's
    text piece is what it adds to the decoded text of the prompt's last token and the tokens before it
    (so the spaces and merges of word-level, BPE and SentencePiece tokenizers are kept)."""
    from pyro_moe.evaluation.token_report import GeneratedText

    texts = []
    for row, prompt in enumerate(prompts):
        length = int(generation.lengths[row])
        ids = generation.tokens[row, :length].tolist()
        context = input_ids[row, -1:].tolist()  # left padding: the prompt's last token
        decoded = [tokenizer.decode(context + ids[:end]) for end in range(length + 1)]
        pieces = [decoded[end][len(decoded[end - 1]) :] for end in range(1, length + 1)]

        def values(tensor: Any, row: int = row, length: int = length) -> list[float]:
            return [float(value) for value in tensor[row, :length]]

        texts.append(
            GeneratedText(
                prompt=prompt,
                pieces=pieces,
                token_ids=ids,
                probs=values(generation.token_probs),
                predictive_entropy=values(generation.predictive_entropy),
                expected_entropy=values(generation.expected_entropy),
                mutual_information=values(generation.mutual_information),
                stopped=bool(generation.stopped[row]),
            )
        )
    return texts


def run_generate(args: argparse.Namespace) -> None:
    """``generate``: text after every prompt with per-token entropy and mutual information
    (:func:`pyro_moe.inference.generation.generate`) under ``--posterior`` or the prior of ``--sites``;
    prints it with the uncertain tokens marked and writes ``generations.jsonl``, ``.html`` and ``.png``."""
    from pyro_moe.evaluation.token_report import (
        plot_token_uncertainty,
        terminal_text,
        uncertainty_threshold,
        write_html,
        write_jsonl,
    )

    prompts = read_prompts(args)
    if args.posterior is not None and (args.sites is not None or args.prior is not None or args.layers != ["all"]):
        raise BadInput("--posterior carries its own sites and layers: give --sites, --prior and --layers without it.")
    if not args.do_sample and (args.temperature is not None or args.top_p is not None):
        raise BadInput("--temperature and --top-p shape sampling: give them with --do-sample.")
    if args.top_p is not None and args.top_p > 1:
        raise BadInput(f"--top-p is a probability mass in (0, 1], got {args.top_p:g}.")
    if not 0.0 <= args.uncertain_quantile <= 1.0:
        raise BadInput(f"--uncertain-quantile must be in [0, 1], got {args.uncertain_quantile:g}.")
    sites = None if args.posterior is not None else (parse_sites(args) or {"logits": 2.0})
    layers = None if args.posterior is not None else resolve_layers(args, None)
    if sites is not None:
        from pyro_moe.models.bayesian_router import RouterSites

        RouterSites.parse(sites)  # a bad site or prior scale before the model loads
    if args.posterior is not None:
        _check_path(str(args.posterior), "posterior")
    model, tokenizer, _ = load_model(args)
    if args.posterior is not None:
        from pyro_moe.inference.fitting import FittedPosterior

        posterior = FittedPosterior.load(args.posterior, model, allow_other_model=args.allow_other_model)
        generate_with = posterior.generate
    else:
        from functools import partial

        from pyro_moe.inference.generation import generate
        from pyro_moe.models.router_patch import patch_routers

        generate_with = partial(generate, patch_routers(model, sites, layers=layers))
    options = {
        "max_new_tokens": args.max_new_tokens,
        "num_samples": args.samples,
        "mode": args.mode,
        "do_sample": args.do_sample,
        "temperature": 1.0 if args.temperature is None else args.temperature,
        "top_p": 1.0 if args.top_p is None else args.top_p,
        "stop_strings": args.stop or (),
        "tokenizer": tokenizer,
    }
    import pyro

    pyro.set_rng_seed(args.seed)  # one seeded stream for the whole run: every batch gets its own draws
    texts = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start : start + args.batch_size]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True)
        generation = generate_with(encoded["input_ids"], encoded["attention_mask"], **options)
        texts += generated_texts(generation, tokenizer, chunk, encoded["input_ids"])
    threshold = uncertainty_threshold(texts, args.uncertain_quantile)
    colour = sys.stdout.isatty()
    for text in texts:
        figures = text.summary()
        print(f"{text.prompt}{terminal_text(text, threshold, colour)}")
        print(
            f"  mean MI {figures['mean_mutual_information']:.4g}, max MI {figures['max_mutual_information']:.4g}, "
            f"mean entropy {figures['mean_predictive_entropy']:.4g}, log p {figures['log_prob_sum']:.4g} (nats)"
        )
    paths = [
        write_jsonl(texts, args.out / "generations.jsonl"),
        write_html(texts, args.out / "generations.html", threshold=threshold),
        plot_token_uncertainty(texts, args.out / "generations.png"),
    ]
    print(f"marked: mutual information >= {threshold:.4g} nats (quantile {args.uncertain_quantile:g})")
    print("written:", *paths)


def _task_names(text: str | None, option: str) -> list[str]:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    if text is not None and not names:
        raise BadInput(f"{option} needs comma-separated task names, got {text!r}.")
    return names


def run_lm_eval(args: argparse.Namespace) -> None:
    """``lm-eval``: the harness's tasks (:func:`lm_eval.simple_evaluate`) with the ``pyro-moe`` model
    (:mod:`pyro_moe.integrations.lm_eval`) under ``--posterior`` (default the plain model); writes the harness's
    ``results.json`` and its logged samples, and pyro-moe's calibration of the multiple-choice tasks
    (:mod:`pyro_moe.integrations.lm_eval_metrics`) as ``pyro_moe_metrics.json`` and ``pyro_moe_metrics.md``."""
    tasks, ood_tasks = _task_names(args.tasks, "--tasks"), _task_names(args.ood_tasks, "--ood-tasks")
    if set(tasks) & set(ood_tasks):
        raise BadInput(f"tasks both in --tasks and --ood-tasks: {sorted(set(tasks) & set(ood_tasks))}.")
    if args.include_path is not None:
        _check_path(str(args.include_path), "include-path")
    if args.posterior is not None:
        _check_path(str(args.posterior), "posterior")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable

        from pyro_moe.integrations.lm_eval import PyroMoELM
        from pyro_moe.integrations.lm_eval_metrics import choice_report, choice_sets, markdown_table
    except ImportError:
        raise BadInput("lm-eval needs lm-evaluation-harness: pip install 'pyro-moe[lm-eval]'.") from None
    manager = TaskManager(include_path=None if args.include_path is None else str(args.include_path))
    unknown = [name for name in tasks + ood_tasks if name not in manager.all_tasks]
    if unknown:
        raise BadInput(f"unknown harness tasks {unknown}; `lm_eval ls tasks` lists them (local ones: --include-path).")
    model, tokenizer, _ = load_model(args)
    if args.posterior is not None:
        from pyro_moe.inference.fitting import FittedPosterior

        model = FittedPosterior.load(args.posterior, model, allow_other_model=args.allow_other_model)
    lm = PyroMoELM(
        model=model,
        tokenizer=tokenizer,
        mode=args.mode,
        num_samples=args.samples,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks + ood_tasks, task_manager=manager, limit=args.limit, log_samples=True
    )
    samples = results.pop("samples")
    paths = [
        write_text_atomically(
            args.out / "results.json", json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
        )
    ]
    for task, logged in samples.items():
        lines = "".join(json.dumps(sample, default=handle_non_serializable) + "\n" for sample in logged)
        paths.append(write_text_atomically(args.out / f"samples_{task}.jsonl", lines))
    report = choice_report(choice_sets({**results, "samples": samples}, lm.draw_log_likelihoods), tasks, ood_tasks)
    report["settings"] = {"mode": args.mode, "num_samples": args.samples, "seed": args.seed, "limit": args.limit}
    table = markdown_table(report)
    paths.append(write_text_atomically(args.out / "pyro_moe_metrics.json", json.dumps(report, indent=2) + "\n"))
    paths.append(write_text_atomically(args.out / "pyro_moe_metrics.md", table))
    print(table, end="")
    print("written:", *paths)


# ---------------------------------------------------------------------------------------------- parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", help="HF id or local folder of an MoE causal LM (default: the embedded benchmark)")
    group.add_argument("--tokenizer", help="tokenizer id or folder (default: the model's)")
    group.add_argument("--dtype", choices=DTYPES, default="float32", help="weights' dtype (default float32)")
    group.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: where from_pretrained puts it)")
    group.add_argument("--device-map", help="accelerate device map, e.g. auto, for models larger than one GPU")
    group.add_argument("--trust-remote-code", action="store_true", help="run the checkpoint's own Python code")


def _data_options(parser: argparse.ArgumentParser, ood: bool = False, text: str | None = None) -> None:
    """The data options; ``text``: the help of ``--text`` (exclusive with ``--data``), with ``--max-length``."""
    group = parser.add_argument_group("data")
    sources = group.add_mutually_exclusive_group() if text is not None else group
    sources.add_argument(
        "--data", help="MCQA file (.jsonl/.json/.csv/.parquet), folder or data-set name (default: benchmark)"
    )
    if text is not None:
        sources.add_argument("--text", type=Path, help=text)
        group.add_argument(
            "--max-length",
            type=_integer(2),
            default=None,
            help="--text: tokens kept of each document, the rest dropped (default 512, or the model's positions)",
        )
    group.add_argument("--split", help="split of a data folder or data-set name")
    group.add_argument(
        "--examples",
        type=_integer(1),
        default=200,
        help="questions (documents) per evaluated split, and of the stability ranking of --layers susceptible "
        "(default 200)",
    )
    group.add_argument(
        "--batch-size", type=_integer(1), default=32, help="questions (documents) per batch (default 32)"
    )
    group.add_argument(
        "--truncate-prompts",
        action="store_true",
        help="cut prompts longer than the model's positions from the start (keeping the choices and the answer "
        "line), with a warning counting them (default: such a prompt is refused before any work)",
    )
    if ood:
        group.add_argument("--ood-data", nargs="+", help="out-of-distribution MCQA files (one OoD split each)")


def _posterior_options(parser: argparse.ArgumentParser, guide: bool = True, recipe: bool = False) -> None:
    group = parser.add_argument_group("posterior")
    group.add_argument(
        "--layers",
        nargs="+",
        default=["all"],
        help="Bayesian decoder layers: all, susceptible, or indices (negative from the end)",
    )
    group.add_argument(
        "--susceptible-k", type=_integer(1), default=1, help="how many layers 'susceptible' picks (default 1)"
    )
    group.add_argument(
        "--sites", help="router sites: JSON '{\"logits\": 2.0}' or kinds logits,weight (default per guide)"
    )
    group.add_argument(
        "--prior",
        help="prior family of the sites, e.g. normal, laplace, student-t, horseshoe (an unknown name lists all)",
    )
    if guide:
        chosen = group.add_mutually_exclusive_group() if recipe else group
        chosen.add_argument(
            "--guide",
            help="guide family, e.g. mean-field, low-rank, mfvr, map+low-rank-logits, swag, expert-laplace "
            "(default mean-field; laplace: laplace; an unknown name lists all)",
        )
        if recipe:
            chosen.add_argument(
                "--recipe",
                type=_recipe_name,
                help="a recipe instead of a guide, e.g. mfvr-iwae-layer, low-rank-logits-iwae-expert (an unknown "
                "name lists all): starting scale by calibration NLL, iwae with learned prior scales, temperatures",
            )
    if recipe:
        group.add_argument(
            "--calibration-data",
            help="--recipe: MCQA file of the calibration questions (default: the benchmark's calibration split, "
            "or the first quarter of --data, the rest fitted on)",
        )
        group.add_argument(
            "--calibration-examples",
            type=_integer(1),
            default=None,
            help="--recipe: calibration questions of the scale selection, the checks along the fit and the "
            "temperatures (default: all there are, 1000 on the benchmark: enough to separate the grid)",
        )
        scales = group.add_mutually_exclusive_group()
        scales.add_argument(
            "--scale", type=_positive_number, default=None, help="--recipe: start from this prior scale (no grid)"
        )
        scales.add_argument(
            "--scale-grid",
            type=_positive_number,
            nargs="+",
            default=None,
            help="--recipe: the starting scales to choose from (default: the recipe's grid)",
        )
        group.add_argument(
            "--selection",
            choices=("raw", "calibrated"),
            default=None,
            help="--recipe: choose the starting scale by the unfitted prior's plain calibration NLL (raw) or by "
            "its NLL after a cross-fitted temperature (calibrated); default: the recipe's (raw)",
        )
    steps_help = f"SVI steps (default {DEFAULT_STEPS}" + ("; with --recipe the recipe's own)" if recipe else ")")
    group.add_argument("--steps", type=_integer(0), default=None if recipe else DEFAULT_STEPS, help=steps_help)
    group.add_argument(
        "--fit-examples",
        type=_integer(1),
        default=512,
        help="questions (documents) the guide is fitted on (default 512)",
    )


def _common(parser: argparse.ArgumentParser, samples: str | None = None) -> None:
    parser.add_argument("--out", type=Path, required=True, help="run folder for the results")
    if samples is not None:
        parser.add_argument("--samples", type=_integer(1), default=None, help=samples)
    parser.add_argument("--seed", type=_integer(0), default=0, help="seed of fits, noise and sampling (default 0)")


def _allow_other_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-other-model",
        action="store_true",
        help="load --posterior into a model other than the one it was fitted on (another configuration or other "
        "weights of the MoE blocks; refused without it), e.g. to transfer it to a fine-tune on purpose",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-moe`` parser with its subcommands."""
    parser = _Parser(prog="pyro-moe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = commands.add_parser("demo", help="the offline demo on the embedded benchmark (make demo)")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="few steps and questions, same code path (for tests)")
    demo.add_argument(
        "--steps", type=_integer(1), default=None, help="SVI steps per family and recipe (default 150; recipes: 300)"
    )
    demo.add_argument("--samples", type=_integer(1), default=None, help="S per prediction (default 8)")
    demo.add_argument("--seed", type=_integer(0), default=0, help="seed (default 0)")
    demo.set_defaults(run=run_demo)

    stability = commands.add_parser("stability", help="routing stability per layer and the susceptible layers")
    _model_options(stability)
    _data_options(stability)
    stability.add_argument(
        "--susceptible-k", type=_integer(1), default=1, help="least stable layers reported (default 1)"
    )
    _common(stability)
    stability.set_defaults(run=run_stability)

    for name, text in (
        ("fit", "fit a guide family by SVI (or a recipe) and save it"),
        ("laplace", "fit a Laplace posterior"),
    ):
        command = commands.add_parser(name, help=text)
        _model_options(command)
        _data_options(command, text="plain-text file, one document per line: fit with the next-token likelihood")
        _posterior_options(command, recipe=name == "fit")
        command.add_argument(
            "--timeout",
            type=_positive_number,
            default=None,
            help="data-parallel: seconds to wait for the other processes (default: distributed.DEFAULT_TIMEOUT)",
        )
        runs = command.add_argument_group("checkpoints")
        runs.add_argument(
            "--checkpoint-every",
            type=_integer(0),
            metavar="N",
            default=CHECKPOINT_STEPS,
            help=f"write a checkpoint into --out/{CHECKPOINT_NAME} every N steps (default {CHECKPOINT_STEPS}; 0: "
            f"none by steps), and at least every {CHECKPOINT_MINUTES:g} minutes, and on Ctrl-C",
        )
        runs.add_argument(
            "--resume",
            action="store_true",
            help=f"continue the fit of the checkpoint in --out/{CHECKPOINT_NAME} (same options): bitwise the "
            "uninterrupted fit",
        )
        command.add_argument(
            "--min-rows",
            type=_integer(1),
            metavar="N",
            default=MIN_ROWS,
            help=f"the fewest usable training questions (documents) accepted (default {MIN_ROWS})",
        )
        _common(command)
        command.set_defaults(run=run_fit)

    for name, text in (
        ("evaluate", "calibration and OoD of a saved posterior or fitted guides vs deterministic and temperature"),
        ("compare", "calibration and OoD of several guide families side by side"),
    ):
        command = commands.add_parser(name, help=text)
        _model_options(command)
        held_out = "plain-text file, one document per line: held-out perplexity of --posterior instead"
        _data_options(command, ood=True, text=held_out if name == "evaluate" else None)
        _posterior_options(command, guide=False)
        command.add_argument(
            "--guides", nargs="+", help="guide families to fit, e.g. mean-field mfvr swag (an unknown name lists all)"
        )
        if name == "evaluate":
            command.add_argument("--posterior", type=Path, help="a posterior folder written by pyro-moe fit")
            _allow_other_model(command)
        command.add_argument(
            "--draws",
            choices=("per-batch", "per-question"),
            default="per-batch",
            help="per-batch (default): one seeded stream of posterior draws over the batches; per-question: "
            "every question predicted alone (batch 1) with a seed from --seed and its prompt tokens, which "
            "reproduces the draws of `pyro-moe lm-eval` (the harness model) on the same questions and --seed",
        )
        _common(command, "S, posterior samples per prediction (default 16)")
        command.set_defaults(run=run_evaluate, samples=16)

    diagnose = commands.add_parser("diagnose", help="ArviZ InferenceData, summary and collapse report of a posterior")
    _model_options(diagnose)
    _data_options(diagnose)
    diagnose.add_argument("--posterior", type=Path, required=True, help="a posterior folder written by pyro-moe fit")
    _allow_other_model(diagnose)
    _common(diagnose, "posterior draws of the export and the collapse report (default 100)")
    diagnose.set_defaults(run=run_diagnose)

    generating = commands.add_parser(
        "generate", help="generate text with per-token entropy and mutual information, uncertain tokens marked"
    )
    _model_options(generating)
    prompts = generating.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    options = generating.add_argument_group("generation")
    options.add_argument(
        "--max-new-tokens", type=_integer(1), default=32, help="tokens generated per prompt at most (default 32)"
    )
    options.add_argument(
        "--mode",
        choices=("model-average", "routing-average"),
        default="model-average",
        help="model-average (S networks, mutual information) or routing-average (one, MI 0); default model-average",
    )
    options.add_argument("--do-sample", action="store_true", help="sample the tokens (default: the most probable)")
    options.add_argument("--temperature", type=_positive_number, help="--do-sample: temperature (default 1)")
    options.add_argument("--top-p", type=_positive_number, help="--do-sample: nucleus mass in (0, 1] (default 1)")
    options.add_argument("--stop", nargs="+", help="stop strings: a prompt's generation ends when its text holds one")
    options.add_argument("--batch-size", type=_integer(1), default=8, help="prompts per batch (default 8)")
    options.add_argument(
        "--uncertain-quantile",
        type=float,
        default=0.9,
        help="mark the tokens whose mutual information is at least this quantile of the run's (default 0.9)",
    )
    posterior = generating.add_argument_group("posterior")
    posterior.add_argument(
        "--posterior", type=Path, help="a posterior folder written by pyro-moe fit (default: the prior)"
    )
    posterior.add_argument(
        "--sites", help="without --posterior: router sites at their prior, JSON or kinds (default '{\"logits\": 2.0}')"
    )
    posterior.add_argument("--prior", help="without --posterior: prior family of the sites (default normal)")
    posterior.add_argument(
        "--layers", nargs="+", default=["all"], help="without --posterior: Bayesian layers, all or indices"
    )
    _allow_other_model(generating)
    _common(generating, "S, posterior samples per token (default 8)")
    generating.set_defaults(run=run_generate, samples=8)

    harness = commands.add_parser(
        "lm-eval", help="lm-evaluation-harness tasks with a posterior, and their calibration from the logged samples"
    )
    _model_options(harness)
    tasks = harness.add_argument_group("tasks")
    tasks.add_argument("--tasks", required=True, help="harness task names, comma-separated, e.g. arc_easy,sciq")
    tasks.add_argument("--ood-tasks", help="tasks whose questions are out of distribution (OoD AUROC), comma-separated")
    tasks.add_argument("--include-path", type=Path, help="a folder of local task YAML files")
    tasks.add_argument("--limit", type=_integer(1), help="at most this many questions per task")
    scoring = harness.add_argument_group("posterior")
    scoring.add_argument("--posterior", type=Path, help="a posterior folder written by pyro-moe fit (default: none)")
    scoring.add_argument(
        "--mode",
        choices=("model-average", "routing-average"),
        default="model-average",
        help="predictive mode (default model-average)",
    )
    scoring.add_argument(
        "--batch-size", type=_integer(1), default=4, help="choices of one question per pass (default 4)"
    )
    _allow_other_model(harness)
    _common(harness, "S, posterior samples per question (default 8)")
    harness.set_defaults(run=run_lm_eval, samples=8)

    bench = commands.add_parser("bench", help="latency, peak memory and FLOPs of the families' predictions")
    _model_options(bench)
    _data_options(bench)
    _posterior_options(bench, guide=False)
    bench.add_argument("--guides", nargs="+", help="guide families (default mean-field mfvr)")
    _common(bench, "S, posterior samples per prediction (default 16)")
    bench.set_defaults(run=run_bench, steps=10, fit_examples=64)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit code (0 ok, 2 bad input, 1 a failed data-parallel collective;
    a one-line reason on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        check_out(args.out)  # before any work, in every process
        check_device(getattr(args, "device", None))
        parallel = join_process_group(args)
    except (PyroMoEError, DistributedError) as error:
        return _failure(args, error)
    try:
        return _run(args, parallel is None or parallel.is_main, sys.argv[1:] if argv is None else argv)
    finally:
        if parallel is not None:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def _run(args: argparse.Namespace, writes: bool, argv: Sequence[str]) -> int:
    """Run the command; ``writes``: this process keeps the log (rank 0 of a data-parallel run)."""
    if not writes:
        return _outcome(args, argv)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # e.g. no permission to write there
        return _failure(args, BadInput(f"--out {args.out}: cannot create the folder: {error.strerror or error}."))
    from pyro_moe.run_lock import describe_holder, lock_run_folder

    try:  # before the log: a refused second writer appends nothing to the first one's folder
        lock = lock_run_folder(args.out, shlex.join(["pyro-moe", *argv]))
    except PyroMoEError as error:
        return _failure(args, error)
    handler = logging.FileHandler(args.out / LOG_NAME)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    data_warnings = logging.StreamHandler(sys.stderr)  # skipped rows and their file lines, on the terminal too
    data_warnings.setLevel(logging.WARNING)
    data_warnings.setFormatter(logging.Formatter(f"pyro-moe {args.command}: warning: %(message)s"))
    logging.getLogger("pyro_moe.data").addHandler(data_warnings)
    logger.info("pyro-moe %s", " ".join(argv))
    if lock.stale_holder is not None:
        message = f"took over the lock on --out {args.out} from {describe_holder(lock.stale_holder)}, which was killed"
        logger.warning("%s before it released it.", message)
        print(f"pyro-moe {args.command}: warning: {message} before it released it.", file=sys.stderr)
    try:
        with warnings.catch_warnings():  # Python warnings (a transferred posterior, ...) as one line, logged too
            warnings.showwarning = _warning_line(args.command)
            return _outcome(args, argv)
    finally:
        logging.getLogger("pyro_moe.data").removeHandler(data_warnings)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
        lock.release()


def _warning_line(command: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that writes ``pyro-moe COMMAND: warning: MESSAGE`` on stderr and into the log."""

    def show(message: Warning | str, *_: Any, **__: Any) -> None:
        text = " ".join(str(message).split())
        logger.warning(text)
        print(f"pyro-moe {command}: warning: {text}", file=sys.stderr)

    return show


def _outcome(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the command; bad input and failed collectives end as :func:`_failure`, SIGINT as :func:`_interrupted`."""
    from pyro_moe.inference.resume import FitInterrupted

    try:
        args.run(args)
    except (PyroMoEError, DistributedError) as error:
        return _failure(args, error)
    except (FitInterrupted, KeyboardInterrupt) as stop:
        return _interrupted(args, argv, stop)
    return 0


def _interrupted(args: argparse.Namespace, argv: Sequence[str], stop: BaseException) -> int:
    """One line on stderr (and in the log) after SIGINT: where the checkpoint is and the command that resumes it."""
    resume = shlex.join(["pyro-moe", *argv, *([] if "--resume" in argv else ["--resume"])])
    folder = args.out / CHECKPOINT_NAME
    if not isinstance(stop, KeyboardInterrupt):
        message = f"interrupted after step {stop.step} of {stop.steps}; checkpoint: {stop.folder}; "
        message += f"resume with: {resume}"
    elif args.command in DATA_PARALLEL_COMMANDS and folder.exists():
        message = f"interrupted; the last checkpoint is in {folder}; resume with: {resume}"
    elif args.command in DATA_PARALLEL_COMMANDS:
        message = "interrupted before the first checkpoint; nothing to resume (run the command again)."
    else:
        message = "interrupted."
    if logger.hasHandlers():
        logger.error("%s", message)
    print(f"pyro-moe {args.command}: {message}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _failure(args: argparse.Namespace, error: PyroMoEError | DistributedError) -> int:
    """One line on stderr (and in the log, where there is one); the exit code of ``error``'s kind."""
    message = " ".join(str(error).split())
    bad_input = isinstance(error, PyroMoEError)
    if logger.hasHandlers():  # not before the log exists: logging's last resort would print a second line
        logger.error("%s%s", "bad input: " if bad_input else "", message)
    print(f"pyro-moe {args.command}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT if bad_input else EXIT_DISTRIBUTED


if __name__ == "__main__":
    sys.exit(main())
