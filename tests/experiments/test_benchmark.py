"""The embedded benchmark: deterministic, disjoint, balanced, correct data; the committed model and its figures."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from pyro_moe.data import DEFAULT_TEMPLATE, MCQAExample, answer_token_ids
from pyro_moe.errors import ConfigurationError
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.experiments.benchmark_data import SPLITS, Benchmark, generate_benchmark
from pyro_moe.experiments.benchmark_model import (
    CHECKPOINT_DIR,
    END_OF_TEXT,
    EndOfTextSettings,
    TrainingSettings,
    answer_probabilities,
    build_tokenizer,
    encode,
    end_of_text_figures,
    labels_of,
    load_benchmark,
    train_benchmark_model,
)

SMALL = {"train": 40, "calibration": 20, "test": 20, "near_ood": 20, "far_ood": 20}

_DIGEST_SCRIPT = """
import hashlib, json
from pyro_moe.experiments.benchmark_data import generate_benchmark
benchmark = generate_benchmark(3)
print(hashlib.sha256(json.dumps([benchmark.splits, benchmark.families], default=vars).encode()).hexdigest())
"""


def _digest(benchmark: Benchmark) -> str:
    return hashlib.sha256(json.dumps([benchmark.splits, benchmark.families], default=vars).encode()).hexdigest()


@pytest.fixture(scope="module")
def benchmark() -> Benchmark:
    return generate_benchmark(0)


@pytest.fixture(scope="module")
def loaded():
    return load_benchmark()


def test_same_seed_gives_identical_splits_and_other_seeds_differ():
    assert generate_benchmark(5) == generate_benchmark(5)
    first, other = generate_benchmark(5), generate_benchmark(6)
    for split in SPLITS:
        assert first.splits[split] != other.splits[split]


def test_splits_do_not_depend_on_the_hash_seed():
    """A child process under another hash seed than this one's generates the same splits."""
    here = os.environ.get("PYTHONHASHSEED", "random")
    other = "2" if here == "1" else "1"
    result = subprocess.run(
        [sys.executable, "-c", f"print(hash('hash seed')){_DIGEST_SCRIPT}"],
        env={**os.environ, "PYTHONHASHSEED": other},
        capture_output=True,
        text=True,
        check=True,
    )
    child_hash, child_digest = result.stdout.split()
    assert int(child_hash) != hash("hash seed")  # the hash seeds differ indeed
    assert child_digest == _digest(generate_benchmark(3))


def test_splits_have_their_sizes_and_disjoint_questions(benchmark):
    questions = {split: [example.question for example in benchmark.splits[split]] for split in SPLITS}
    assert {split: len(questions[split]) for split in SPLITS} == {
        "train": 8000,
        "calibration": 1000,
        "test": 1000,
        "near_ood": 1000,
        "far_ood": 1000,
    }
    every_question = [question for split in SPLITS for question in questions[split]]
    assert len(set(every_question)) == len(every_question)


