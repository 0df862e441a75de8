"""What the commands load before their work: the model and tokenizer, MCQA splits or plain-text documents, with
every path, device, row count and prompt length checked before any work (bad input: :class:`BadInput`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_moe.cli.errors import BadInput
from pyro_moe.cli.settings import DataOptions, ModelOptions
from pyro_moe.errors import DataError

if TYPE_CHECKING:  # torch, transformers and the library load on first use: --help and bad input answer at once
    from torch import Tensor, nn

    from pyro_moe.data import MCQAExample, TextDataset

__all__ = [
    "CALIBRATION_FRACTION",
    "Inputs",
    "TextInputs",
    "available_devices",
    "check_device",
    "check_out",
    "check_path",
    "load_inputs",
    "load_model",
    "load_text_inputs",
    "text_batches_of",
]

CALIBRATION_FRACTION = 4
"""With one ``--data`` file, ``evaluate`` fits temperature scaling on its first quarter and measures on the rest;
``fit --recipe`` (without ``--calibration-data``) chooses and calibrates on its first quarter and fits on the rest."""


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


def check_path(value: str | Path, what: str) -> None:
    """A value that names a local path (starts with ``.``, ``/`` or ``~``, or exists) must exist."""
    value = str(value)
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


def load_model(options: ModelOptions) -> tuple[nn.Module, Any, dict[str, list[MCQAExample]] | None]:
    """The model (eval mode), tokenizer and, for the embedded benchmark (no ``--model``), its
    splits; a ``--model`` must hold MoE routers of a registered family."""
    if options.model is None:
        from pyro_moe.experiments.benchmark_model import load_benchmark

        loaded = load_benchmark(device=options.device or "cpu")
        return loaded.model, loaded.tokenizer, {name: list(split) for name, split in loaded.benchmark.splits.items()}
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pyro_moe.core.families import find_moe_routers

    check_path(options.model, "model")
    loading: dict[str, Any] = {"dtype": getattr(torch, options.dtype), "trust_remote_code": options.trust_remote_code}
    if options.device_map is not None:
        loading["device_map"] = options.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(options.model, **loading)
        tokenizer = AutoTokenizer.from_pretrained(
            options.tokenizer or options.model, trust_remote_code=options.trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as error:
        reason = " ".join(str(error).split())
        raise BadInput(f"cannot load model {options.model}: {reason[:300]}") from None
    if options.device_map is None and options.device is not None:
        model = model.to(options.device)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    find_moe_routers(model)  # NoMoELayersError / UnsupportedFamilyError before any work
    return model.eval(), tokenizer, None


def _examples(source: str, split: str | None) -> list[MCQAExample]:
    from pyro_moe.data import load_mcqa

    check_path(source, "data")
    return list(load_mcqa(source, split=split))


def load_inputs(model: ModelOptions, data: DataOptions, roles: Sequence[str]) -> Inputs:
    """Model, tokenizer and the splits of ``roles``: the embedded benchmark's, or from ``--data``
    (every role from the same questions, except a calibration role beside ``test`` (``evaluate``) or
    ``train`` (``fit --recipe``): the first quarter calibrates, the rest is the other role, see
    :data:`CALIBRATION_FRACTION`), ``--calibration-data`` (the calibration split, the whole of ``--data``
    the other role) and ``--ood-data`` (``near_ood`` ... one split per file). Every prompt is bounded by
    the model's positions before any work (:func:`bound_splits`)."""
    files: dict[str, tuple[list[MCQAExample], str]] = {}  # split name: its questions and their file
    if data.calibration_data is not None:
        files["calibration"] = (_examples(data.calibration_data, None), data.calibration_data)
    cut, other = False, None
    if data.data is not None:  # the data first: a bad file is refused before a large model loads
        examples = _examples(data.data, data.split)
        check_row_count(data.min_rows, data.data, len(examples), "questions")
        other = next((role for role in ("test", "train") if role in roles), None)
        cut = "calibration" in roles and other is not None and data.calibration_data is None
        if cut and len(examples) < 2:
            raise DataError(f"{data.data}: needs at least 2 usable questions (calibration and {other}).")
        files["data"] = (examples, data.data)
        for number, path in enumerate(data.ood_data or []):
            files[f"ood_{number}_{Path(path).stem}"] = (_examples(path, None), path)
    elif model.model is not None:
        raise BadInput("--model needs --data (an MCQA file or data-set name); only the embedded benchmark has its own.")
    loaded, tokenizer, benchmark_splits = load_model(model)
    if data.data is None:
        files = {name: (split, f"the benchmark's {name} split") for name, split in benchmark_splits.items()} | files
    splits = bound_splits(loaded, tokenizer, files, data.truncate_prompts)
    if data.data is not None:
        examples = splits.pop("data")
        splits = {role: splits.get(role, examples) for role in ("train", "test", "calibration")} | splits
        if cut:
            at = max(1, len(examples) // CALIBRATION_FRACTION)
            splits["calibration"], splits[other] = examples[:at], examples[at:]
    from pyro_moe.experiments.evaluation import default_answer_token_ids

    letters = default_answer_token_ids(tokenizer, splits["test"])
    return Inputs(loaded, tokenizer, letters.to(loaded.get_input_embeddings().weight.device), splits)


def check_row_count(floor: int | None, source: str | Path, count: int, what: str) -> None:
    """``fit`` and ``laplace``: training data with fewer usable rows than ``--min-rows`` (``floor``) is refused."""
    if floor is not None and count < floor:
        raise DataError(
            f"{source}: {count} usable {what}, fewer than --min-rows {floor}; give more data, or lower --min-rows "
            "to fit on these anyway."
        )


def bound_splits(
    model: nn.Module, tokenizer: Any, files: dict[str, tuple[list[MCQAExample], str]], truncate: bool
) -> dict[str, list[MCQAExample]]:
    """The questions of ``files`` (``{name: (questions, where they come from)}``) with every prompt within
    the model's positions and one batch's token budget (:func:`pyro_moe.data.bound_prompts`): a longer one is
    refused before any work, naming its file and position, or cut when ``truncate`` (``--truncate-prompts``;
    a warning counts them)."""
    from pyro_moe.data import DEFAULT_BATCH_TOKENS, PromptLimit, bound_prompts, model_positions

    positions = model_positions(model)
    limit = PromptLimit(min(positions or DEFAULT_BATCH_TOKENS, DEFAULT_BATCH_TOKENS), truncate)
    return {
        name: bound_prompts(examples, tokenizer, limit, source=str(source))[0]
        for name, (examples, source) in files.items()
    }


def load_text_inputs(model: ModelOptions, data: DataOptions) -> TextInputs:
    """Model, tokenizer and the documents of ``--text`` (the file first: a bad one is refused before a
    large model loads)."""
    from pyro_moe.data import load_text

    if data.ood_data:
        raise BadInput("--ood-data holds MCQA questions; with --text, evaluate measures perplexity only.")
    documents = load_text(data.text)
    check_row_count(data.min_rows, data.text, len(documents), "documents")
    loaded, tokenizer, _ = load_model(model)
    return TextInputs(loaded, tokenizer, documents)


def text_batches_of(inputs: TextInputs, data: DataOptions, limit: int) -> list[dict[str, Tensor]]:
    """Batches of ``--batch-size`` of the first ``limit`` documents, each cut to ``--max-length``
    tokens (default: 512, or the model's ``max_position_embeddings`` when fewer; more is refused)."""
    from pyro_moe.data import DEFAULT_MAX_LENGTH, text_batches

    positions = getattr(inputs.model.config, "max_position_embeddings", None)
    max_length = data.max_length or min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    if positions is not None and max_length > positions:
        raise BadInput(
            f"--max-length {max_length} exceeds the model's {positions} positions (max_position_embeddings)."
        )
    documents = inputs.documents.documents[:limit]
    return list(text_batches(documents, inputs.tokenizer, data.batch_size, max_length=max_length))
