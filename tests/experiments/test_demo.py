"""The demo runs end to end and its checks hold."""

from __future__ import annotations

from pyro_moe.experiments import demo


def test_demo_runs_and_reports_exactness(capsys):
    demo.main(["--samples", "4"])
    out = capsys.readouterr().out
    difference = float(out.split("logit difference: ")[1].split()[0])
    assert difference <= 1e-5
    assert "bitwise the HF model's: True" in out
    assert out.count("model.layers.") >= 4