def test_answers_are_exactly_balanced_over_the_letters(benchmark):
    for split in SPLITS:
        counts = Counter(example.answer for example in benchmark.splits[split])
        assert counts == dict.fromkeys(range(4), len(benchmark.splits[split]) // 4), split


def test_families_are_equally_represented_and_far_ood_families_are_unseen(benchmark):
    for split in SPLITS:
        counts = Counter(benchmark.families[split])
        assert len(set(counts.values())) == 1, split
    in_distribution = set(benchmark.families["train"])
    assert set(benchmark.families["near_ood"]) == in_distribution
    assert not set(benchmark.families["far_ood"]) & in_distribution


ANIMALS = {"cat", "dog", "fish", "bird", "cow", "horse", "pig", "hen", "duck", "mouse", "sheep", "goat"}
FAR_CATEGORIES = {
    "fruit": {"apple", "pear", "plum", "lemon", "mango", "grape"},
    "tool": {"hammer", "saw", "drill", "wrench", "chisel", "axe"},
    "vehicle": {"car", "bus", "train", "boat", "plane", "truck"},
    "clothing": {"shirt", "hat", "sock", "coat", "scarf", "glove"},
}
COLOURS = {"red", "blue", "green", "yellow", "black", "white", "pink", "brown", "purple", "orange", "grey", "gold"}


def _reference_answer(family: str, question: str, choices: tuple[str, ...]) -> str:
    """The answer, recomputed from the question text (and, for ``category``, a hand-written word table)."""
    numbers = [int(number) for number in re.findall(r"\d+", question)]
    listed = question.split(" : ")[-1].removesuffix(" ?").split()
    if family == "addition":
        return str(numbers[0] + numbers[1])
    if family == "largest":
        return str(max(numbers))
    if family == "counting":
        target = question.split("does ")[1].split()[0]
        return str(listed.count(target))
    if family == "parity":
        (even,) = [number for number in numbers if number % 2 == 0]
        return str(even)
    if family == "category":
        (member,) = [word for word in choices if word in (ANIMALS if "an animal" in question else COLOURS)]
        return member
    if family == "object_category":
        (member,) = [word for word in choices if word in FAR_CATEGORIES[question.split("kind of ")[1].split()[0]]]
        return member
    if family in ("letter_after", "letter_before"):
        given = question.split(" : ")[0].split()[-1]
        return chr(ord(given) + (1 if family == "letter_after" else -1))
    raise KeyError(family)


def test_every_answer_is_right_and_choices_are_distinct(benchmark):
    checked = Counter()
    for split in SPLITS:
        for example, family in zip(benchmark.splits[split], benchmark.families[split], strict=True):
            assert len(example.choices) == 4 and len(set(example.choices)) == 4
            if family == "odd_one_out":  # the category table is the generator's; check the choices are the listed words
                assert sorted(example.choices) == sorted(example.question.split(" : ")[1].removesuffix(" ?").split())
                continue
            assert example.choices[example.answer] == _reference_answer(family, example.question, example.choices)
            checked[family] += 1
    assert len(checked) == 8


def test_hand_checked_prompt_and_tokens():
    example = MCQAExample(question="what is 12 plus 7 ?", choices=("19", "18", "20", "21"), answer=0)
    prompt = DEFAULT_TEMPLATE.render(example)
    assert prompt == "Question: what is 12 plus 7 ?\nA. 19\nB. 18\nC. 20\nD. 21\nAnswer:"
    tokenizer = build_tokenizer()
    tokens = tokenizer.tokenize(prompt)
    assert tokens == "Question : what is 12 plus 7 ? A . 19 B . 18 C . 20 D . 21 Answer :".split()
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"


def test_every_prompt_is_known_to_the_tokenizer(benchmark):
    tokenizer = build_tokenizer()
    for split in SPLITS:
        ids = encode(tokenizer, benchmark.splits[split])["input_ids"]
        assert not (ids == tokenizer.unk_token_id).any(), split


def test_answer_letters_are_single_tokens_and_follow_the_prompt(loaded):
    ids = answer_token_ids(loaded.tokenizer).tolist()
    assert len(set(ids)) == 4 and loaded.answer_token_ids.tolist() == ids
    for letter, token_id in zip("ABCD", ids, strict=True):
        assert loaded.tokenizer.convert_ids_to_tokens(token_id) == letter
        assert loaded.tokenizer(f"Answer: {letter}")["input_ids"][-1] == token_id


def test_checkpoint_loads_offline_in_eval_mode_float32(loaded):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert not loaded.model.training
    assert {parameter.dtype for parameter in loaded.model.parameters()} == {torch.float32}
    config = loaded.model.config
    architecture = ("hidden_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok")
    assert [getattr(config, name) for name in architecture] == [96, 3, 8, 2]
    assert json.loads((CHECKPOINT_DIR / "config.json").read_text())["attn_implementation"] == "eager"
    assert config._attn_implementation == "eager"  # double backward works (Laplace)
    assert loaded.benchmark.seed == loaded.metrics["seed"]


def test_checkpoint_recomputes_its_recorded_slice_figures(loaded):
    recorded = loaded.metrics["test_slice"]
    test = loaded.benchmark.splits["test"][: loaded.metrics["slice_size"]]
    probs = answer_probabilities(loaded.model, loaded.tokenizer, test)
    figures = calibration_report(probs, labels_of(test), loaded.metrics["ece_bins"])
    assert figures["count"] == recorded["count"] == 100
    assert figures["accuracy"] == recorded["accuracy"]
    for name in ("ece", "nll", "confidence"):
        assert figures[name] == pytest.approx(recorded[name], abs=1e-5), name


def test_checkpoint_answers_hand_written_questions(loaded):
    """Questions of the families the model masters (test accuracy 1.0), answered by hand."""
    questions = [
        MCQAExample("which number is even : 7 13 42 5 ?", ("7", "13", "42", "5"), 2),
        MCQAExample("which number is even : 90 31 77 9 ?", ("31", "90", "77", "9"), 1),
        MCQAExample("which word is an animal : red horse blim green ?", ("red", "blim", "green", "horse"), 3),
        MCQAExample("which word is a colour : cat zorp pink dog ?", ("pink", "cat", "zorp", "dog"), 0),
    ]
    probs = answer_probabilities(loaded.model, loaded.tokenizer, questions)
    assert probs.shape == (4, 4)
    assert probs.argmax(-1).tolist() == [2, 1, 3, 0]


def test_recorded_figures_meet_the_requirements(loaded):
    assert loaded.metrics["ece_bins"] == 15
    splits = loaded.metrics["splits"]
    assert splits["test"]["count"] == 1000
    assert splits["test"]["accuracy"] >= 0.6
    assert splits["test"]["ece"] >= 0.05
    assert splits["test"]["confidence"] > splits["test"]["accuracy"]  # overconfident
    assert splits["test"]["accuracy"] > splits["near_ood"]["accuracy"] > splits["far_ood"]["accuracy"]
    assert splits["test"]["nll"] < splits["near_ood"]["nll"] < splits["far_ood"]["nll"]
    assert abs(splits["far_ood"]["accuracy"] - 0.25) < 0.05  # unseen task families: chance


def test_committed_checkpoint_is_small_and_documented():
    files = {path.name: path.stat().st_size for path in CHECKPOINT_DIR.iterdir()}
    assert sum(files.values()) <= 5 * 2**20
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json", "README.md"} <= set(files)
    command = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())["command"]
    assert command.startswith("python -m pyro_moe.experiments.benchmark_model train --seed 0 --out ")
    assert command in (CHECKPOINT_DIR / "README.md").read_text()


