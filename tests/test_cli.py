"""The ``pyro-moe`` command line end to end on a tiny checkpoint saved with ``save_pretrained``,
bad input (exit code 2, one line, nothing but the log in ``--out``) and the refusal of tampered checkpoints."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import arviz as az
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

from pyro_moe import cli
from pyro_moe.cli import EXIT_BAD_INPUT, LOG_NAME, build_parser, main
from pyro_moe.data import answer_token_ids, load_mcqa, mcqa_batches
from pyro_moe.evaluation.metrics import calibration_report
from pyro_moe.evaluation.stability import DEFAULT_GAMMA, routing_stability, susceptible_layers
from pyro_moe.experiments.evaluation import FitSettings, fit_named_families, fit_named_recipes
from pyro_moe.inference import presets
from pyro_moe.inference.checkpoint import CheckpointError
from pyro_moe.inference.fitting import FittedPosterior
from pyro_moe.run_lock import HOLDER_NAME, LOCK_NAME
from tests.experiments.tiny_evaluation import direct_answer_probs, tiny_splits
from tests.tiny_models import tiny_dense_model, tiny_model, tiny_tokenizer

COMMANDS = ("demo", "stability", "fit", "laplace", "evaluate", "diagnose", "compare", "bench")


def _write_jsonl(path: Path, examples) -> Path:
    rows = [{"question": e.question, "choices": list(e.choices), "answer": e.answer} for e in examples]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny Granite-MoE and the tiny tokenizer saved with save_pretrained, a dense model, and JSONL files."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model("granitemoe").save_pretrained(root / "moe")
    tiny_tokenizer().save_pretrained(root / "moe")
    tiny_dense_model().save_pretrained(root / "dense")
    tiny_tokenizer().save_pretrained(root / "dense")
    splits = tiny_splits()
    data = _write_jsonl(root / "train.jsonl", splits["train"] + splits["test"])
    ood = _write_jsonl(root / "far.jsonl", splits["far_ood"])
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"question": "what", "choices": ["1", "2"], "answer": 0}) + "\n")
    return {"moe": root / "moe", "dense": root / "dense", "data": data, "ood": ood, "bad": bad, "root": root}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pyro-moe {command}")
    assert "--seed" in out


def test_end_to_end_on_a_saved_checkpoint(saved, tmp_path, capsys):
    model = ["--model", str(saved["moe"]), "--data", str(saved["data"]), "--batch-size", "8"]
    assert main(["stability", *model, "--examples", "8", "--out", str(tmp_path / "stability")]) == 0
    stability = json.loads((tmp_path / "stability" / "metrics.json").read_text())
    assert len(stability["susceptible_layers"]) == 1 and stability["susceptible_layers"][0] in (0, 1)

    fit = [*model, "--layers", "susceptible", "--examples", "8", "--steps", "3", "--fit-examples", "16"]
    assert main(["fit", *fit, "--guide", "mean-field", "--out", str(tmp_path / "fit")]) == 0
    config = json.loads((tmp_path / "fit" / "posterior" / "config.json").read_text())
    assert config["guide"] == "mean-field" and config["layers"] == stability["susceptible_layers"]
    assert len(config["history"]) == 3
    assert (tmp_path / "fit" / "posterior" / "tensors.safetensors").is_file()

    posterior = str(tmp_path / "fit" / "posterior")
    evaluate = [*model, "--posterior", posterior, "--ood-data", str(saved["ood"]), "--samples", "2"]
    assert main(["evaluate", *evaluate, "--out", str(tmp_path / "evaluate")]) == 0
    rows = json.loads((tmp_path / "evaluate" / "calibration" / "metrics.json").read_text())["rows"]
    assert {(row["method"], row["mode"]) for row in rows} >= {("deterministic", "any"), ("posterior", "model-average")}
    # the deterministic row against the unpatched HF model's own forward on the test part (after the first quarter)
    splits, tokenizer = tiny_splits(), tiny_tokenizer()
    examples = (splits["train"] + splits["test"])[len(splits["train"] + splits["test"]) // 4 :]
    hf = AutoModelForCausalLM.from_pretrained(saved["moe"]).eval()
    probs = direct_answer_probs(hf, tokenizer, examples, answer_token_ids(tokenizer))
    labels = torch.tensor([e.answer for e in examples])
    expected = calibration_report(probs, labels)
    deterministic = next(row for row in rows if row["method"] == "deterministic")
    assert deterministic["accuracy"] == pytest.approx(expected["accuracy"])
    assert deterministic["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    ood = json.loads((tmp_path / "evaluate" / "ood" / "metrics.json").read_text())["rows"]
    assert {row["ood_split"] for row in ood} == {"ood_0_far"}

    diagnose = [*model, "--posterior", posterior, "--examples", "8", "--samples", "4"]
    assert main(["diagnose", *diagnose, "--out", str(tmp_path / "diagnose")]) == 0
    idata = az.from_netcdf(tmp_path / "diagnose" / "posterior.nc")
    assert idata.posterior.sizes["draw"] == 4 and "weight" in idata.posterior
    assert list(idata.posterior["layer"].values) == stability["susceptible_layers"]
    assert (tmp_path / "diagnose" / "collapse.csv").read_text().startswith("chain,site")
    assert (tmp_path / "diagnose" / "collapse.png").stat().st_size > 0


def test_cli_and_library_choose_the_same_susceptible_layers(saved, tmp_path):
    """``stability`` and ``fit --layers susceptible`` pick what the library's rule picks with its defaults."""
    common = ["--model", str(saved["moe"]), "--data", str(saved["data"]), "--examples", "12", "--batch-size", "4"]
    assert main(["stability", *common, "--out", str(tmp_path / "stability")]) == 0
    reported = json.loads((tmp_path / "stability" / "metrics.json").read_text())
    fit = [*common, "--layers", "susceptible", "--steps", "1", "--fit-examples", "4", "--out", str(tmp_path / "fit")]
    assert main(["fit", *fit]) == 0
    fitted = json.loads((tmp_path / "fit" / "posterior" / "config.json").read_text())["layers"]

    model = AutoModelForCausalLM.from_pretrained(saved["moe"]).eval()
    questions = list(load_mcqa(str(saved["data"])))[:12]
    result = routing_stability(model, list(mcqa_batches(questions, tiny_tokenizer(), 4)))
    library = susceptible_layers(result, k=1)
    assert reported["gamma"] == DEFAULT_GAMMA
    assert reported["susceptible_layers"] == fitted == library
    assert susceptible_layers(result, k=1, gamma=0.01) != library  # on this model the noise level decides


