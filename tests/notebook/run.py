"""Executes a notebook with nbclient (a real Jupyter kernel), in the
notebook's own directory, and writes the executed notebook.

usage: run.py NOTEBOOK OUTPUT

A cell that raises fails the run (exit 1, with the cell and its traceback).
The services are found as the notebook finds them: $PRODSYS_INTAKE_URL,
$PRODSYS_STATUS_URL, $PRODSYS_CATALOG_URL.
"""

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main() -> int:
    source, output = Path(sys.argv[1]), Path(sys.argv[2])
    notebook = nbformat.read(source, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(source.resolve().parent)}},
    )
    try:
        client.execute()
    except CellExecutionError as error:
        print(error, file=sys.stderr)
        return 1
    finally:
        nbformat.write(notebook, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
