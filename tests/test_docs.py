"""The docs agree with the code: README tables = docs/example/results.json rendered by report.tables,
every citation of the method page names a section that exists, the report says which subset rule it used."""
from __future__ import annotations

import json
import pathlib
import re

import numpy as np
import pytest

from cna_jax import report

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs" / "example"
METHOD = ROOT / "docs" / "METHOD.md"
README_SECTION = "## The study on the offline testbed"


def markdown_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """(header, rows) of every pipe table in ``text``; cells stripped, ``\\|`` kept as a literal bar."""
    def cells(line: str) -> list[str]:
        parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        return [p.strip().replace("\\|", "|") for p in parts]

    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.strip().startswith("|"):
            block.append(line)
            continue
        if block:
            assert len(block) >= 2 and set(block[1].replace("|", "").strip()) <= set("-: "), block
            tables.append((cells(block[0]), [cells(b) for b in block[2:]]))
            block = []
    return tables


def readme_study_tables():
    text = (ROOT / "README.md").read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + len(README_SECTION))
    return markdown_tables(text[start:end if end != -1 else None])


def test_readme_tables_equal_the_example_results():
    results = json.loads((EXAMPLE / "results.json").read_text())
    rendered = report.tables([results])
    readme = readme_study_tables()
    assert len(readme) == len(rendered), f"README shows {len(readme)} tables, the report has {len(rendered)}"
    matched = set()
    for header, rows in readme:
        # The report may gain columns; the README must show a subset of them, under the same names.
        names = [name for name, (h, _) in rendered.items() if set(header) <= set(h)]
        assert len(names) == 1, f"README table {header} matches report tables {names}"
        name = names[0]
        matched.add(name)
        r_header, r_rows = rendered[name]
        assert len(rows) == len(r_rows), f"{name}: README has {len(rows)} rows, results.json {len(r_rows)}"
        for row, r_row in zip(rows, r_rows):
            assert len(row) == len(header), f"{name}: malformed README row {row}"
            for col, cell in zip(header, row):
                want = r_row[r_header.index(col)]
                assert cell == want, f"README table {name}, column {col!r}: {cell!r} != {want!r} (results.json)"
    assert matched == set(rendered)


def test_markdown_table_parser_sees_a_changed_cell():
    """The comparison above can fail: one edited number makes the tables differ."""
    results = json.loads((EXAMPLE / "results.json").read_text())
    header, rows = report.tables([results])["a_refusal"]
    text = report.markdown_table(header, rows)
    assert markdown_tables(text) == [(header, rows)]
    changed = text.replace(rows[0][3], "93%")
    assert markdown_tables(changed) != [(header, rows)]


