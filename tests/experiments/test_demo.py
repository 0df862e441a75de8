"""``pyro-moe demo --quick``: the demo's code path on the embedded benchmark with few steps and questions."""

from __future__ import annotations

import json
import re

import arviz as az
import pytest
import torch

from pyro_moe.cli import main
from pyro_moe.experiments.benchmark_model import load_benchmark
from pyro_moe.experiments.demo import DEMO_FAMILIES, QUICK
from tests.experiments.tiny_evaluation import direct_answer_probs


def test_quick_demo_writes_the_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    headline = json.loads((out / "headline.json").read_text())
    rows = {row["method"]: row for row in headline["rows"]}
    assert list(rows) == ["deterministic", "temperature scaling", *DEMO_FAMILIES]
    for method in rows:
        assert f"| {method} |" in printed

    # the deterministic row against the HF model's own forward on the same test questions
    loaded = load_benchmark()
    test = loaded.benchmark.splits["test"][: QUICK.examples]
    probs = direct_answer_probs(loaded.model, loaded.tokenizer, test, loaded.answer_token_ids)
    labels = torch.tensor([example.answer for example in test])
    accuracy = (probs.argmax(-1) == labels).float().mean().item()
    nll = -probs[torch.arange(len(test)), labels].log().mean().item()
    assert rows["deterministic"]["accuracy"] == pytest.approx(accuracy)
    assert rows["deterministic"]["nll"] == pytest.approx(nll, rel=1e-4)

    # every headline figure but temperature scaling's carries its interval against temperature scaling,
    # the calibration experiment's own on the same questions
    intervals = {(c["method"], c["column"]): c for c in headline["comparisons"]}
    assert {method for method, _ in intervals} == set(rows) - {"temperature scaling"}
    calibration = json.loads((out / "calibration" / "metrics.json").read_text())
    own = {(c["method"], c["metric"]): c for c in calibration["comparisons"] if c["mode"] in ("any", "model-average")}
    for (method, column), interval in intervals.items():
        assert interval["baseline"].startswith("temperature scaling")
        assert interval["verdict"] in ("beats", "ties", "loses") and interval["low"] <= interval["high"]
        if column in ("accuracy", "nll", "ece"):
            expected = {k: v for k, v in own[method, column].items() if k not in ("method", "mode")}
            assert {k: v for k, v in interval.items() if k not in ("method", "column")} == expected
            assert interval["estimate"] == pytest.approx(rows[method][column])
            assert interval["baseline_estimate"] == pytest.approx(rows["temperature scaling"][column])
    nll_interval = intervals["deterministic", "nll"]
    shown = f"{nll:.3f} ({nll_interval['difference']:+.3f} [{nll_interval['low']:+.3f}, {nll_interval['high']:+.3f}])"

    stability = json.loads((out / "stability" / "metrics.json").read_text())
    assert len(stability["susceptible_layers"]) == QUICK.susceptible
    idata = az.from_netcdf(out / "posterior_mean-field.nc")
    assert list(idata.posterior["layer"].values) == stability["susceptible_layers"]
    assert "expert-laplace" in json.loads((out / "calibration" / "metrics.json").read_text())["rows"][-1]["method"]

    report = (out / "report.md").read_text()
    assert shown in report.split("## Headline")[1].split("## ")[0] and "the intervals are wide" in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(images) >= 4 and all((out / image).is_file() for image in images)
    assert "collapse_mfvr-iwae-layer.png" in images and "recipe_mfvr-iwae-layer_scales.png" in images

    # the logit guide is the recipe's: started at the selected scale, calibrated in both modes
    recipe = json.loads((out / "recipe_mfvr-iwae-layer.json").read_text())
    assert set(recipe["temperatures"]) == {"model-average", "routing-average"}
    assert recipe["selection"]["examples"] == QUICK.examples  # the calibration split's first questions
    assert recipe["selection"]["chosen"]["layers"] == stability["susceptible_layers"]
    assert max(int(step) for step in recipe["scale_trajectory"]) == QUICK.recipe_steps
    collapse = (out / "collapse_mfvr-iwae-layer.csv").read_text().splitlines()
    assert len(collapse) == 1 + QUICK.susceptible and all(".logits," in line for line in collapse[1:])