def test_the_end_of_text_token_is_the_last_id_and_bos_and_eos_everywhere(loaded):
    tokenizer, end_id = loaded.tokenizer, len(loaded.tokenizer) - 1
    assert tokenizer.convert_ids_to_tokens(end_id) == END_OF_TEXT
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == end_id
    assert tokenizer(END_OF_TEXT)["input_ids"] == [end_id]
    assert tokenizer("Answer: A")["input_ids"] == tokenizer("Answer: A", add_special_tokens=True)["input_ids"]
    assert end_id not in tokenizer("Answer: A")["input_ids"]  # encoding adds no special token
    config, generation = loaded.model.config, loaded.model.generation_config
    assert config.vocab_size == end_id + 1 == loaded.model.get_output_embeddings().weight.shape[0]
    assert config.eos_token_id == config.bos_token_id == generation.eos_token_id == generation.bos_token_id == end_id
    assert generation.pad_token_id == tokenizer.pad_token_id == 0
    assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight


def test_the_checkpoint_recomputes_its_end_of_text_figures_and_ends_its_answers(loaded):
    """The recorded figures, recomputed; HF's own greedy generate answers and then stops at the end-of-text
    token on the questions where the recorded figures say it should."""
    recorded = loaded.metrics["end_of_text"]
    test = loaded.benchmark.splits["test"]
    assert end_of_text_figures(loaded.model, loaded.tokenizer, test) == recorded["test"]
    assert recorded["test"]["after_answer"] > 0.95 and recorded["test"]["before_answer"] < 0.02
    batch = encode(loaded.tokenizer, test[:16])
    with torch.no_grad():
        generated = loaded.model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1] :]
    end_id = loaded.tokenizer.eos_token_id
    answered = torch.isin(generated[:, 0], loaded.answer_token_ids)
    assert answered.float().mean() > 0.8
    ended = answered & (generated[:, 1] == end_id)
    assert ended.float().mean() > 0.8
    assert (generated[ended, 2:] == loaded.tokenizer.pad_token_id).all()  # finished: padded after the end


def test_training_is_deterministic_and_writes_a_loadable_checkpoint(tmp_path):
    settings = TrainingSettings(steps=3, batch_size=8, warmup_steps=2)
    end_of_text = EndOfTextSettings(steps=5)
    first = train_benchmark_model(1, tmp_path / "first", settings, SMALL, end_of_text)
    second = train_benchmark_model(1, tmp_path / "second", settings, SMALL, end_of_text)
    weights = load_file(tmp_path / "first" / "model.safetensors")
    again = load_file(tmp_path / "second" / "model.safetensors")
    assert weights.keys() == again.keys()
    assert all(torch.equal(weights[name], again[name]) for name in weights)
    assert first["splits"] == second["splits"] and first["sizes"] == SMALL
    assert first["end_of_text"] == second["end_of_text"] and first["end_of_text"]["steps"] == 5
    reloaded = load_benchmark(tmp_path / "first")
    assert reloaded.benchmark == generate_benchmark(1, SMALL)
    assert reloaded.model.config.eos_token_id == reloaded.tokenizer.eos_token_id == len(reloaded.tokenizer) - 1