def _saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """A saved posterior's tensors, each eigenvector matrix ``V`` replaced by the factor ``V diag(l) V^T``
    it stands for (the eigenvectors of repeated eigenvalues, zeros included, are not unique)."""
    tensors = load_file(folder / "tensors.safetensors")
    for name in [name for name in tensors if name.endswith("_vectors")]:
        vectors, values = tensors.pop(name), tensors[name.removesuffix("_vectors") + "_values"]
        tensors[name.removesuffix("_vectors") + "_factor"] = (vectors * values[..., None, :]) @ vectors.mT
    return tensors


@pytest.mark.parametrize(("command", "guide"), [("fit", "mean-field"), ("laplace", "expert-laplace")])
def test_fit_patches_the_loaded_model_itself(saved, tmp_path, monkeypatch, command, guide):
    """``fit`` and ``laplace`` patch the model they loaded (no deep copy of the MoE) and fit what
    ``fit_named_families`` fits on a copy (sites, layers, batches, prior precision chosen on the grid)."""
    loaded, patched = [], []
    load_model, fit = cli.inputs.load_model, presets.fit
    monkeypatch.setattr(cli.inputs, "load_model", lambda args: loaded.append(load_model(args)) or loaded[-1])
    monkeypatch.setattr(presets, "fit", lambda patch, *a, **k: patched.append(patch.model) or fit(patch, *a, **k))
    deepcopy = copy.deepcopy

    def no_model_copies(value, *args):
        if isinstance(value, nn.Module):
            pytest.fail(f"the fit path deep-copied a {type(value).__name__}")
        return deepcopy(value, *args)

    monkeypatch.setattr(copy, "deepcopy", no_model_copies)
    options = ["--data", str(saved["data"]), "--steps", "2", "--fit-examples", "8", "--examples", "8"]
    argv = [command, "--model", str(saved["moe"]), *options, "--batch-size", "4", "--guide", guide]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    monkeypatch.undo()
    assert len(patched) == 1 and patched[0] is loaded[0][0]

    splits = {"train": list(load_mcqa(str(saved["data"])))}
    splits["calibration"] = splits["train"]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(saved["moe"]).eval(), tiny_tokenizer()
    fitting = FitSettings(examples=8, steps=2, batch_size=4, validation_examples=8, progress=False)
    letters = answer_token_ids(tokenizer)
    (copied,) = fit_named_families(model, tokenizer, splits, [guide], fitting, answer_token_ids=letters).values()
    copied.save(tmp_path / "library")
    expected, written = (_saved_tensors(tmp_path / folder) for folder in ("library", "cli/posterior"))
    assert expected.keys() == written.keys()
    for name, tensor in expected.items():  # the copy's weights are aligned differently in memory: rounding
        torch.testing.assert_close(written[name], tensor, rtol=1e-6, atol=1e-6, msg=lambda text, name=name: name + text)
    configs = [json.loads((tmp_path / folder / "config.json").read_text()) for folder in ("library", "cli/posterior")]
    histories = [config.pop("history") for config in configs]
    assert configs[1] == configs[0]
    assert histories[1] == [pytest.approx(step, rel=1e-6) for step in histories[0]]


