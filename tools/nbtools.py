"""Shared by the notebook generators: write a notebook, and with --execute store its outputs."""

import sys
from pathlib import Path

import nbformat as nbf

ROOT = Path(__file__).resolve().parent.parent
md = nbf.v4.new_markdown_cell
code = nbf.v4.new_code_cell
CHECK = "# NBVAL_CHECK_OUTPUT\n"


def write_notebook(cells: list, name: str) -> Path:
    """Write ``notebooks/{name}``; run it and keep the outputs when ``--execute`` is given."""
    path = ROOT / "notebooks" / name
    nb = nbf.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"}})
    if "--execute" in sys.argv:
        from nbclient import NotebookClient

        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        nb.metadata.pop("widgets", None)  # widget state is made by running the notebook, not stored
    nbf.write(nb, path)
    print("wrote", path.relative_to(ROOT))
    return path


def exercises(intro: str, *items: tuple[str, str, str]) -> list:
    """An "Exercises" section: for each ``(question, answer, check)``, the question, a cell holding
    the reference answer (folded in JupyterLab, so a learner tries first) and a check cell whose
    verdict nbval compares."""
    cells = [md("## Exercises\n\n" + intro + "\n\nEach answer cell below holds a reference answer, "
                "folded (click the dots to unfold it): write your own over it, then run the check, "
                "which works the answer out again with dinb and says why.")]
    for i, (question, answer, check) in enumerate(items, 1):
        cells.append(md(f"**Exercise {i}.** {question}"))
        cell = code(answer)
        cell.metadata["jupyter"] = {"source_hidden": True}
        cells.append(cell)
        cells.append(code(CHECK + "from dinb import exercises\n\n" + check))
    return cells
