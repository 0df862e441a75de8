"""Checkpoint folders: atomic under SIGKILL at every phase of a save, verified against their manifest
(a flipped byte, a file from another run, a missing or an extra file), 0644, never replacing a folder
that holds anything else, and readable when a save was killed between its two renames."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyro_moe.atomic_files import aside_folder
from pyro_moe.inference import checkpoint
from pyro_moe.inference.checkpoint import (
    CONFIG,
    MANIFEST,
    TENSORS,
    CheckpointError,
    load_checkpoint,
    read_checkpoint_folder,
    save_checkpoint,
)

OLD = {"loc": torch.arange(4096, dtype=torch.float32), "scale": torch.ones(3, 5)}
NEW = {"loc": -torch.arange(4096, dtype=torch.float32), "scale": torch.full((3, 5), 2.0)}

CHILD = textwrap.dedent(
    """
    import os, pathlib, shutil, sys, time

    import torch

    from pyro_moe.inference import checkpoint

    folder, pause_at = sys.argv[1], int(sys.argv[2])
    calls = []

    def pausing(name, function):
        def wrapper(*args, **kwargs):
            if len(calls) == pause_at:
                print("paused", " ".join([*calls, name]), flush=True)
                time.sleep(600)
            calls.append(name)
            return function(*args, **kwargs)
        return wrapper

    new = {"loc": -torch.arange(4096, dtype=torch.float32), "scale": torch.full((3, 5), 2.0)}
    os.fsync = pausing("fsync", os.fsync)
    os.rename = pausing("rename", os.rename)
    os.replace = pausing("replace", os.replace)
    shutil.rmtree = pausing("rmtree", shutil.rmtree)
    pathlib.Path.write_text = pausing("write_text", pathlib.Path.write_text)
    checkpoint.save_file = pausing("save_file", checkpoint.save_file)
    checkpoint.save_checkpoint(folder, new, {"run": "new"}, model={"weights": {"block": "new"}})
    print("done", " ".join(calls), flush=True)
    """
)


def _same(tensors: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return tensors.keys() == reference.keys() and all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_sigkill_at_every_phase_of_a_save_leaves_the_old_or_the_new_checkpoint(tmp_path):
    """A child process saves over an old checkpoint and pauses before its k-th write, flush, rename or
    removal; the parent SIGKILLs it there. Loading then gives the old checkpoint (before the second
    rename) or the new one (after it), complete and consistent, and the next save cleans up."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    outcomes = []
    for pause_at in range(40):
        folder = tmp_path / f"kill{pause_at}" / "posterior"
        save_checkpoint(folder, OLD, {"run": "old"}, model={"weights": {"block": "old"}})
        child = subprocess.Popen(
            [sys.executable, str(script), str(folder), str(pause_at)], stdout=subprocess.PIPE, text=True
        )
        line = child.stdout.readline().split()
        if line[0] == "paused":
            os.kill(child.pid, signal.SIGKILL)
        assert child.wait() in (0, -signal.SIGKILL)
        child.stdout.close()
        assert line[0] in ("paused", "done"), line
        phases = line[1:]
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            saved = read_checkpoint_folder(folder)
        renamed_in = phases[:-1].count("rename") >= 2 if line[0] == "paused" else True
        expected, run = (NEW, "new") if renamed_in else (OLD, "old")
        assert _same(saved.tensors, expected), (pause_at, phases)
        assert saved.config == {"run": run} and saved.model == {"weights": {"block": run}}
        outcomes.append((line[0], run, phases[-1]))
        save_checkpoint(folder, OLD, {"run": "again"})  # the next save clears what the kill left behind
        assert [path.name for path in folder.parent.iterdir()] == ["posterior"]
        if line[0] == "done":
            break
    assert outcomes[-1][0] == "done", "the save never finished within the phases tried"
    kinds = {phase for _, _, phase in outcomes}
    assert {"save_file", "write_text", "fsync", "rename", "rmtree"} <= kinds
    assert {run for _, run, _ in outcomes} == {"old", "new"}


