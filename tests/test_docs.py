"""The README and the docs quote figures that cannot go stale: every marked table equals what benchmarks/render.py
renders from its results file, every results file says how, when and where it was measured, and the README stays
short."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import render  # noqa: E402
from results import RESULTS  # noqa: E402


@pytest.mark.parametrize("path", render.documents(), ids=lambda p: p.name)
def test_every_table_in_the_docs_is_what_its_results_file_renders(path):
    text = path.read_text()
    assert render.render_text(text, {}) == text, f"{path.name}: run python benchmarks/render.py"


def test_every_results_file_says_how_when_and_where_it_was_measured():
    files = sorted(RESULTS.glob("*.json"))
    assert files
    for file in files:
        record = json.loads(file.read_text())
        for key in ("benchmark", "command", "date", "versions", "machine", "seeds", "tables"):
            assert key in record, (file.name, key)
        assert record["benchmark"] == file.stem
        assert "torch" in record["versions"]
        for name, table in record["tables"].items():  # every table renders
            assert render.render_table(record, name).count("\n|") >= 2, (file.name, name)


def test_a_table_that_differs_from_its_file_is_found_and_rewritten(tmp_path):
    stale = "<!-- results: classification/readme -->\n| method | top-1 |\n|---|---|\n| KD | 99.9 |\n<!-- /results -->\n"
    rendered = render.render_text(stale, {})
    assert rendered != stale and "79.43 ± 0.51" in rendered and "99.9" not in rendered
    assert render.render_text(rendered, {}) == rendered


def test_a_column_with_a_group_reads_that_groups_runs_only():
    def run(group, row, seed, value):
        return {"group": group, "row": row, "seed": seed, "metrics": {"m": value}}

    runs = [run("a", "s", 0, 0.30), run("a", "s", 1, 0.34), run("a", "k", 0, 0.40), run("a", "k", 1, 0.44),
            run("b", "s", 0, 0.50), run("b", "k", 0, 0.45), run("b", "k", 1, 0.47)]
    record = {"benchmark": "toy", "date": "today", "runs": runs, "tables": {"both": {"source": "short", "rows": ["s", "k"],
              "columns": [{"label": "a", "group": "a", "metric": "m", "kind": "mean", "digits": 2},
                          {"label": "b vs s", "group": "b", "metric": "m", "kind": "delta", "base": "s", "digits": 2}]}}}
    lines = render.render_table(record, "both").splitlines()
    # a: s (0.30 + 0.34) / 2, k (0.40 + 0.44) / 2; b: k's mean 0.46 less s's 0.50
    assert lines[2:4] == ["| s | 0.32 | +0.00 |", "| k | 0.42 | -0.04 |"], lines


def test_the_methods_page_lists_every_registered_method_and_option():
    from diffkd.methods import METHODS

    table = render.render_methods()
    for name, cls in METHODS.items():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        assert all(f"`{option}`" in row for option in cls.option_names()), name


def test_the_readme_is_short_and_shows_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