def test_the_end_of_text_stage_changes_its_row_alone(tmp_path, monkeypatch):
    """Every weight but the new row is the answer-letter stage's, bit for bit: the end-of-text stage is
    skipped by replacing it with a plain vocabulary growth, and the two checkpoints compared."""
    import pyro_moe.experiments.benchmark_model as benchmark_model

    settings = TrainingSettings(steps=3, batch_size=8, warmup_steps=2)
    train_benchmark_model(1, tmp_path / "trained", settings, SMALL, EndOfTextSettings(steps=20))

    def grow_only(model, tokenizer, examples, settings=None):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        return {"loss": 0.0, "after_answer": 0.0, "before_answer": 0.0}

    monkeypatch.setattr(benchmark_model, "train_end_of_text", grow_only)
    train_benchmark_model(1, tmp_path / "grown", settings, SMALL)
    trained = load_file(tmp_path / "trained" / "model.safetensors")
    grown = load_file(tmp_path / "grown" / "model.safetensors")
    for name, weight in trained.items():
        if name == "model.embed_tokens.weight":
            assert torch.equal(weight[:-1], grown[name][:-1]) and not torch.equal(weight[-1], grown[name][-1])
        else:
            assert torch.equal(weight, grown[name]), name


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(ConfigurationError, match="multiple of its 5 task families"):
        generate_benchmark(0, {"test": 12})
    with pytest.raises(ConfigurationError, match="unknown split names"):
        generate_benchmark(0, {"validation": 100})
    with pytest.raises(ConfigurationError, match="'addition' gave no new question"):
        generate_benchmark(0, {"train": 20_000})  # 4400 additions of operands 0..59 asked for, 3600 exist
    with pytest.raises(ConfigurationError, match=r"no metrics\.json"):
        load_benchmark(tmp_path)


def test_an_enlarged_test_split_shares_no_question_with_the_shipped_models_train_or_calibration():
    """The shipped model's seed and sizes (its metrics.json): 4000 fresh test questions after the 1000, train and
    calibration exactly the ones it was trained and calibrated on, every added answer right, families equal."""
    recorded = json.loads((CHECKPOINT_DIR / "metrics.json").read_text())
    shipped = generate_benchmark(recorded["seed"], recorded["sizes"])
    larger = generate_benchmark(recorded["seed"], recorded["sizes"], extend_to={"test": 5000, "far_ood": 2000})
    assert larger == generate_benchmark(recorded["seed"], recorded["sizes"], extend_to={"test": 5000, "far_ood": 2000})
    for split in ("train", "calibration", "near_ood"):
        assert larger.splits[split] == shipped.splits[split] and larger.families[split] == shipped.families[split]
    test = larger.splits["test"]
    assert len(test) == 5000 and test[:1000] == shipped.splits["test"]  # the first 1000 are the split as it was
    seen = {example.question for split in ("train", "calibration") for example in shipped.splits[split]}
    assert not {example.question for example in test} & seen
    every_question = [example.question for split in SPLITS for example in larger.splits[split]]
    assert len(set(every_question)) == len(every_question)
    added = list(zip(test[1000:], larger.families["test"][1000:], strict=True))
    assert Counter(family for _, family in added) == dict.fromkeys(set(shipped.families["train"]), 800)
    assert Counter(example.answer for example, _ in added) == dict.fromkeys(range(4), 1000)
    for example, family in added:
        assert example.choices[example.answer] == _reference_answer(family, example.question, example.choices)
    assert len(larger.splits["far_ood"]) == 2000 and larger.splits["far_ood"][:1000] == shipped.splits["far_ood"]


@pytest.mark.parametrize(
    ("extend_to", "message"),
    [
        ({"train": 9000}, r"extend_to names \['train'\]; accepted: \['test', 'near_ood', 'far_ood'\]"),
        ({"test": 1003}, "exceeds it by a multiple of its 5 task families"),
        ({"test": 500}, "at least the split's size 1000"),
        ({"far_ood": 1002}, "multiple of its 4 task families"),
        ({"test": 5000.0}, "an integer"),
    ],
)
def test_bad_extensions_are_refused_before_loading(extend_to, message):
    with pytest.raises(ConfigurationError, match=message):
        load_benchmark(extend_to=extend_to)
