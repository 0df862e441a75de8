"""Crash-safe ``pyro-moe fit`` runs, end to end in subprocesses with real signals: SIGINT at a random step
writes a checkpoint and exits 130 with the resume command, which finishes bitwise equal to the
uninterrupted fit; resumes with other options are refused naming them. Bounded inputs: a 100,000-character
question is refused (or truncated) in under 1 GB (the child's peak RSS), prompts longer than the model's
positions, too few rows, repeated layers and unavailable devices are refused with exit code 2."""

from __future__ import annotations

import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyro_moe import cli
from pyro_moe.cli import CHECKPOINT_NAME, EXIT_BAD_INPUT, EXIT_INTERRUPTED, main
from pyro_moe.inference import resume
from tests.experiments.tiny_evaluation import tiny_splits
from tests.tiny_models import tiny_model, tiny_tokenizer

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
STEPS = 20
SLOW_STEPS = """
import sys, time
from pyro_moe.inference import svi
step = svi.SVIEngine.step
def slow(self, batch):  # room to send the signal at a chosen step; sleeping changes no number
    time.sleep(0.1)
    return step(self, batch)
svi.SVIEngine.step = slow
from pyro_moe.cli import main
sys.exit(main(sys.argv[1:]))
"""
PEAK_RSS = """
import resource, subprocess, sys
run = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(run.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.stderr.write(run.stderr)
"""


