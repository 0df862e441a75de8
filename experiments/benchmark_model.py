"""The embedded benchmark's model: tokenizer, a small Granite-MoE, its training and loading.

The model is the thesis' architecture, a Granite-MoE with hidden size 96, 3 decoder layers and
8 experts of which each token uses 2, trained on the ``train`` split of
:mod:`pyro_moe.experiments.benchmark_data` to answer its four-choice questions. Its readout is the
MCQA one: next-token logits at the last prompt position (:func:`pyro_moe.core.readout.last_token_logits`)
restricted to the answer letters; prompts follow :data:`pyro_moe.data.DEFAULT_TEMPLATE`. Its
tokenizer's last id is ``<|endoftext|>``, the BOS and EOS token (as GPT-2's): the answer-letter training
never sees it, and a second stage (:func:`train_end_of_text`) trains its embedding row alone, every other
weight frozen, so that the model ends its answer with it (``Answer: B<|endoftext|>``) and never puts it
before the answer; harnesses that prefix requests with a BOS/EOS id, ``generate`` and its stop
conditions work on the model, and every answer-letter figure is that of the first stage. The
trained model ships in ``experiments/checkpoints/benchmark/`` (safetensors, config, tokenizer,
``metrics.json`` with its figures and the command that rebuilt it); loading it needs no network.

Rebuild the checkpoint (about 3 minutes on 2 CPU cores)::

    python -m pyro_moe.experiments.benchmark_model train --seed 0 --out experiments/checkpoints/benchmark

Example::

    from pyro_moe.experiments.benchmark_model import answer_probabilities, labels_of, load_benchmark
    from pyro_moe.evaluation.metrics import calibration_report

    loaded = load_benchmark()
    test = loaded.benchmark.splits["test"]
    probs = answer_probabilities(loaded.model, loaded.tokenizer, test)  # (1000, 4)
    calibration_report(probs, labels_of(test))  # {"accuracy": ..., "ece": ..., ...}
    larger = load_benchmark(extend_to={"test": 5000})  # 4000 fresh test questions after the 1000
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from tqdm.auto import tqdm
from transformers import BatchEncoding, GraniteMoeConfig, GraniteMoeForCausalLM, PreTrainedTokenizerFast

from pyro_moe.atomic_files import write_text_atomically
from pyro_moe.core.readout import last_token_logits
from pyro_moe.data import DEFAULT_TEMPLATE, MCQAExample, answer_token_ids, mcqa_batches
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.experiments.benchmark_data import SPLITS, VOCABULARY, Benchmark, generate_benchmark

__all__ = [
    "CHECKPOINT_DIR",
    "END_OF_TEXT",
    "EndOfTextSettings",
    "LoadedBenchmark",
    "TrainingSettings",
    "answer_probabilities",
    "benchmark_config",
    "build_tokenizer",
    "encode",
    "end_of_text_figures",
    "labels_of",
    "load_benchmark",
    "main",
    "train_benchmark_model",
    "train_end_of_text",
]

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "benchmark"
"""The committed checkpoint folder."""

ECE_BINS = 15
"""Equal-width confidence bins of the recorded calibration errors."""

SLICE_SIZE = 100
"""The first ``SLICE_SIZE`` test questions, whose figures ``metrics.json`` records for a quick recomputation."""

_PAD, _UNK = "<pad>", "<unk>"
END_OF_TEXT = "<|endoftext|>"
"""The BOS and EOS token: the tokenizer's last id."""


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over :data:`VOCABULARY` (numbers are words), punctuation split off, left padding.

    Token ids: ``<pad>`` 0, ``<unk>`` 1, then the vocabulary in sorted order, then :data:`END_OF_TEXT`
    (the BOS and EOS token; no special token is added when encoding).
    """
    vocab = {token: i for i, token in enumerate([_PAD, _UNK, *VOCABULARY, END_OF_TEXT])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_UNK))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_PAD,
        unk_token=_UNK,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        padding_side="left",
    )


def labels_of(examples: Sequence[MCQAExample]) -> Tensor:
    """Indices ``(batch,)`` of the correct choices."""
    return torch.tensor([example.answer for example in examples])


def encode(tokenizer: PreTrainedTokenizerFast, examples: Sequence[MCQAExample]) -> BatchEncoding:
    """Left-padded ``input_ids`` and ``attention_mask`` ``(batch, length)`` of the prompts of ``examples``
    (:data:`pyro_moe.data.DEFAULT_TEMPLATE`)."""
    return tokenizer([DEFAULT_TEMPLATE.render(example) for example in examples], padding=True, return_tensors="pt")


def benchmark_config(vocab_size: int, pad_token_id: int, end_of_text_id: int) -> GraniteMoeConfig:
    """Granite-MoE: hidden 96, 3 layers, 4 heads, 8 experts of intermediate size 96, top-2, eager attention.

    ``end_of_text_id`` is the BOS and EOS id; the first training stage builds the model with
    ``vocab_size`` one short of it (the answer-letter vocabulary), the second grows it by that token.

    Attention scores are scaled by ``head_dim ** -0.5`` (Granite's ``attention_multiplier`` defaults
    to 1); eager attention, because SDPA has no double backward on CPU and Laplace needs one.
    """
    heads = 4
    return GraniteMoeConfig(
        vocab_size=vocab_size,
        hidden_size=96,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        attention_multiplier=(96 // heads) ** -0.5,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        pad_token_id=pad_token_id,
        bos_token_id=end_of_text_id,
        eos_token_id=end_of_text_id,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )


@torch.no_grad()
def answer_probabilities(
    model: GraniteMoeForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[MCQAExample],
    batch_size: int = 250,
) -> Tensor:
    """Answer probabilities ``(len(examples), choices)`` of ``model`` (float32, on the model's device)."""
    device = model.device
    answer_ids = answer_token_ids(tokenizer).to(device)
    chunks = []
    for batch in mcqa_batches(examples, tokenizer, batch_size):
        logits = last_token_logits(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        chunks.append(logits[0, :, answer_ids].float().softmax(-1))
    return torch.cat(chunks)


@dataclass(frozen=True)
class TrainingSettings:
    """AdamW on the cross-entropy of the answer letters, linear warm-up then cosine decay to zero."""

    steps: int = 2500
    batch_size: int = 64
    learning_rate: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_steps: int = 50


@dataclass(frozen=True)
class EndOfTextSettings:
    """Adam on the end-of-text row alone, full batch over the train questions' precomputed hidden states;
    ``before_answer_weight`` weighs the term that keeps the token from coming before the answer."""

    steps: int = 2000
    learning_rate: float = 0.1
    before_answer_weight: float = 4.0


@dataclass
class LoadedBenchmark:
    """The benchmark model (eval mode, float32), its tokenizer, answer-letter ids, data and recorded figures.

    Attributes:
        model: the trained Granite-MoE.
        tokenizer: its word-level tokenizer (left padding).
        answer_token_ids: ``(choices,)`` ids of ``A``..``D`` on the model's device.
        benchmark: the splits, regenerated from the recorded seed.
        metrics: the contents of ``metrics.json``.
    """

    model: GraniteMoeForCausalLM
    tokenizer: PreTrainedTokenizerFast
    answer_token_ids: Tensor
    benchmark: Benchmark
    metrics: dict[str, Any]


def _learning_rate_factor(step: int, settings: TrainingSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _evaluate(model: GraniteMoeForCausalLM, tokenizer: PreTrainedTokenizerFast, benchmark: Benchmark) -> dict[str, Any]:
    """Calibration figures of every split, of every family within each split, and of the test slice."""
    figures: dict[str, Any] = {"splits": {}, "families": {}}
    for split in SPLITS:
        examples = benchmark.splits[split]
        probs, labels = answer_probabilities(model, tokenizer, examples), labels_of(examples)
        figures["splits"][split] = calibration_report(probs, labels, ECE_BINS)
        families = benchmark.families[split]
        figures["families"][split] = {}
        for family in dict.fromkeys(families):
            rows = torch.tensor([name == family for name in families])
            figures["families"][split][family] = calibration_report(probs[rows], labels[rows], ECE_BINS)
    test = benchmark.splits["test"][:SLICE_SIZE]
    figures["test_slice"] = calibration_report(answer_probabilities(model, tokenizer, test), labels_of(test), ECE_BINS)
    return figures


@torch.no_grad()
def _answer_hidden_states(
    model: GraniteMoeForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: Sequence[MCQAExample]
) -> tuple[Tensor, Tensor]:
    """Final hidden states ``(questions, 2, hidden)`` at the last prompt position and at the correct answer
    letter appended to it, and the model's logits ``(questions, 2, vocab)`` there."""
    answer_ids = answer_token_ids(tokenizer)
    hidden, logits = [], []
    for batch in mcqa_batches(examples, tokenizer, 250):
        letters = answer_ids[batch["labels"]]
        input_ids = torch.cat([batch["input_ids"], letters[:, None]], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(letters)[:, None]], dim=1)
        states = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, -2:]
        hidden.append(states)
        logits.append(model.lm_head(states) / model.config.logits_scaling)
    return torch.cat(hidden), torch.cat(logits)


def _end_of_text_log_probs(row: Tensor, hidden: Tensor, other_log_normaliser: Tensor, scaling: float) -> Tensor:
    """``(questions, 2)`` log-probabilities of the end-of-text token (embedding ``row`` ``(hidden,)``) at the
    positions of ``hidden`` ``(questions, 2, hidden)``, beside the other tokens (the logsumexp of their logits,
    ``other_log_normaliser`` ``(questions, 2)``)."""
    logit = hidden @ row / scaling
    return logit - torch.logaddexp(other_log_normaliser, logit)


def train_end_of_text(
    model: GraniteMoeForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    examples: Sequence[MCQAExample],
    settings: EndOfTextSettings | None = None,
) -> dict[str, float]:
    """Grow ``model``'s vocabulary by :data:`END_OF_TEXT` (the tokenizer's last id) and train its embedding row
    alone, every other weight frozen: maximise ``log p(end | prompt, correct letter) + w log(1 - p(end | prompt))``
    (``w``: ``settings.before_answer_weight``) over ``examples``, so that the model ends its answer with the token
    and never puts it before the answer.

    The other rows, and so every answer-letter figure, are unchanged. Returns the final mean loss and the
    fractions of ``examples`` where the token is the most probable next token after the answer and at the
    prompt's end.
    """
    settings = settings or EndOfTextSettings()
    hidden, logits = _answer_hidden_states(model, tokenizer, examples)
    other_log_normaliser, scaling = logits.logsumexp(-1), model.config.logits_scaling
    row = torch.zeros(hidden.shape[-1], requires_grad=True)
    optimizer = torch.optim.Adam([row], lr=settings.learning_rate)
    for _ in tqdm(range(settings.steps), desc="training the end-of-text token", unit="step"):
        log_probs = _end_of_text_log_probs(row, hidden, other_log_normaliser, scaling)
        not_before = torch.log1p(-log_probs[:, 0].exp().clamp(max=1 - 1e-6))
        loss = -(log_probs[:, 1] + settings.before_answer_weight * not_before).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    model.resize_token_embeddings(end_id + 1, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[end_id] = row.detach()
    model.generation_config.bos_token_id = model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return {"loss": loss.item(), **end_of_text_figures(model, tokenizer, examples)}


def end_of_text_figures(
    model: GraniteMoeForCausalLM, tokenizer: PreTrainedTokenizerFast, examples: Sequence[MCQAExample]
) -> dict[str, float]:
    """Fractions of ``examples`` where :data:`END_OF_TEXT` is the most probable next token right after the
    correct answer letter (``after_answer``) and at the prompt's end (``before_answer``)."""
    _, logits = _answer_hidden_states(model, tokenizer, examples)
    is_end = logits.argmax(-1) == tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    return {"after_answer": float(is_end[:, 1].float().mean()), "before_answer": float(is_end[:, 0].float().mean())}


def train_benchmark_model(
    seed: int,
    out: str | Path,
    settings: TrainingSettings | None = None,
    sizes: dict[str, int] | None = None,
    end_of_text_settings: EndOfTextSettings | None = None,
) -> dict[str, Any]:
    """Train the benchmark model from ``seed`` and save it with its tokenizer and ``metrics.json`` in ``out``.

    Generates the data from ``seed`` (``sizes`` as in :func:`generate_benchmark`), initialises the
    model and draws the batches from the same seed, trains the answer letters, then the end-of-text
    token (:func:`train_end_of_text`); returns the recorded metrics.
    """
    settings = settings or TrainingSettings()
    out = Path(out)
    torch.manual_seed(seed)
    benchmark = generate_benchmark(seed, sizes)
    tokenizer = build_tokenizer()
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    model = GraniteMoeForCausalLM(benchmark_config(end_id, tokenizer.pad_token_id, end_id)).train()
    train = encode(tokenizer, benchmark.splits["train"])
    labels = labels_of(benchmark.splits["train"])
    answer_ids = answer_token_ids(tokenizer)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, betas=settings.betas, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, settings))
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    started, started_cpu = time.perf_counter(), time.process_time()
    progress = tqdm(range(settings.steps), desc="training the benchmark model", unit="step")
    for _ in progress:
        if len(order) < settings.batch_size:
            order = torch.cat([order, torch.randperm(len(labels), generator=generator)])
        rows, order = order[: settings.batch_size], order[settings.batch_size :]
        mask = train["attention_mask"][rows]
        width = int(mask.sum(-1).max())  # left padding: the last `width` columns hold every real token
        logits = last_token_logits(model, train["input_ids"][rows, -width:], mask[:, -width:])[0, :, answer_ids]
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        progress.set_postfix(loss=f"{loss.item():.3f}")
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - started_cpu  # the answer letters
    model.eval()
    end_of_text = train_end_of_text(model, tokenizer, benchmark.splits["train"], end_of_text_settings)
    metrics = {
        "command": f"python -m pyro_moe.experiments.benchmark_model train --seed {seed} --out {out}",
        "seed": seed,
        "sizes": {split: len(benchmark.splits[split]) for split in SPLITS},
        "training": {
            **vars(settings),
            "seconds": round(seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "threads": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "end_of_text": {
            "token_id": end_id,
            **vars(end_of_text_settings or EndOfTextSettings()),
            "train": end_of_text,
            "test": end_of_text_figures(model, tokenizer, benchmark.splits["test"]),
        },
        "ece_bins": ECE_BINS,
        "slice_size": SLICE_SIZE,
        **_evaluate(model, tokenizer, benchmark),
    }
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # transformers leaves the attention implementation out of config.json; loading honours it when present.
    config = json.loads((out / "config.json").read_text())
    write_text_atomically(out / "config.json", json.dumps({**config, "attn_implementation": "eager"}, indent=2) + "\n")
    write_text_atomically(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_text_atomically(out / "README.md", _readme(metrics))
    return metrics


def _readme(metrics: dict[str, Any]) -> str:
    """The checkpoint folder's README: what it holds, the command that rebuilds it, its figures."""
    training = metrics["training"]
    lines = [
        "# The embedded benchmark model",
        "",
        "A Granite-MoE (hidden 96, 3 layers, 8 experts, top-2, eager attention) trained on the synthetic MCQA",
        "suite of `pyro_moe.experiments.benchmark_data` (generated from the seed below, not stored here). Load it",
        "offline with `pyro_moe.experiments.benchmark_model.load_benchmark()`. Rebuild it from the repository root:",
        "",
        "```bash",
        metrics["command"],
        "```",
        "",
        f"Seed {metrics['seed']}; {training['steps']} AdamW steps of batch {training['batch_size']} in "
        f"{training['seconds']} s ({training['cpu_seconds']} s of CPU time) on {training['threads']} CPU threads "
        f"(torch {metrics['versions']['torch']}, transformers {metrics['versions']['transformers']}); the weights",
        "are bitwise the same on every run with the same thread count and these versions (another transformers "
        "version may initialise or reduce differently and train another model from the same seed). "
        "Then the end-of-text token",
        f"`{END_OF_TEXT}` (id {metrics['end_of_text']['token_id']}, the BOS and EOS token) had its embedding row "
        "trained alone, every other weight frozen: it is the most probable next token right after the correct answer "
        f"on {metrics['end_of_text']['test']['after_answer']:.1%} of the test questions and before the answer on "
        f"{metrics['end_of_text']['test']['before_answer']:.1%}.",
        "Figures of the deterministic model (ECE with 15 equal-width bins); `metrics.json` has them per task family.",
        "",
        "| split | questions | accuracy | mean confidence | NLL | ECE |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for split, figures in metrics["splits"].items():
        lines.append(
            f"| {split} | {figures['count']} | {figures['accuracy']:.3f} | {figures['confidence']:.3f} | "
            f"{figures['nll']:.3f} | {figures['ece']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def load_benchmark(
    path: str | Path = CHECKPOINT_DIR, device: str | torch.device = "cpu", *, extend_to: Mapping[str, int] | None = None
) -> LoadedBenchmark:
    """Load the benchmark model (eval mode, float32, on ``device``), its tokenizer and data, offline.

    The splits are regenerated from the seed and sizes recorded in ``path/metrics.json``;
    ``extend_to`` enlarges the evaluation splits with fresh questions, disjoint from the ones the
    model was trained and calibrated on (:func:`~pyro_moe.experiments.benchmark_data.generate_benchmark`).
    """
    path = Path(path)
    if not (path / "metrics.json").is_file():
        raise ConfigurationError(f"{path} is not a benchmark checkpoint folder: it has no metrics.json")
    metrics = json.loads((path / "metrics.json").read_text())
    benchmark = generate_benchmark(metrics["seed"], metrics["sizes"], extend_to=extend_to)  # bad sizes: no load
    model = GraniteMoeForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model = model.to(device).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    return LoadedBenchmark(
        model=model,
        tokenizer=tokenizer,
        answer_token_ids=answer_token_ids(tokenizer).to(model.device),
        benchmark=benchmark,
        metrics=metrics,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The embedded MCQA benchmark model.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the model and save it with its tokenizer and metrics.json")
    train.add_argument("--seed", type=int, default=0, help="seed of the data, the initialisation and the batches")
    train.add_argument("--out", type=Path, required=True, help="folder to save the checkpoint in")
    args = parser.parse_args(argv)
    metrics = train_benchmark_model(args.seed, args.out)
    for split, figures in metrics["splits"].items():
        print(
            f"{split:12s} accuracy {figures['accuracy']:.3f}  confidence {figures['confidence']:.3f}  "
            f"nll {figures['nll']:.3f}  ece {figures['ece']:.3f}"
        )
    training = metrics["training"]
    print(f"trained in {training['seconds']} s ({training['cpu_seconds']} s of CPU time); saved to {args.out}")


if __name__ == "__main__":
    main()
