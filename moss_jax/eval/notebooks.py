"""Runs an analysis notebook top to bottom with parameters and saves its figures.

    python -m moss_jax.eval.notebooks notebooks/training_curves.ipynb --out out/ \
        -p run_dirs='["runs/pretrain_tiny_cpu"]'

Parameters follow papermill's convention: the cell tagged `parameters` holds the defaults and
a cell with the given values (Python literals) is inserted after it. The executed notebook
(figures embedded) is written to `out/<name>.ipynb` and every PNG figure to
`out/<name>_figN.png`. A cell that raises stops the run with the cell's traceback.
"""

from __future__ import annotations

import argparse
import ast
import base64
import re
import sys
from pathlib import Path
from typing import Any


class NotebookError(RuntimeError):
    """A notebook could not be run (missing parameters cell, unknown parameter, a failing cell)."""


def inject_parameters(nb: Any, parameters: dict[str, Any]) -> None:
    import nbformat

    index = next((i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])), None)
    if index is None:
        raise NotebookError("the notebook has no cell tagged 'parameters'")
    known = set()
    for node in ast.parse(nb.cells[index].source).body:
        if isinstance(node, ast.Assign):
            known |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise NotebookError(f"unknown parameter(s) {unknown}; the notebook's parameters are {sorted(known)}")
    source = "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)


def execute_notebook(
    path: str | Path,
    out_dir: str | Path,
    parameters: dict[str, Any] | None = None,
    timeout: int = 300,
    cwd: str | Path | None = None,
) -> tuple[Path, list[Path]]:
    """Executes a notebook; returns the executed notebook's path and its saved PNG figures.

    The kernel runs in `cwd` (default: this process's directory), so relative paths in the
    parameters mean what they mean to the caller.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path, out_dir = Path(path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters or {})
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(Path(cwd or Path.cwd()))}}
    )
    executed = out_dir / path.name
    try:
        client.execute()
    except CellExecutionError as e:
        nbformat.write(nb, executed)
        message = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # the traceback's terminal colours
        raise NotebookError(f"{path}: a cell failed (partial output in {executed}):\n{message}") from e
    nbformat.write(nb, executed)
    figures = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            png = output.get("data", {}).get("image/png")
            if png:
                fig = out_dir / f"{path.stem}_fig{len(figures) + 1}.png"
                fig.write_bytes(base64.b64decode(png))
                figures.append(fig)
    return executed, figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moss_jax.eval.notebooks", description=__doc__.split("\n")[0])
    p.add_argument("notebook")
    p.add_argument("--out", required=True)
    p.add_argument("-p", "--param", action="append", default=[], help="name=python_literal")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = p.parse_args(argv)
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value  # a bare string
    try:
        executed, figures = execute_notebook(args.notebook, args.out, params, args.timeout)
    except NotebookError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{executed}: {len(figures)} figure(s)")
    for fig in figures:
        print(f"  {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
