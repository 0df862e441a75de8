"""The token reports: marks, escaping (read back with the standard library's HTML parser), JSONL and PNG."""

from __future__ import annotations

import json
import math
from html.parser import HTMLParser

import pytest

from pyro_moe import ConfigurationError
from pyro_moe.evaluation.token_report import (
    GeneratedText,
    plot_token_uncertainty,
    terminal_text,
    uncertainty_threshold,
    write_html,
    write_jsonl,
)
from tests.plot_checks import capture_figures, clipped_texts, legends_over_axes


def example(prompt: str = "Say <b> & 'x':") -> GeneratedText:
    return GeneratedText(
        prompt=prompt,
        pieces=[" <script>", "alert(1)", '"', "</script>\n"],
        token_ids=[5, 6, 7, 3],
        probs=[0.5, 0.25, 0.125, 0.9],
        predictive_entropy=[1.0, 2.0, 1.5, 0.2],
        expected_entropy=[0.9, 1.0, 1.5, 0.1],
        mutual_information=[0.1, 1.0, 0.0, 0.1],
        stopped=True,
    )


class Spans(HTMLParser):
    """The text and title of every span of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.spans, self.open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            self.open = {"attrs": dict(attrs), "text": ""}
            self.spans.append(self.open)

    def handle_endtag(self, tag):
        if tag == "span":
            self.open = None

    def handle_data(self, data):
        if self.open is not None:
            self.open["text"] += data


def test_summary_and_threshold():
    text = example()
    summary = text.summary()
    assert summary["log_prob_sum"] == pytest.approx(math.log(0.5 * 0.25 * 0.125 * 0.9))
    assert summary["mean_mutual_information"] == pytest.approx(1.2 / 4)
    assert summary["max_mutual_information"] == 1.0
    assert uncertainty_threshold([text], 0.5) == pytest.approx(0.1)  # the median of 0, 0.1, 0.1, 1
    assert uncertainty_threshold([], 0.9) == 0.0
    with pytest.raises(ConfigurationError):
        uncertainty_threshold([text], 1.5)
    with pytest.raises(ConfigurationError, match="one entry per token"):
        GeneratedText("p", ["a"], [1, 2], [0.5], [1.0], [1.0], [0.0], stopped=False)


def test_terminal_marks_the_uncertain_tokens_only():
    text = example()
    assert terminal_text(text, 0.5, colour=False) == ' <script>[[alert(1)]]"</script>\n'
    coloured = terminal_text(text, 0.1, colour=True)
    assert coloured.count("\033[1;31m") == 3 and coloured.count("\033[0m") == 3  # MI 0 is never marked
    assert "[[" not in coloured


def test_html_escapes_the_text_and_carries_the_figures(tmp_path):
    text = example()
    path = write_html([text, example("second")], tmp_path / "generations.html", threshold=0.5)
    page = path.read_text()
    assert "<script>" not in page and "<b>" not in page
    parser = Spans()
    parser.feed(page)
    prompts = [span for span in parser.spans if span["attrs"].get("class") == "prompt"]
    tokens = [span for span in parser.spans if "title" in span["attrs"]]
    assert [span["text"] for span in prompts] == [text.prompt, "second"]
    assert [span["text"] for span in tokens[:4]] == text.pieces
    assert "mutual information 1 nats" in tokens[1]["attrs"]["title"]
    assert "underline" in tokens[1]["attrs"]["style"] and "underline" not in tokens[0]["attrs"]["style"]
    assert "rgba(220,50,47,1.000)" in tokens[1]["attrs"]["style"]  # the run's largest MI: full shade


def test_jsonl_and_png(tmp_path):
    texts = [example(), example("other")]
    lines = write_jsonl(texts, tmp_path / "generations.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [record["prompt"] for record in records] == ["Say <b> & 'x':", "other"]
    assert records[0]["text"] == texts[0].text
    assert [token["mutual_information"] for token in records[0]["tokens"]] == texts[0].mutual_information
    png = plot_token_uncertainty(texts, tmp_path / "plots" / "generations.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigurationError, match=r"\.png"):
        plot_token_uncertainty(texts, tmp_path / "generations.svg")


def test_the_plot_gives_mutual_information_its_own_panel_and_a_legend_off_the_data(tmp_path, monkeypatch):
    figures = capture_figures(monkeypatch)
    texts = [example(), example("a prompt much longer than sixty characters, which the title shortens with dots")]
    plot_token_uncertainty(texts, tmp_path / "generations.png")
    (figure,) = figures
    panels = [axis for axis in figure.axes if axis.lines]
    assert len(panels) == 2 * len(texts)  # entropies and, under them, the mutual information
    for number, text in enumerate(texts):
        entropies, information = panels[2 * number], panels[2 * number + 1]
        assert [line.get_label() for line in entropies.lines] == ["predictive entropy", "expected entropy"]
        (line,) = information.lines
        assert list(line.get_ydata()) == text.mutual_information
        assert information.get_shared_x_axes().joined(entropies, information)
    assert not legends_over_axes(figure) and not clipped_texts(figure)