def _rows(examples) -> list[dict]:
    return [{"question": e.question, "choices": list(e.choices), "answer": e.answer} for e in examples]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny Granite-MoE (64 positions) and the tiny tokenizer saved with save_pretrained, and a JSONL file."""
    root = tmp_path_factory.mktemp("runs")
    tiny_model("granitemoe").save_pretrained(root / "moe")
    tiny_tokenizer().save_pretrained(root / "moe")
    splits = tiny_splits()
    return {"moe": root / "moe", "data": _write(root / "train.jsonl", _rows(splits["train"] + splits["test"]))}


def _fit_argv(saved, out: Path, *extra: str) -> list[str]:
    data = ["--model", str(saved["moe"]), "--data", str(saved["data"]), "--batch-size", "4", "--fit-examples", "16"]
    return ["fit", *data, "--guide", "mfvr", "--sites", "logits", "--steps", str(STEPS), *extra, "--out", str(out)]


def _interrupt_at(argv: list[str], step: int) -> tuple[int, str]:
    """Run ``pyro-moe argv`` (each step slowed down) and send it SIGINT once its progress bar shows ``step``
    steps done; returns the exit code and stderr."""
    child = subprocess.Popen(  # SIGINT as a terminal gives it, even when the tests run with it ignored (nohup)
        [sys.executable, "-c", SLOW_STEPS, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: child.stderr.read1(4096), b"")))
    reader.start()
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        done = [
            int(n) for n in re.findall(rf"fit [^\r\n]*?(\d+)/{STEPS} \[", b"".join(chunks).decode(errors="replace"))
        ]
        if done and max(done) >= step:
            child.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    child.wait(timeout=300)
    reader.join()
    child.stdout.close()
    return child.returncode, b"".join(chunks).decode(errors="replace")


def _posterior(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(folder / "tensors.safetensors"), json.loads((folder / "config.json").read_text())


def test_sigint_at_a_random_step_then_resume_equals_the_uninterrupted_fit_bitwise(saved, tmp_path, capsys):
    target = random.Random(os.urandom(8)).randint(3, 12)
    argv = _fit_argv(saved, tmp_path / "run", "--checkpoint-every", "5")
    code, err = _interrupt_at(argv, target)
    assert code == EXIT_INTERRUPTED, (target, err[-2000:])
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    stopped = re.fullmatch(
        rf"pyro-moe fit: interrupted after step (\d+) of {STEPS}; checkpoint: (.+); resume with: (.+)", line
    )
    assert stopped is not None, line
    step, folder, command = int(stopped[1]), Path(stopped[2]), shlex.split(stopped[3])
    assert target <= step < STEPS and folder == tmp_path / "run" / CHECKPOINT_NAME
    assert command == ["pyro-moe", *argv, "--resume"]
    assert _posterior(folder)[1]["step_count"] == step and not (tmp_path / "run" / "posterior").exists()

    checkpoint = (folder / "config.json").read_text()
    assert main([*command[1:], "--seed", "1"]) == EXIT_BAD_INPUT  # another option: refused, naming it
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was written with --seed 0, this run has --seed 1" in error
    assert main(argv) == EXIT_BAD_INPUT  # without --resume the unfinished fit is not overwritten
    assert "holds the checkpoint of an unfinished fit" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == checkpoint

    resumed = subprocess.run([sys.executable, "-m", "pyro_moe", *command[1:]], capture_output=True, text=True, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not folder.exists()  # the finished fit's posterior holds the same state: the checkpoint is removed
    reference = _fit_argv(saved, tmp_path / "straight", "--checkpoint-every", "5")
    straight = subprocess.run([sys.executable, "-m", "pyro_moe", *reference], capture_output=True, text=True, env=ENV)
    assert straight.returncode == 0, straight.stderr[-2000:]
    (tensors, config), (expected, expected_config) = (
        _posterior(tmp_path / name / "posterior") for name in ("run", "straight")
    )
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name
    assert json.dumps(config["history"]) == json.dumps(expected_config["history"]) and len(config["history"]) == STEPS
    assert config == json.loads(json.dumps(expected_config))
    assert (tmp_path / "run" / "fit.json").read_text() == (tmp_path / "straight" / "fit.json").read_text()

    assert main([*command[1:]]) == EXIT_BAD_INPUT  # nothing left to resume
    assert "no checkpoint" in capsys.readouterr().err


def test_the_command_lines_checkpoint_cadence_is_the_librarys():
    assert cli.CHECKPOINT_STEPS == resume.CHECKPOINT_STEPS
    assert cli.CHECKPOINT_MINUTES * 60 == resume.CHECKPOINT_SECONDS


@pytest.mark.parametrize("truncate", [False, True])
def test_a_100k_character_question_is_refused_or_truncated_in_under_1_gb(saved, tmp_path, truncate):
    rows = _rows(tiny_splits()["train"])
    rows[2]["question"] = ("what is the colour of the sky " * 3400)[:100_000]  # about 23,000 tokens
    data = _write(tmp_path / "long.jsonl", rows)
    argv = ["-m", "pyro_moe", "fit", "--model", str(saved["moe"]), "--data", str(data), "--steps", "1"]
    argv += ["--batch-size", "8", "--fit-examples", "16", "--out", str(tmp_path / "out")]
    argv += ["--truncate-prompts"] if truncate else []
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, *argv], capture_output=True, text=True, env=ENV
    )
    code, peak_kib = map(int, run.stdout.split())
    assert peak_kib < 1024 * 1024, f"peak RSS {peak_kib / 1024:.0f} MiB"
    if truncate:
        assert code == 0, run.stderr[-2000:]
        assert "truncated 1 of 16 prompts longer than the model's 64 positions" in run.stderr
    else:
        assert code == EXIT_BAD_INPUT
        error = run.stderr.strip().splitlines()[-1]
        assert re.search(r"long\.jsonl: question 3 of 16: its prompt has (more than )?\d+ tokens", error), error
        assert "more than the model's 64 positions" in error and "--truncate-prompts" in error


def _bad(argv: list[str], capsys) -> str:
    assert main(argv) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_prompts_longer_than_the_positions_are_refused_or_truncated_with_a_count(saved, tmp_path, capsys):
    rows = _rows(tiny_splits()["train"])
    rows[4]["question"] = " ".join(["sky"] * 300)  # 300 tokens and more, on a model with 64 positions
    data = _write(tmp_path / "long.jsonl", rows)
    common = ["--model", str(saved["moe"]), "--data", str(data), "--batch-size", "4", "--examples", "8"]
    for command in (["fit", "--steps", "1"], ["stability"]):
        error = _bad([*command, *common, "--out", str(tmp_path / command[0])], capsys)
        assert re.search(r"question 5 of 16: its prompt has 3\d\d tokens, more than the model's 64 positions", error)
    assert main(["fit", "--steps", "1", *common, "--truncate-prompts", "--out", str(tmp_path / "cut")]) == 0
    assert "warning: " in (err := capsys.readouterr().err) and "truncated 1 of 16 prompts" in err


def test_too_few_rows_repeated_layers_and_unavailable_devices_are_refused(saved, tmp_path, capsys):
    few = _write(tmp_path / "few.jsonl", _rows(tiny_splits()["train"][:3]))
    fit = ["fit", "--model", str(saved["moe"]), "--steps", "1", "--batch-size", "2"]
    error = _bad([*fit, "--data", str(few), "--out", str(tmp_path / "few")], capsys)
    assert error.endswith(
        "few.jsonl: 3 usable questions, fewer than --min-rows 4; give more data, or lower --min-rows to fit on "
        "these anyway."
    )
    assert main([*fit, "--data", str(few), "--min-rows", "3", "--out", str(tmp_path / "three")]) == 0
    capsys.readouterr()

    error = _bad([*fit, "--data", str(saved["data"]), "--layers", "0", "0", "--out", str(tmp_path / "dup")], capsys)
    assert "--layers 0 0 names layer(s) [0] more than once" in error

    devices = ", ".join(cli.available_devices())
    missing = ["tpu", "cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in missing:
        error = _bad(
            [*fit, "--data", str(saved["data"]), "--device", device, "--out", str(tmp_path / "device")], capsys
        )
        assert error.startswith(f"pyro-moe fit: error: --device {device} ") and error.endswith(
            f"the devices here: {devices}."
        )
        assert not (tmp_path / "device").exists()  # refused before any work
    assert "cpu" in devices.split(", ")


def test_ctrl_c_before_the_steps_exits_130_with_one_line_and_no_traceback(saved, tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.inputs, "load_model", interrupted)
    assert main(_fit_argv(saved, tmp_path / "run")) == EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "pyro-moe fit: interrupted before the first checkpoint; nothing to resume (run the command again)."
    )
    assert "interrupted before the first checkpoint" in (tmp_path / "run" / cli.LOG_NAME).read_text()
    assert (
        main(["stability", "--model", str(saved["moe"]), "--data", str(saved["data"]), "--out", str(tmp_path / "s")])
        == EXIT_INTERRUPTED
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pyro-moe stability: interrupted."


def test_a_checkpoint_set_aside_by_a_killed_save_is_not_overwritten_without_resume(saved, tmp_path, capsys):
    """A save killed between its two renames leaves only ``.checkpoint.previous``: still an unfinished fit."""
    from pyro_moe import fit, patch_routers
    from tests.helpers import ANSWERS, mcqa_batches

    out = tmp_path / "run"
    patch = patch_routers(tiny_model("granitemoe"), {"logits": 1.0}, layers=[1])
    options = resume.CheckpointOptions(out / CHECKPOINT_NAME, every=1)
    fit(patch, mcqa_batches(2, 4), "mfvr", answer_token_ids=ANSWERS, steps=2, progress=False, checkpoint=options)
    aside = out / f".{CHECKPOINT_NAME}.previous"
    (out / CHECKPOINT_NAME).rename(aside)
    error = _bad(_fit_argv(saved, out), capsys)
    assert f"{out / CHECKPOINT_NAME} holds the checkpoint of an unfinished fit (step 2 of 2)" in error
    assert (aside / "manifest.json").exists()  # the refused run removed nothing