def method_sections() -> set[str]:
    heads = re.findall(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", METHOD.read_text(), flags=re.M)
    return set(heads)


def test_method_page_has_numbered_sections():
    sections = method_sections()
    assert {"1", "2", "3", "4", "5", "6"} <= sections
    assert re.search(r"^## 6\. Differences from the reference method", METHOD.read_text(), flags=re.M)


CITED = re.compile(r"(\S*)METHOD\.md(\)?)(\s*(?:§\s*(\d+(?:\.\d+)*)|section|\d))?")


def cited_files():
    out = []
    for folder in ("cna_jax", "launch", "configs", "tests", "notebooks"):
        for p in sorted((ROOT / folder).rglob("*")):
            if p.suffix in (".py", ".ipynb") and p.name != "test_docs.py":
                out.append(p)
    return out + sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md", ROOT / "BENCHMARKS.md"]


def test_method_citations_name_existing_sections():
    sections = method_sections()
    problems, n = [], 0
    for path in cited_files():
        if not path.exists():
            continue
        rel = path.relative_to(ROOT)
        for m in CITED.finditer(path.read_text()):
            n += 1
            prefix, _, tail, number = m.groups()
            where = f"{rel}: {m.group(0)!r}"
            if path.suffix in (".py", ".ipynb") and not prefix.endswith("docs/"):
                problems.append(f"{where}: cite it as docs/METHOD.md")
            if tail and number is None:
                problems.append(f"{where}: cite a section as §N")
            if number is not None and number not in sections:
                problems.append(f"{where}: docs/METHOD.md has no section {number}")
    assert n > 0, "no citation of docs/METHOD.md found at all"
    assert not problems, "\n".join(problems)


def _example_adjacency(kind: str) -> np.ndarray:
    g = json.loads((EXAMPLE / f"graph_{kind}.json").read_text())
    a = np.zeros((len(g["nodes"]), len(g["nodes"])), bool)
    for e in g["edges"]:
        a[e["source"], e["target"]] = a[e["target"], e["source"]] = True
    return a


def test_report_names_the_subset_rule():
    from cna_jax.graph import connected_subset

    results = json.loads((EXAMPLE / "results.json").read_text())
    adjacency = {k: _example_adjacency(k) for k in ("contrast_instruct", "harmful_instruct", "contrast_base")}
    degree = report.subset_rule(results, adjacency)
    assert "degree >= 1" in degree
    assert degree in (EXAMPLE / "report.md").read_text()  # the example's text is unchanged
    assert report.subset_rule(results, adjacency, largest_component=False) == degree
    largest = report.subset_rule(results, adjacency, largest_component=True)
    assert "largest connected component" in largest and "degree" not in largest
    # Without the setting, the rule is read off the subset sizes: a path 0-1-2 and an edge 3-4 give
    # 5 nodes of degree >= 1 and a largest component of 3.
    a = np.zeros((6, 6), bool)
    for i, j in ((0, 1), (1, 2), (3, 4)):
        a[i, j] = a[j, i] = True
    two = {"contrast_instruct": a, "harmful_instruct": a, "contrast_base": a}
    assert len(connected_subset(a)) == 5 and len(connected_subset(a, True)) == 3
    assert report.subset_rule(dict(results, graph_neurons=5, harmful_graph_neurons=5), two) == degree
    assert report.subset_rule(dict(results, graph_neurons=3, harmful_graph_neurons=3), two) == largest
    # In the example both rules give the same 33 nodes: the degree sentence is true either way.
    assert report.subset_rule(results, adjacency) == degree
    assert report.subset_rule(dict(results, largest_component=True), adjacency) == largest


@pytest.mark.parametrize("text, ok", [("docs/METHOD.md §3.7", True), ("METHOD.md section 2", False),
                                      ("docs/METHOD.md §9", False), ("docs/METHOD.md", True)])
def test_citation_check_rejects_bad_forms(text, ok):
    m = CITED.search(text)
    prefix, _, tail, number = m.groups()
    good = prefix.endswith("docs/") and not (tail and number is None) and (number is None or number in method_sections())
    assert good == ok


# Paths of shipped files the docs tell users to run or read: launch scripts, configs, docs, tests.
NAMED_PATH = re.compile(r"(?<![\w./-])((?:launch|configs|docs|tests|notebooks|cna_jax)/[\w./-]*\w)")

RUN_SCRIPT = re.compile(r"\bpython3?\s+([\w./-]+\.py)\b")
RUN_MODULE = re.compile(r"\bpython3?\s+-m\s+([\w.]+)")


def test_files_named_in_the_docs_exist():
    """A doc must not tell users to run a script or config that is not shipped."""
    missing = []
    for doc in [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if not doc.exists():
            continue
        text = doc.read_text()
        paths = [m.group(1) for m in NAMED_PATH.finditer(text)]
        paths += RUN_SCRIPT.findall(text)  # python some/script.py, wherever it lives
        paths += [m.replace(".", "/") + ".py" for m in RUN_MODULE.findall(text) if m.split(".")[0] == "launch"]
        for path in paths:
            path = path.split("::")[0]
            if "<" in path or "*" in path:
                continue
            if not (ROOT / path).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
    assert not missing, "named in the docs but not in the repository:\n" + "\n".join(sorted(set(missing)))