def _resave_manifest(folder: Path) -> None:
    """Recompute the manifest's hashes with hashlib, as a careful hand-editor would."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in manifest["files"]:
        data = (folder / name).read_bytes()
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def test_a_flipped_byte_a_swapped_missing_or_extra_file_is_refused_naming_it(tmp_path):
    first = save_checkpoint(tmp_path / "first", OLD, {"run": "first"})
    second = save_checkpoint(tmp_path / "second", NEW, {"run": "second"})
    assert _same(load_checkpoint(first)[0], OLD)

    tensors = first / TENSORS
    original = tensors.read_bytes()
    flipped = bytearray(original)
    flipped[-100] ^= 0x01  # inside the data: safetensors alone reads it without complaint
    tensors.write_bytes(bytes(flipped))
    assert not torch.equal(load_file(tensors)["loc"], OLD["loc"])
    with pytest.raises(CheckpointError, match=r"first/tensors\.safetensors does not match its manifest \(SHA-256"):
        load_checkpoint(first)
    tensors.write_bytes(original)

    (first / TENSORS).write_bytes((second / TENSORS).read_bytes())  # same size, another run's values
    with pytest.raises(CheckpointError, match=r"first/tensors\.safetensors does not match its manifest"):
        load_checkpoint(first)
    tensors.write_bytes(original)
    (first / CONFIG).write_bytes((second / CONFIG).read_bytes())
    with pytest.raises(CheckpointError, match=r"first/config\.json does not match its manifest"):
        load_checkpoint(first)
    (first / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=r"first/config\.json is missing \(its manifest lists it\)"):
        load_checkpoint(first)

    save_checkpoint(first, OLD, {"run": "first"})
    (first / "tensors-from-elsewhere.safetensors").write_bytes(original)
    with pytest.raises(CheckpointError, match=r"holds tensors-from-elsewhere\.safetensors, which its manifest"):
        load_checkpoint(first)


def test_files_are_0644_and_a_folder_with_other_files_is_never_replaced(tmp_path):
    folder = save_checkpoint(tmp_path / "fit", OLD, {"run": "old"})
    assert sorted(path.name for path in folder.iterdir()) == [CONFIG, MANIFEST, TENSORS]
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o644}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.md").write_text("mine")
    with pytest.raises(CheckpointError, match=r"holds notes\.md, which a checkpoint does not"):
        save_checkpoint(tmp_path / "results", OLD, {"run": "old"})
    assert [path.name for path in (tmp_path / "results").iterdir()] == ["notes.md"]
    with pytest.raises(TypeError):
        save_checkpoint(folder, NEW, {"run": object()})
    assert _same(load_checkpoint(folder)[0], OLD)  # a refused save leaves the old checkpoint
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_a_save_killed_between_its_renames_reads_the_aside_copy(tmp_path):
    folder = save_checkpoint(tmp_path / "fit", OLD, {"run": "old"})
    folder.rename(aside_folder(folder))  # the state a kill between "old aside" and "new in" leaves
    with pytest.warns(UserWarning, match=r"a save was killed between its two renames"):
        tensors, config = load_checkpoint(folder)
    assert _same(tensors, OLD) and config == {"run": "old"}
    save_checkpoint(folder, NEW, {"run": "new"})
    assert _same(load_checkpoint(folder)[0], NEW)
    assert not aside_folder(folder).exists()
    with pytest.raises(CheckpointError, match=r"checkpoint folder .*missing-run does not exist"):
        load_checkpoint(tmp_path / "missing-run")


def test_a_folder_without_a_manifest_loads_with_a_warning_and_a_bad_manifest_is_refused(tmp_path):
    folder = save_checkpoint(tmp_path / "fit", OLD, {"run": "old"})
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["model"] is None
    assert manifest["files"][TENSORS]["sha256"] == hashlib.sha256((folder / TENSORS).read_bytes()).hexdigest()

    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(CheckpointError, match=r"format_version 99; this pyro-moe reads 1 to 1"):
        load_checkpoint(folder)
    (folder / MANIFEST).write_text(json.dumps({**manifest, "files": {TENSORS: manifest["files"][TENSORS]}}))
    with pytest.raises(CheckpointError, match=r"manifest\.json is not a pyro-moe manifest"):
        load_checkpoint(folder)
    (folder / MANIFEST).unlink()
    with pytest.warns(UserWarning, match=r"has no manifest\.json .* not checked; load it and save it again"):
        saved = read_checkpoint_folder(folder)
    assert not saved.verified and _same(saved.tensors, OLD)

    save_checkpoint(folder, OLD, {"run": "edited"})
    config = json.loads((folder / CONFIG).read_text())
    (folder / CONFIG).write_text(json.dumps({**config, "run": "hand-edited"}))
    with pytest.raises(CheckpointError, match=r"config\.json does not match its manifest"):
        load_checkpoint(folder)
    _resave_manifest(folder)
    assert load_checkpoint(folder)[1] == {"run": "hand-edited"}


@pytest.mark.parametrize("hook", ["load_file", "_file_digest"])
def test_a_save_landing_while_a_checkpoint_is_read_gives_the_new_whole_checkpoint(tmp_path, monkeypatch, hook):
    """A save that swaps the folder while it is read (between hashing and parsing, or between the
    manifest and a file's hash) makes the read start again on the new folder: never a mix, never a
    valid checkpoint refused as damaged."""
    folder = save_checkpoint(tmp_path / "fit", OLD, {"run": "old"})
    real = getattr(checkpoint, hook)

    def after_a_save(path):
        monkeypatch.setattr(checkpoint, hook, real)
        save_checkpoint(folder, NEW, {"run": "new"})  # lands in the middle of the read
        return real(path)

    monkeypatch.setattr(checkpoint, hook, after_a_save)
    saved = read_checkpoint_folder(folder)
    assert _same(saved.tensors, NEW) and saved.config == {"run": "new"}


def test_a_checkpoint_replaced_at_every_read_is_refused_after_three_attempts(tmp_path, monkeypatch):
    folder = save_checkpoint(tmp_path / "fit", OLD, {"run": "old"})
    real = checkpoint.load_file

    def always_after_a_save(path):
        save_checkpoint(folder, NEW, {"run": "new"})
        return real(path)

    monkeypatch.setattr(checkpoint, "load_file", always_after_a_save)
    with pytest.raises(CheckpointError, match="was replaced by another save three times while it was read"):
        read_checkpoint_folder(folder)


def test_stray_dot_files_do_not_make_a_checkpoint_unreadable(tmp_path):
    folder = save_checkpoint(tmp_path / "fit", OLD, {"run": "old"})
    (folder / ".DS_Store").write_bytes(b"\0")
    assert read_checkpoint_folder(folder).config == {"run": "old"}
