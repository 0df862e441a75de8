"""``pyro-moe generate``: text after prompts with per-token predictive entropy and mutual information, under a
saved posterior or the prior of ``--sites``: the uncertain tokens marked on the terminal, ``generations.jsonl``,
``generations.html`` (tokens shaded by mutual information) and ``generations.png``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyro_moe.cli.errors import BadInput
from pyro_moe.cli.inputs import check_path, load_model
from pyro_moe.cli.options import add_allow_other_model, add_common, add_model_options, integer, positive_number
from pyro_moe.cli.posterior import fixed_layers, parse_sites
from pyro_moe.cli.settings import CommandEntry, FittingOptions, ModelOptions, RunOptions

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["GenerateOptions", "add_parser", "generated_texts", "read_prompts", "run_generate"]


@dataclass(frozen=True)
class GenerateOptions:
    """``generate``: the model; ``--prompt`` or a ``--prompts`` file; the generation options; a saved
    ``--posterior`` (with ``--allow-other-model``) or the prior of the ``fitting`` options' sites and layers."""

    run: RunOptions
    model: ModelOptions
    fitting: FittingOptions
    prompt: str | None = None
    prompts: Path | None = None
    max_new_tokens: int = 32
    mode: str = "model-average"
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] | None = None
    batch_size: int = 8
    uncertain_quantile: float = 0.9
    posterior: Path | None = None
    allow_other_model: bool = False


def add_parser(commands: argparse._SubParsersAction) -> None:
    """Adds ``generate`` and its options."""
    generating = commands.add_parser(
        "generate", help="generate text with per-token entropy and mutual information, uncertain tokens marked"
    )
    add_model_options(generating)
    prompts = generating.add_argument_group("prompts").add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one prompt")
    prompts.add_argument("--prompts", type=Path, help="a text file, one prompt per line")
    options = generating.add_argument_group("generation")
    options.add_argument(
        "--max-new-tokens", type=integer(1), default=32, help="tokens generated per prompt at most (default 32)"
    )
    options.add_argument(
        "--mode",
        choices=("model-average", "routing-average"),
        default="model-average",
        help="model-average (S networks, mutual information) or routing-average (one, MI 0); default model-average",
    )
    options.add_argument("--do-sample", action="store_true", help="sample the tokens (default: the most probable)")
    options.add_argument("--temperature", type=positive_number, help="--do-sample: temperature (default 1)")
    options.add_argument("--top-p", type=positive_number, help="--do-sample: nucleus mass in (0, 1] (default 1)")
    options.add_argument("--stop", nargs="+", help="stop strings: a prompt's generation ends when its text holds one")
    options.add_argument("--batch-size", type=integer(1), default=8, help="prompts per batch (default 8)")
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
    add_allow_other_model(generating)
    add_common(generating, "S, posterior samples per token (default 8)")
    generating.set_defaults(run=CommandEntry(GenerateOptions, run_generate), samples=8)


def read_prompts(prompt: str | None, prompts_file: Path | None) -> list[str]:
    """``--prompt`` or the non-empty lines of ``--prompts``; refused when there is none."""
    if prompt is not None:
        prompts = [prompt]
    else:
        check_path(prompts_file, "prompts")
        if not prompts_file.is_file():
            raise BadInput(f"--prompts {prompts_file}: not a file (one prompt per line).")
        prompts = [line for line in prompts_file.read_text(encoding="utf-8").splitlines() if line.strip()]
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


def _check(options: GenerateOptions) -> None:
    """The generation options that contradict each other or are out of range, refused before the model loads."""
    fitting = options.fitting
    if options.posterior is not None and (
        fitting.sites is not None or fitting.prior is not None or fitting.layers != ("all",)
    ):
        raise BadInput("--posterior carries its own sites and layers: give --sites, --prior and --layers without it.")
    if not options.do_sample and (options.temperature is not None or options.top_p is not None):
        raise BadInput("--temperature and --top-p shape sampling: give them with --do-sample.")
    if options.top_p is not None and options.top_p > 1:
        raise BadInput(f"--top-p is a probability mass in (0, 1], got {options.top_p:g}.")
    if not 0.0 <= options.uncertain_quantile <= 1.0:
        raise BadInput(f"--uncertain-quantile must be in [0, 1], got {options.uncertain_quantile:g}.")


def run_generate(options: GenerateOptions) -> None:
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

    prompts = read_prompts(options.prompt, options.prompts)
    _check(options)
    sites = None if options.posterior is not None else (parse_sites(options.fitting) or {"logits": 2.0})
    layers = None if options.posterior is not None else fixed_layers(options.fitting)
    if sites is not None:
        from pyro_moe.models.bayesian_router import RouterSites

        RouterSites.parse(sites)  # a bad site or prior scale before the model loads
    if options.posterior is not None:
        check_path(options.posterior, "posterior")
    model, tokenizer, _ = load_model(options.model)
    if options.posterior is not None:
        from pyro_moe.inference.fitting import FittedPosterior

        posterior = FittedPosterior.load(options.posterior, model, allow_other_model=options.allow_other_model)
        generate_with = posterior.generate
    else:
        from functools import partial

        from pyro_moe.inference.generation import generate
        from pyro_moe.models.router_patch import patch_routers

        generate_with = partial(generate, patch_routers(model, sites, layers=layers))
    generation = {
        "max_new_tokens": options.max_new_tokens,
        "num_samples": options.run.samples,
        "mode": options.mode,
        "do_sample": options.do_sample,
        "temperature": 1.0 if options.temperature is None else options.temperature,
        "top_p": 1.0 if options.top_p is None else options.top_p,
        "stop_strings": options.stop or (),
        "tokenizer": tokenizer,
    }
    import pyro

    pyro.set_rng_seed(options.run.seed)  # one seeded stream for the whole run: every batch gets its own draws
    texts = []
    for start in range(0, len(prompts), options.batch_size):
        chunk = prompts[start : start + options.batch_size]
        encoded = tokenizer(chunk, return_tensors="pt", padding=True)
        generated = generate_with(encoded["input_ids"], encoded["attention_mask"], **generation)
        texts += generated_texts(generated, tokenizer, chunk, encoded["input_ids"])
    threshold = uncertainty_threshold(texts, options.uncertain_quantile)
    colour = sys.stdout.isatty()
    for text in texts:
        figures = text.summary()
        print(f"{text.prompt}{terminal_text(text, threshold, colour)}")
        print(
            f"  mean MI {figures['mean_mutual_information']:.4g}, max MI {figures['max_mutual_information']:.4g}, "
            f"mean entropy {figures['mean_predictive_entropy']:.4g}, log p {figures['log_prob_sum']:.4g} (nats)"
        )
    out = options.run.out
    paths = [
        write_jsonl(texts, out / "generations.jsonl"),
        write_html(texts, out / "generations.html", threshold=threshold),
        plot_token_uncertainty(texts, out / "generations.png"),
    ]
    print(f"marked: mutual information >= {threshold:.4g} nats (quantile {options.uncertain_quantile:g})")
    print("written:", *paths)
