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
