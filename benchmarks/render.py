"""Render the tables of the README and the docs from the results files (benchmarks/results/*.json).

A markdown file marks each table it quotes:

    <!-- results: yolo/scratch -->
    ...the rendered table, rewritten by this script...
    <!-- /results -->

`yolo/scratch` is the table `scratch` of benchmarks/results/yolo.json, whose `tables` entry says which runs and
columns it shows. Each table ends with a line naming its file, command and date.

    python benchmarks/render.py            # rewrite every marked table in README.md and docs/*.md
    python benchmarks/render.py --check    # exit 1 and name the tables that differ (the test suite runs this)
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import RESULTS, mean_std, read  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results: (?P<key>[\w.-]+)/(?P<table>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
METHODS_BLOCK = re.compile(r"(<!-- methods -->\n)(?P<body>.*?)(<!-- /methods -->)", re.S)


def fmt(value: float | None, digits: int, signed: bool = False) -> str:
    if value is None:
        return ""
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def cell(column: dict, runs: list[dict], base: list[dict] | None) -> str:
    """One cell: a statistic of a metric over the row's runs (mean ± std, mean, ratio or difference to a base row);
    a column with a "group" reads that group's runs only (a table comparing two workflows side by side)."""
    kind, digits = column.get("kind", "mean_std"), column.get("digits", 3)
    if "group" in column:
        runs = [r for r in runs if r.get("group") == column["group"]]
        base = [r for r in base or [] if r.get("group") == column["group"]]
    if kind == "seeds":
        return ", ".join(str(r["seed"]) for r in runs)
    values = [r["metrics"][column["metric"]] for r in runs if column["metric"] in r["metrics"]]
    if not values:
        return ""
    mean, std = mean_std(values)
    if kind == "mean_std":
        return fmt(mean, digits) + (f" ± {fmt(std, digits)}" if std is not None else "")
    if kind == "mean":
        return fmt(mean, digits)
    base_values = [r["metrics"][column["metric"]] for r in base or [] if column["metric"] in r["metrics"]]
    if not base_values:
        return ""
    base_mean = mean_std(base_values)[0]
    if kind == "ratio":
        return f"{mean / base_mean:.2f}"
    if kind == "delta":
        return fmt(mean - base_mean, digits, signed=True)
    raise ValueError(f"unknown column kind {kind!r}")


def render_table(results: dict, name: str) -> str:
    """The markdown of table `name` of a results file, and the line naming its source."""
    spec = results["tables"][name]
    columns = spec["columns"]
    lines = ["| " + " | ".join([spec.get("row_label", "row"), *(c["label"] for c in columns)]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    if "epochs_of" in spec:  # one run's training, epoch by epoch (its results.csv figures)
        wanted = spec["epochs_of"]
        run = next((r for r in results["runs"] if all(r.get(k) == v for k, v in wanted.items())), None)
        if run is None:
            raise ValueError(f"table {name!r} of {results['benchmark']}.json shows the run {wanted}, which the file lacks")
        for i, epoch in enumerate(run["epochs"], start=1):
            cells = [fmt(epoch.get(c["metric"]), c.get("digits", 2)) for c in columns]
            lines.append("| " + " | ".join([str(i), *cells]) + " |")
    elif "summary" in spec:  # figures published before results files existed: rendered as recorded
        for row in spec["summary"]:
            lines.append("| " + " | ".join([row["row"], *(str(row.get(c["label"], "")) for c in columns)]) + " |")
    else:
        runs = [r for r in results["runs"] if r.get("group") == spec.get("group", r.get("group"))]
        by_row: dict[str, list[dict]] = {}
        for run in runs:
            by_row.setdefault(run["row"], []).append(run)
        order = spec.get("rows") or list(by_row)
        labels = spec.get("labels", {})
        for row in order:
            if row not in by_row:
                continue
            cells = [cell(c, by_row[row], by_row.get(c.get("base"))) for c in columns]
            lines.append("| " + " | ".join([labels.get(row, row), *cells]) + " |")
    where = f"`benchmarks/results/{results['benchmark']}.json`"
    source = (f"\nFrom {where} ({results['date']}; the command is in the file).\n" if spec.get("source") == "short" else
              f"\nFrom {where} ({results['date']}, {results['machine']}): `{results['command']}`.\n")
    return "\n".join(lines) + "\n" + source


def render_methods() -> str:
    """Every registered method and the options a level may give it, with their defaults: read from the registry
    (`Method.option_names` and the signature that declares them), so the page lists what build accepts."""
    import inspect

    from diffkd.methods import METHODS

    lines = ["| method | reads | options (default) |", "|---|---|---|"]
    for name, cls in METHODS.items():
        declared = {**inspect.signature(cls.__init__).parameters, **inspect.signature(cls.build).parameters}
        options = []
        for option in cls.option_names():
            default = declared[option].default if option in declared else inspect.Parameter.empty
            options.append(f"`{option}`" + ("" if default is inspect.Parameter.empty else f" ({default!r})"))
        reads = "lists of taps" if cls.takes_tap_lists else ", ".join(sorted(cls.layouts))
        extra = [f"{k} from `{v.module}`" for k, v in cls.extra_inputs.items()]
        needs = [*(["targets"] if cls.needs_targets else []), *(["dataset indices"] if cls.needs_indices else []), *extra]
        reads += f"; needs {', '.join(needs)}" if needs else ""
        lines.append(f"| `{name}` | {reads} | {', '.join(options) or 'none'} |")
    return "\n".join(lines) + "\n"


def render_text(text: str, cache: dict[str, dict]) -> str:
    """`text` with every marked table rendered anew."""

    def replace(match: re.Match) -> str:
        key = match["key"]
        if key not in cache:
            cache[key] = read(key)
        return match.group(1) + render_table(cache[key], match["table"]) + match.group(5)

    text = METHODS_BLOCK.sub(lambda m: m.group(1) + render_methods() + m.group(3), text)
    return BLOCK.sub(replace, text)


def documents() -> list[Path]:
    """The markdown files whose tables are rendered: the README and the docs."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only say which tables differ from their results files")
    args = parser.parse_args(argv)
    cache: dict[str, Any] = {}
    stale = []
    for path in documents():
        text = path.read_text()
        rendered = render_text(text, cache)
        if rendered != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(rendered)
    if args.check and stale:
        print(f"tables differ from {RESULTS.relative_to(ROOT)}: {', '.join(map(str, stale))}; run "
              "python benchmarks/render.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