def _bad_input(tmp_path, capsys, argv) -> str:
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err  # above the reason: progress bars of from_pretrained, if any
    assert "Traceback" not in err
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"pyro-moe {argv[0]}: error: ")
    assert sorted(path.name for path in out.iterdir()) == sorted([LOCK_NAME, LOG_NAME])  # the lock, released
    return error


def test_bad_model_paths_and_models(saved, tmp_path, capsys):
    data = ["--data", str(saved["data"])]
    error = _bad_input(tmp_path, capsys, ["fit", "--model", str(saved["root"] / "missing"), *data])
    assert "no such file" in error and "missing" in error
    error = _bad_input(tmp_path, capsys, ["stability", "--model", str(saved["dense"]), *data])
    assert "Mixture-of-Experts" in error or "MoE" in error


def test_bad_data_guide_and_prior(saved, tmp_path, capsys):
    model = ["--model", str(saved["moe"])]
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--data", str(saved["bad"])])
    assert "bad.jsonl" in error and "no row fits" in error
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--data", str(saved["data"]), "--guide", "mystery"])
    assert "mystery" in error and "mean-field" in error
    prior = ["--sites", "logits", "--prior", "cauchy-ish", "--guide", "mfvr"]
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--data", str(saved["data"]), *prior])
    assert "cauchy-ish" in error and "student-t" in error


