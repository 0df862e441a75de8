"""Every entry of a loaded ``config.json`` is checked like an option: a hand-edited value is refused
naming the entry (after the manifest is recomputed to match, so that the check itself is exercised;
without that, the manifest refuses the edited file first)."""

from __future__ import annotations

import hashlib
import json
import math

import pyro
import pytest

from pyro_moe import patch_routers
from pyro_moe.inference.checkpoint import CONFIG, MANIFEST, CheckpointError
from pyro_moe.inference.fitting import FittedPosterior, fit
from pyro_moe.inference.saved_config import vocabulary_size
from tests.helpers import ANSWERS, mcqa_batches
from tests.tiny_models import TINY_VOCAB_SIZE, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    pyro.clear_param_store()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(handle, mcqa_batches(count=2), "mean-field", answer_token_ids=ANSWERS, steps=2, progress=False)
    folder = posterior.save(tmp_path_factory.mktemp("saved") / "fit")
    return folder, json.loads((folder / CONFIG).read_text()), (folder / MANIFEST).read_text()


def _edit(folder, config, manifest_text, key, value, resave_manifest=True):
    """Write ``config`` with ``key`` set to ``value`` (or removed for ``...``) and, like a careful editor,
    the manifest's hash and size of it recomputed with hashlib."""
    edited = {k: v for k, v in config.items() if k != key} if value is ... else {**config, key: value}
    data = json.dumps(edited).encode()
    (folder / CONFIG).write_bytes(data)
    manifest = json.loads(manifest_text)
    if resave_manifest:
        manifest["files"][CONFIG] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (folder / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("answer_token_ids", [4, TINY_VOCAB_SIZE + 3], r"two or more distinct token ids in \[0, \d+\)"),
        ("answer_token_ids", [4, 4.5], r"distinct token ids"),
        ("answer_token_ids", [4, 4], r"distinct token ids"),
        ("step_count", 2.5, r"step_count must be a non-negative integer, got 2\.5"),
        ("step_count", "2", r"step_count must be a non-negative integer, got '2'"),
        ("guide", "mean-feld", r"unknown guide"),
        ("selection", "random", r"must be one of top-k, sample-k"),
        ("layers", [5], r"distinct MoE layer indices of this model \(\[0, 1\]\)"),
        ("layers", [1, 1], r"distinct MoE layer indices"),
        ("likelihood", "regression", r"must be one of mcqa, next-token"),
        ("lr", -1.0, r"lr must be a positive number"),
        ("num_particles", True, r"num_particles must be a positive integer"),
        ("optimizer", "adamw", r"unknown optimizer 'adamw'"),
        ("history", [{"loss": "low"}], r"a list of records of numbers"),
        ("calibration", {"model-average": {"temperature": 0}}, r"temperature must be a positive number or Infinity"),
        ("calibration", {"model-average": {"temperature": "1"}}, r"temperature must be a positive number or Infinity"),
        ("sites", {"weights": 0.2}, r"'sites'"),
        ("guide", ..., r"lacks the entry 'guide'"),
        ("answer_token_ids", ..., r"lacks the entry 'answer_token_ids'"),
    ],
)
def test_a_hand_edited_entry_is_refused_naming_it(saved, key, value, message):
    folder, config, manifest = saved
    _edit(folder, config, manifest, key, value)
    model = tiny_model("granitemoe")
    with pytest.raises(CheckpointError, match=rf"config\.json.*'{key}'.*{message}|config\.json.*{message}") as refused:
        FittedPosterior.load(folder, model)
    assert f"'{key}'" in str(refused.value)
    assert not any("Bayesian" in type(module).__name__ for module in model.modules())  # refused before patching


def test_an_edit_without_the_manifest_is_refused_by_the_manifest_and_the_saved_config_loads(saved):
    folder, config, manifest = saved
    _edit(folder, config, manifest, "step_count", 2.5, resave_manifest=False)
    with pytest.raises(CheckpointError, match=r"config\.json does not match its manifest"):
        FittedPosterior.load(folder, tiny_model("granitemoe"))
    _edit(folder, config, manifest, "step_count", config["step_count"])  # the saved values, re-serialised
    pyro.clear_param_store()
    assert FittedPosterior.load(folder, tiny_model("granitemoe")).engine.step_count == 2
    uniform = {"model-average": {"temperature": math.inf, "calibration_nll": 1.39, "unscaled_nll": 1.5}}
    _edit(folder, config, manifest, "calibration", uniform)  # what a calibration without signal saves
    pyro.clear_param_store()
    assert FittedPosterior.load(folder, tiny_model("granitemoe")).calibration["model-average"].temperature == math.inf
    assert vocabulary_size(tiny_model("granitemoe")) == tiny_model("granitemoe").lm_head.out_features


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"low-rank": {"rank": "x"}}, r"entry 'guide_options': the guide 'low-rank' refuses .*rank"),
        ({"low-rank": {"foo": 1}}, r"entry 'guide_options': the guide 'low-rank' refuses .*foo"),
        ({"mfvr": {}}, r"options given for \['mfvr'\], which the guide 'low-rank' does not use"),
        ({"low-rank": {"rank": 3}}, r"has shape \(\d+, 2\), the guide its configuration describes \(\d+, 3\)"),
    ],
)
def test_hand_edited_guide_options_are_refused_naming_them(tmp_path, options, message):
    pyro.clear_param_store()
    handle = patch_routers(tiny_model("granitemoe"), {"weight": 0.2}, layers=[1])
    posterior = fit(
        handle,
        mcqa_batches(count=2),
        "low-rank",
        answer_token_ids=ANSWERS,
        steps=2,
        progress=False,
        guide_options={"low-rank": {"rank": 2}},
    )
    folder = posterior.save(tmp_path / "fit")
    _edit(folder, json.loads((folder / CONFIG).read_text()), (folder / MANIFEST).read_text(), "guide_options", options)
    model = tiny_model("granitemoe")
    with pytest.raises(CheckpointError, match=rf"config\.json.*{message}|{message}"):
        FittedPosterior.load(folder, model)
    assert not any("Bayesian" in type(module).__name__ for module in model.modules())
