"""``pyro-moe generate`` on a tiny checkpoint saved with ``save_pretrained``: the same tokens and figures as the
library on the same model and seed, under the prior and under a saved posterior, and its bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from pyro_moe import fit, generate, patch_routers
from pyro_moe.cli import EXIT_BAD_INPUT, LOG_NAME, build_parser, main
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.run_lock import LOCK_NAME
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import tiny_model, tiny_tokenizer

PROMPTS = ["Question : A B", "Answer : C D C"]
FIGURES = ("predictive_entropy", "expected_entropy", "mutual_information")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny Granite-MoE with the tiny tokenizer, a prompts file and a posterior fitted on that model."""
    root = tmp_path_factory.mktemp("generate")
    tiny_model("granitemoe").save_pretrained(root / "moe")
    tiny_tokenizer().save_pretrained(root / "moe")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    model = AutoModelForCausalLM.from_pretrained(root / "moe").eval()
    handle = patch_routers(model, {"logits": 2.0}, layers=[1])
    fit(handle, mcqa_batches(2, 4), "mfvr", answer_token_ids=ANSWERS, steps=2, progress=False).save(root / "posterior")
    return {"moe": root / "moe", "prompts": prompts, "posterior": root / "posterior"}


def library_generation(saved, posterior: bool):
    model = AutoModelForCausalLM.from_pretrained(saved["moe"]).eval()
    tokenizer = tiny_tokenizer()
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    options = dict(max_new_tokens=4, num_samples=3, seed=0, tokenizer=tokenizer)
    if posterior:
        return FittedPosterior.load(saved["posterior"], model).generate(
            encoded["input_ids"], encoded["attention_mask"], **options
        )
    return generate(patch_routers(model, {"logits": 2.0}), encoded["input_ids"], encoded["attention_mask"], **options)


@pytest.mark.parametrize("posterior", [False, True])
def test_generate_writes_what_the_library_generates(saved, tmp_path, capsys, posterior):
    out = tmp_path / "run"
    argv = ["generate", "--model", str(saved["moe"]), "--prompts", str(saved["prompts"]), "--max-new-tokens", "4"]
    argv += ["--samples", "3", "--out", str(out)]
    argv += ["--posterior", str(saved["posterior"])] if posterior else []
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "\033[" not in printed  # not a terminal: no colours
    assert all(prompt in printed for prompt in PROMPTS)
    assert {path.name for path in out.iterdir()} >= {"generations.jsonl", "generations.html", "generations.png"}
    records = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    expected = library_generation(saved, posterior)
    assert [record["prompt"] for record in records] == PROMPTS
    for row, record in enumerate(records):
        length = int(expected.lengths[row])
        assert [token["id"] for token in record["tokens"]] == expected.tokens[row, :length].tolist()
        assert record["stopped"] == bool(expected.stopped[row])
        for name in FIGURES:
            values = [token[name] for token in record["tokens"]]
            assert values == pytest.approx(getattr(expected, name)[row, :length].tolist(), abs=1e-6)
        assert record["max_mutual_information"] == pytest.approx(float(expected.max_mutual_information[row]), abs=1e-6)
    assert (out / "generations.png").read_bytes()[:4] == b"\x89PNG"
    assert "<span" in (out / "generations.html").read_text()


def test_help():
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["generate", "--help"])
    assert stop.value.code == 0


def bad_input(tmp_path, capsys, argv) -> str:
    out = tmp_path / "bad"
    assert main([*argv, "--out", str(out)]) == EXIT_BAD_INPUT
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pyro-moe generate: error: ") and "Traceback" not in error
    if out.exists():
        assert sorted(path.name for path in out.iterdir()) == sorted([LOCK_NAME, LOG_NAME])
    return error


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--prompts", "EMPTY"], "no prompt"),
        (["--prompt", "A", "--temperature", "0.5"], "--do-sample"),
        (["--prompt", "A", "--do-sample", "--top-p", "1.5"], "--top-p"),
        (["--prompt", "A", "--posterior", "POSTERIOR", "--sites", "logits"], "--posterior carries"),
        (["--prompt", "A", "--uncertain-quantile", "2"], "--uncertain-quantile"),
        (["--prompts", "MISSING"], "no such file"),
        (["--prompt", "A", "--sites", '{"logits": -1}'], "prior scale"),
    ],
)
def test_bad_input_is_one_line_before_any_work(saved, tmp_path, capsys, options, reason):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    replace = {"EMPTY": str(empty), "MISSING": str(tmp_path / "missing.txt"), "POSTERIOR": str(saved["posterior"])}
    options = [replace.get(option, option) for option in options]
    error = bad_input(tmp_path, capsys, ["generate", "--model", str(saved["moe"]), *options])
    assert reason in error


@pytest.mark.parametrize(
    "options",
    [
        [],  # neither --prompt nor --prompts
        ["--prompt", "A", "--prompts", "x.txt"],
        ["--prompt", "A", "--samples", "0"],
        ["--prompt", "A", "--max-new-tokens", "0"],
        ["--prompt", "A", "--mode", "average"],
    ],
)
def test_refused_at_parsing(tmp_path, capsys, options):
    with pytest.raises(SystemExit) as stop:
        main(["generate", *options, "--out", str(tmp_path / "never")])
    assert stop.value.code == EXIT_BAD_INPUT
    assert not (tmp_path / "never").exists()


def test_colours_on_a_terminal_only(saved, tmp_path, capsys, monkeypatch):
    argv = ["generate", "--model", str(saved["moe"]), "--prompt", PROMPTS[0], "--max-new-tokens", "3"]
    argv += ["--samples", "3", "--uncertain-quantile", "0", "--out", str(tmp_path / "run")]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "\033[1;31m" in printed and "[[" not in printed  # every token with MI > 0 is marked