@pytest.mark.parametrize("command", COMMANDS)
def test_out_must_be_a_folder(command, tmp_path, capsys):
    results = tmp_path / "results.txt"
    results.write_text("kept")
    posterior = ["--posterior", str(tmp_path)] if command == "diagnose" else []
    for out, reason in ((results, "is a file"), (results / "run", f"is under the file {results}")):
        assert main([command, *posterior, "--out", str(out)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        message = f"--out {out} {reason}: --out needs a folder (existing or new) to write the results into."
        assert err == f"pyro-moe {command}: error: {message}\n"  # one line, no traceback
    assert results.read_text() == "kept"


def test_a_broken_jsonl_line_is_skipped_and_named_by_file_line(saved, tmp_path, capsys):
    lines = saved["data"].read_text().splitlines()
    lines[2] = lines[2][: len(lines[2]) // 2]  # file line 3 cut short
    data = tmp_path / "damaged.jsonl"
    data.write_text("\n".join(lines) + "\n")
    argv = ["stability", "--model", str(saved["moe"]), "--data", str(data), "--examples", "8", "--batch-size", "8"]
    assert main([*argv, "--out", str(tmp_path)]) == 0  # an existing folder is a fine --out
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warning = (
        f"pyro-moe stability: warning: {data}: skipped 1 of {len(lines)} rows (invalid JSON: 1); first: file line 3\n"
    )
    assert warning in err
    assert warning.removeprefix("pyro-moe stability: warning: ").strip() in (tmp_path / LOG_NAME).read_text()


def test_a_file_of_broken_lines_is_refused(saved, tmp_path, capsys):
    data = tmp_path / "broken.jsonl"
    data.write_text('{"question": "q", "choices": ["a"\n\n{"question"\n')
    error = _bad_input(tmp_path, capsys, ["stability", "--model", str(saved["moe"]), "--data", str(data)])
    assert error.endswith("broken.jsonl: no usable row ({'invalid JSON': 2}); first: file lines 1, 3.")


TEXT = (
    "the sky is blue\n"
    "\n"
    "what colour is the sky ? the sky is blue .\n"
    "yes , the sky is blue and the sky is true\n"
    "which is the colour of the sky ?\n"
    "no , the sky is not a colour\n"
)


def test_fit_on_text_writes_a_posterior_that_loads_and_evaluate_writes_its_perplexity(saved, tmp_path):
    train, held_out = tmp_path / "train.txt", tmp_path / "held_out.txt"
    train.write_text(TEXT)
    held_out.write_text("the sky is blue .\n\nwhat is the colour of the sky ?\nthe sky is a colour\n")
    fit = ["--model", str(saved["moe"]), "--text", str(train), "--guide", "mfvr", "--sites", "logits"]
    assert main(["fit", *fit, "--steps", "3", "--batch-size", "2", "--out", str(tmp_path / "fit")]) == 0
    summary = json.loads((tmp_path / "fit" / "fit.json").read_text())
    assert summary["likelihood"] == "next-token" and summary["last_step"]["step"] == 2
    manifest = json.loads((tmp_path / "fit" / "posterior" / "manifest.json").read_text())
    assert summary["model"] == str(saved["moe"])  # and the fingerprint the posterior is bound to
    assert summary["model_config_sha256"] == manifest["model"]["config_sha256"]
    assert summary["model_weights_sha256"] == manifest["model"]["weights"] != {}
    posterior = FittedPosterior.load(tmp_path / "fit" / "posterior", tiny_model("granitemoe"))
    assert posterior.config["likelihood"] == "next-token" and len(posterior.history) == 3
    assert posterior.guide.local_sites == [f"model.layers.{layer}.block_sparse_moe.router.logits" for layer in (0, 1)]

    evaluate = [
        "--model",
        str(saved["moe"]),
        "--text",
        str(held_out),
        "--posterior",
        str(tmp_path / "fit" / "posterior"),
    ]
    assert main(["evaluate", *evaluate, "--samples", "2", "--out", str(tmp_path / "evaluate")]) == 0
    metrics = json.loads((tmp_path / "evaluate" / "perplexity" / "metrics.json").read_text())
    rows = {(row["method"], row["mode"]): row for row in metrics["rows"]}
    assert set(rows) == {("deterministic", "any"), ("posterior", "model-average"), ("posterior", "routing-average")}
    assert metrics["documents"] == 3 and metrics["num_samples"] == 2
    # the deterministic row against the unpatched HF model's own loss on each document alone
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(saved["moe"]).eval(), tiny_tokenizer()
    losses, tokens = 0.0, 0
    for line in ("the sky is blue .", "what is the colour of the sky ?", "the sky is a colour"):
        ids = torch.tensor([tokenizer(line)["input_ids"]])
        with torch.no_grad():
            losses += float(hf(ids, labels=ids).loss) * (ids.shape[1] - 1)
        tokens += ids.shape[1] - 1
    assert rows["deterministic", "any"]["tokens"] == tokens
    assert rows["deterministic", "any"]["perplexity"] == pytest.approx(math.exp(losses / tokens), rel=1e-5)
    assert all(math.isfinite(row["perplexity"]) for row in rows.values())
    assert (tmp_path / "evaluate" / "perplexity" / "report.md").read_text().startswith("# Held-out perplexity")


def test_bad_text_input_ends_with_exit_2_and_one_line(saved, tmp_path, capsys):
    model = ["--model", str(saved["moe"])]
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_text("")
    blank.write_bytes(b"\n   \n\xff\n")
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--text", str(empty)])
    assert error.endswith(f"{empty}: no usable line (the file is empty); give one document per line.")
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--text", str(blank)])
    assert error.endswith(f"{blank}: no usable line ({{'blank': 2, 'not UTF-8 text': 1}}); first: file lines 1, 2, 3.")
    error = _bad_input(tmp_path, capsys, ["evaluate", *model, "--text", str(blank), "--posterior", str(tmp_path)])
    assert "blank.txt: no usable line" in error
    text = tmp_path / "train.txt"
    text.write_text(TEXT)
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--text", str(text), "--guide", "expert-laplace"])
    assert "'expert-laplace' fits the mcqa likelihood only" in error
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--text", str(text), "--layers", "susceptible"])
    assert "--layers susceptible" in error and "--text" in error
    error = _bad_input(tmp_path, capsys, ["fit", *model, "--text", str(text), "--max-length", "100"])
    assert error.endswith("--max-length 100 exceeds the model's 64 positions (max_position_embeddings).")
    error = _bad_input(tmp_path, capsys, ["evaluate", *model, "--text", str(text)])
    assert "evaluate --text needs --posterior" in error
    error = _bad_input(tmp_path, capsys, ["evaluate", *model, "--text", str(text), "--guides", "mfvr"])
    assert "evaluate --text measures a saved --posterior" in error


class _Payload:
    """A pickle that would create ``marker`` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def saved_posterior(saved, tmp_path) -> Path:
    argv = ["fit", "--model", str(saved["moe"]), "--data", str(saved["data"]), "--steps", "2", "--batch-size", "8"]
    assert main([*argv, "--fit-examples", "8", "--out", str(tmp_path / "fit")]) == 0
    return tmp_path / "fit" / "posterior"


def test_truncated_and_pickled_checkpoints_are_refused(saved, saved_posterior, tmp_path, capsys):
    model = tiny_model("granitemoe")
    routers = {name: type(module) for name, module in model.named_modules()}
    tensors = saved_posterior / "tensors.safetensors"
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors.*truncated or tampered"):
        FittedPosterior.load(saved_posterior, model)

    marker = tmp_path / "executed"
    tensors.write_bytes(pickle.dumps({"loc": _Payload(marker)}))
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors"):
        FittedPosterior.load(saved_posterior, model)
    torch_file = tmp_path / "torch.pt"
    torch.save({"loc": _Payload(marker)}, torch_file)
    tensors.write_bytes(torch_file.read_bytes())
    with pytest.raises(CheckpointError, match=r"tensors\.safetensors"):
        FittedPosterior.load(saved_posterior, model)
    assert not marker.exists()
    assert {name: type(module) for name, module in model.named_modules()} == routers  # nothing half-loaded

    argv = ["diagnose", "--model", str(saved["moe"]), "--data", str(saved["data"]), "--posterior", str(saved_posterior)]
    error = _bad_input(tmp_path, capsys, argv)
    assert "tensors.safetensors" in error
    assert not marker.exists()


HEAVY_MODULES = ("torch", "pyro", "transformers", "numpy", "scipy", "arviz", "matplotlib", "sklearn", "pandas")


def run_in_fresh_process(argv: list[str]) -> tuple[list[str], str]:
    """``main(argv)`` in a new interpreter: its stdout lines, ending with ``exit <code>`` and the heavy
    modules it imported (``[]``: none), and its stderr."""
    script = (
        "import sys\n"
        "from pyro_moe.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    print('exit', exit.code)\n"
        f"print(sorted({{name.split('.')[0] for name in sys.modules}} & set({HEAVY_MODULES!r})))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    return result.stdout.strip().splitlines(), result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["fit", "--steps", "-1", "--out", "runs/never"],
        ["evaluate", "--samples", "0", "--out", "runs/never"],
        ["fit", "--timeout", "nan", "--out", "runs/never"],
    ],
)
def test_help_and_bad_numbers_answer_without_importing_torch(argv):
    """``--help`` and numbers refused at parsing exit before torch, Pyro or transformers are imported."""
    lines, stderr = run_in_fresh_process(argv)
    assert lines[-1] == "[]", f"imported {lines[-1]}"
    assert lines[-2] == ("exit 0" if argv == ["--help"] else "exit 2")
    if argv != ["--help"]:
        assert stderr.count("\n") == 1 and "must be a" in stderr


@pytest.mark.parametrize("command", ["demo", "stability", "fit", "laplace", "evaluate", "compare", "diagnose", "bench"])
def test_every_subcommand_help_answers_without_importing_torch(command):
    stdout, _ = run_in_fresh_process([command, "--help"])
    assert stdout[-2:] == ["exit 0", "[]"]
    assert "--out" in "\n".join(stdout)


@pytest.mark.parametrize("command", ["fit", "evaluate"])
def test_text_and_data_together_are_refused_at_parsing_without_importing_torch(command):
    argv = [command, "--text", "train.txt", "--data", "train.jsonl", "--out", "runs/never"]
    stdout, stderr = run_in_fresh_process(argv)
    assert stdout[-2:] == ["exit 2", "[]"]
    assert stderr == f"pyro-moe {command}: error: argument --data: not allowed with argument --text\n"
    assert not Path("runs/never").exists()


def test_fit_recipe_runs_the_library_recipe_on_the_data_cut(saved, tmp_path, capsys):
    """``fit --recipe`` with one --data file: its first quarter chooses the scale and calibrates, the rest is
    fitted on, as ``fit_named_recipes`` does with those splits; everything lands in the run folder."""
    model = ["--model", str(saved["moe"]), "--data", str(saved["data"]), "--batch-size", "8", "--layers", "1"]
    argv = ["fit", *model, "--recipe", "mfvr-iwae-expert", "--steps", "2", "--out", str(tmp_path / "recipe")]
    assert main(argv) == 0
    assert "mfvr-iwae-expert on layers [1]" in capsys.readouterr().out
    summary = json.loads((tmp_path / "recipe" / "fit.json").read_text())
    config = json.loads((tmp_path / "recipe" / "posterior" / "config.json").read_text())
    assert summary["recipe"]["name"] == config["recipe"]["name"] == "mfvr-iwae-expert"
    assert set(config["calibration"]) == {"model-average", "routing-average"}
    assert config["objective"] == "iwae" and len(config["history"]) == 2
    assert "| scale | layers | calibration NLL | chosen |" in (tmp_path / "recipe" / "recipe.md").read_text()
    assert (tmp_path / "recipe" / "scales.png").read_bytes()[:4] == b"\x89PNG"

    questions = list(load_mcqa(str(saved["data"])))
    cut = len(questions) // 4
    splits = {"calibration": questions[:cut], "train": questions[cut:]}
    hf, tokenizer = AutoModelForCausalLM.from_pretrained(saved["moe"]).eval(), tiny_tokenizer()
    fitting = FitSettings(examples=512, layers=[1], batch_size=8, validation_examples=200, progress=False)
    letters = answer_token_ids(tokenizer)
    recipes = fit_named_recipes(hf, tokenizer, splits, ["mfvr-iwae-expert"], fitting, answer_token_ids=letters, steps=2)
    (result,) = recipes.values()
    expected = result.selection.to_json()
    assert summary["selection"]["chosen"] == expected["chosen"] and summary["selection"]["examples"] == cut
    for row, expected_row in zip(summary["selection"]["scores"], expected["scores"], strict=True):
        assert row == {**expected_row, "nll": pytest.approx(expected_row["nll"], rel=1e-5)}
    for mode, scaling in result.posterior.calibration.items():
        assert config["calibration"][mode]["temperature"] == pytest.approx(scaling.temperature, rel=1e-5)
    for site, scale in result.posterior.prior_scales().items():
        assert summary["prior_scales"][site] == pytest.approx(scale.tolist(), rel=1e-5)

    calibration = _write_jsonl(tmp_path / "calibration.jsonl", tiny_splits(seed=3)["calibration"])
    argv = ["fit", *model, "--recipe", "fcvr-iwae-layer", "--steps", "1", "--calibration-data", str(calibration)]
    assert main([*argv, "--calibration-examples", "20", "--out", str(tmp_path / "separate")]) == 0
    separate = json.loads((tmp_path / "separate" / "fit.json").read_text())
    assert separate["selection"]["examples"] == 20  # the calibration file's first 20 questions
    every = ["--examples", "8", "--scale", "0.6", "--out", str(tmp_path / "every")]
    assert main([*argv, *every]) == 0  # --examples is not the calibration set: all of it by default
    fixed = json.loads((tmp_path / "every" / "fit.json").read_text())
    assert fixed["selection"]["examples"] == len(tiny_splits(seed=3)["calibration"]) > 8
    assert [row["scale"] for row in fixed["selection"]["scores"]] == [0.6] and fixed["selection"]["chosen"][
        "scale"
    ] == 0.6
    grid = ["--scale-grid", "0.4", "0.8", "--selection", "calibrated", "--out", str(tmp_path / "grid")]
    assert main([*argv, *grid]) == 0
    chosen = json.loads((tmp_path / "grid" / "fit.json").read_text())["selection"]
    assert [row["scale"] for row in chosen["scores"]] == [0.4, 0.8] and chosen["objective"] == "calibrated"


def test_an_unknown_recipe_is_refused_at_parsing_without_importing_torch():
    stdout, stderr = run_in_fresh_process(["fit", "--recipe", "mfvr-elbo", "--out", "runs/never"])
    assert stdout[-2:] == ["exit 2", "[]"]
    assert stderr.count("\n") == 1
    assert "unknown recipe 'mfvr-elbo'; registered recipes: mfvr-iwae-layer, mfvr-iwae-expert, " in stderr
    assert not Path("runs/never").exists()


def test_bad_recipe_options(saved, tmp_path, capsys):
    data = ["--model", str(saved["moe"]), "--data", str(saved["data"])]
    error = _bad_input(tmp_path, capsys, ["fit", *data, "--recipe", "mfvr-iwae-layer", "--sites", "logits"])
    assert "--recipe patches its own logit sites" in error
    error = _bad_input(tmp_path, capsys, ["fit", *data, "--guide", "mfvr", "--calibration-data", str(saved["data"])])
    assert "--calibration-data is for --recipe" in error
    error = _bad_input(tmp_path, capsys, ["fit", *data, "--guide", "mfvr", "--scale", "0.5"])
    assert "--scale is for --recipe" in error
    with pytest.raises(SystemExit) as exit_info:  # one starting scale or a grid, refused at parsing
        main(["fit", *data, "--recipe", "mfvr-iwae-layer", "--scale", "0.5", "--scale-grid", "1", "--out", "never"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    text = tmp_path / "documents.txt"
    text.write_text("the sky is blue\nwhat is one and two\n")
    error = _bad_input(
        tmp_path, capsys, ["fit", "--model", str(saved["moe"]), "--text", str(text), "--recipe", "mfvr-iwae-layer"]
    )
    assert "--recipe fits MCQA questions" in error
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--recipe", "mfvr-iwae-layer", "--guide", "mfvr", "--out", str(tmp_path / "never")])
    assert stop.value.code == EXIT_BAD_INPUT
    assert capsys.readouterr().err.endswith("argument --guide: not allowed with argument --recipe\n")


def _wait_for_holder(out: Path, process: subprocess.Popen) -> None:
    """Until ``process`` holds the lock on ``out`` (its PID in the holder file); it must not exit first."""
    holder = out / HOLDER_NAME
    for _ in range(1200):
        if process.poll() is not None:
            pytest.fail(f"the first writer exited with {process.returncode} before taking the lock")
        try:
            if json.loads(holder.read_text())["pid"] == process.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.1)
    pytest.fail("the first writer never took the lock")


def test_a_second_writer_is_refused_naming_the_first_and_a_killed_writers_lock_is_taken_over(saved, tmp_path, capsys):
    out = tmp_path / "fit"
    argv = ["fit", "--model", str(saved["moe"]), "--data", str(saved["data"]), "--batch-size", "8"]
    argv += ["--fit-examples", "8"]
    first = subprocess.Popen(
        [sys.executable, "-m", "pyro_moe", *argv, "--steps", "1000000", "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_holder(out, first)
        assert main([*argv, "--steps", "1", "--out", str(out)]) == EXIT_BAD_INPUT
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith(f"pyro-moe fit: error: --out {out} is in use by PID {first.pid} on ")
        assert f"(pyro-moe fit --model {saved['moe']}" in error and "--steps 1000000" in error
        assert "--steps 1 --out" not in (out / LOG_NAME).read_text()  # the refused writer wrote nothing
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert (out / HOLDER_NAME).exists()  # what the killed writer left; the kernel released its lock
    assert main([*argv, "--steps", "1", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"pyro-moe fit: warning: took over the lock on --out {out} from PID {first.pid} on " in err
    assert "which was killed before it released it" in (out / LOG_NAME).read_text()
    assert not (out / HOLDER_NAME).exists()
    assert FittedPosterior.load(out / "posterior", tiny_model("granitemoe")).engine.step_count == 1


def _resave_manifest(folder: Path) -> None:
    """Recompute the manifest's hashes and sizes with hashlib, as a careful hand-editor would."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_flipped_byte_a_swapped_file_and_another_model_exit_2(saved, saved_posterior, tmp_path, capsys):
    model = ["--model", str(saved["moe"]), "--data", str(saved["data"]), "--examples", "8", "--samples", "2"]
    evaluate = ["evaluate", *model, "--posterior", str(saved_posterior)]
    tensors = saved_posterior / "tensors.safetensors"
    original = tensors.read_bytes()
    flipped = bytearray(original)
    flipped[-4] ^= 0x10
    tensors.write_bytes(bytes(flipped))
    error = _bad_input(tmp_path / "flipped", capsys, evaluate)
    assert f"{tensors} does not match its manifest (SHA-256 differs)" in error

    other_run = ["fit", "--model", str(saved["moe"]), "--data", str(saved["data"]), "--steps", "2", "--seed", "1"]
    assert main([*other_run, "--batch-size", "8", "--fit-examples", "8", "--out", str(tmp_path / "other")]) == 0
    tensors.write_bytes((tmp_path / "other" / "posterior" / "tensors.safetensors").read_bytes())
    error = _bad_input(tmp_path / "swapped", capsys, evaluate)
    assert f"{tensors} does not match its manifest" in error
    tensors.write_bytes(original)
    config = saved_posterior / "config.json"
    config.rename(tmp_path / "config.json")
    error = _bad_input(tmp_path / "missing", capsys, evaluate)
    assert f"{config} is missing (its manifest lists it)" in error
    (tmp_path / "config.json").rename(config)

    other = tmp_path / "other-moe"  # the same architecture and shapes, other weights
    tiny_model("granitemoe", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    diagnose = ["diagnose", "--model", str(other), "--data", str(saved["data"]), "--examples", "8", "--samples", "2"]
    diagnose += ["--posterior", str(saved_posterior)]
    error = _bad_input(tmp_path / "other-model", capsys, diagnose)
    assert f"posterior {saved_posterior} was fitted on another model: weights of model.layers." in error
    assert "--allow-other-model" in error
    assert main([*diagnose, "--allow-other-model", "--out", str(tmp_path / "transferred")]) == 0
    assert "pyro-moe diagnose: warning: loading posterior" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("answer_token_ids", [4, 10_000], r"entry 'answer_token_ids': must be two or more distinct token ids in \[0, "),
        ("step_count", 2.5, r"entry 'step_count': step_count must be a non-negative integer, got 2\.5"),
    ],
)
def test_a_hand_edited_config_is_refused_with_exit_2_naming_the_entry(
    saved, saved_posterior, tmp_path, capsys, key, value, message
):
    config_path = saved_posterior / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, key: value}))
    argv = ["evaluate", "--model", str(saved["moe"]), "--data", str(saved["data"]), "--examples", "8"]
    argv += ["--posterior", str(saved_posterior)]
    error = _bad_input(tmp_path / "edited", capsys, argv)
    assert f"{config_path} does not match its manifest" in error  # the manifest notices the edit first
    _resave_manifest(saved_posterior)
    error = _bad_input(tmp_path / "edited-and-resealed", capsys, argv)
    assert re.search(message, error), error


