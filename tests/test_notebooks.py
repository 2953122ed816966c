"""The notebooks execute top to bottom (the report one is also run in test_study on a fresh study)."""
import os

import nbformat
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name, env=None):
    """Executes notebooks/<name> in a fresh kernel (env vars set for the kernel); returns the notebook."""
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    old = dict(os.environ)
    os.environ.update(env or {})
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(old)
    return nb


def outputs(nb) -> str:
    return "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     + str(o.get("data", {}).get("text/markdown", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))


def test_walkthrough_notebook_runs():
    text = outputs(run_notebook("walkthrough.ipynb"))
    assert "47 neurons" in text and "graph-connected subset" in text and "refusal" in text


def test_report_notebook_on_the_committed_example(tmp_path):
    """The committed docs/example report stays readable by the current code."""
    nb = run_notebook("report.ipynb", {"CNA_REPORT_DIR": os.path.join(ROOT, "docs", "example"), "TMPDIR": str(tmp_path)})
    assert "SmolLM2-135M testbed" in outputs(nb)
    assert os.path.getsize(tmp_path / "cna_redraw" / "nulls.png") > 5000