@pytest.mark.parametrize(("guide", "steps"), [("expert-laplace", []), ("kron-laplace", ["--steps", "0"])])
def test_a_post_hoc_laplace_from_the_laplace_command_is_diagnosed(saved, tmp_path, guide, steps):
    """``pyro-moe laplace`` (no SVI step: the Laplace at the model's weights) then ``pyro-moe diagnose``."""
    model = ["--model", str(saved["moe"]), "--data", str(saved["data"]), "--batch-size", "8"]
    laplace = [*model, "--guide", guide, *steps, "--examples", "8", "--fit-examples", "16"]
    assert main(["laplace", *laplace, "--out", str(tmp_path / "laplace")]) == 0
    posterior = tmp_path / "laplace" / "posterior"
    assert json.loads((posterior / "config.json").read_text())["history"] == []  # no SVI step was taken
    diagnose = [*model, "--posterior", str(posterior), "--examples", "8", "--samples", "4"]
    assert main(["diagnose", *diagnose, "--out", str(tmp_path / "diagnose")]) == 0
    for name in ("posterior.nc", "summary.csv", "collapse.csv"):
        assert (tmp_path / "diagnose" / name).stat().st_size > 0
    idata = az.from_netcdf(tmp_path / "diagnose" / "posterior.nc")
    variable = "down_proj" if guide == "expert-laplace" else "weight"
    assert idata.posterior[variable].dims[-1] == ("intermediate" if guide == "expert-laplace" else "hidden")
    assert (tmp_path / "diagnose" / "collapse.csv").read_text().startswith("chain,site")


def test_per_question_draws_are_refused_for_text_before_any_work(tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    argv = ["evaluate", "--text", str(text), "--posterior", str(tmp_path), "--draws", "per-question"]
    error = _bad_input(tmp_path, capsys, argv)
    assert error.endswith("--draws per-question is for MCQA questions; evaluate --text draws per batch.")
