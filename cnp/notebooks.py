"""Copy the companion's notebooks into a folder of your choice: ``cnp-notebooks DIR``.

Usage
-----
::

    cnp-notebooks DIR [--force]          # or: python -m cnp.notebooks DIR [--force]

Copies every notebook (``*.ipynb``) of :func:`cnp.resources.notebook_dir` into ``DIR`` (created
when missing): the installed package's copies, or the checkout's ``notebooks/`` when running
from one. A file of the same name already in ``DIR`` stops the command before anything is
written, unless ``--force`` is given. Each file is written atomically (a temporary file in
``DIR``, then a rename), so an interrupted copy leaves no half-written notebook. Bad input (a
``DIR`` that is a file or cannot be written, a name taken by a folder) ends with one line
``error: ...`` on stderr and exit code 2.

The notebooks run on the Jupyter kernel ``cnp``; install it once for the Python that has
``cnp`` with ``python -m ipykernel install --sys-prefix --name cnp`` (in a virtual environment;
``--user`` otherwise). Runs started from a notebook go to ``$CNP_RUNS``, else ``runs/`` in the
kernel's working directory (the notebook's folder under JupyterLab); with ``cnp`` run from a
checkout, to the checkout's ``runs/``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cnp.io import CNPError, atomic_write_bytes
from cnp.resources import notebook_dir, notebook_files
from cnp.sweep.presets import KERNEL

__all__ = ["build_parser", "copy_notebooks", "main"]


def copy_notebooks(dest: str | Path, force: bool = False) -> list[Path]:
    """Copy every packaged notebook into ``dest``.

    Parameters
    ----------
    dest : str or pathlib.Path
        Target folder; created (with its parents) when missing.
    force : bool
        Overwrite notebooks of the same name already in ``dest``. Without it an existing file
        stops the copy before anything is written.

    Returns
    -------
    list of pathlib.Path
        The written files, in name order.

    Raises
    ------
    CNPError
        When no notebook is found, ``dest`` is a file or cannot be created or written, a target
        name is taken by a folder, or (without ``force``) a target file exists.
    """
    sources = notebook_files()
    if not sources:
        raise CNPError(f"no notebooks (*.ipynb) found in {notebook_dir()}; reinstall cnp")
    dest = Path(dest).expanduser()
    if dest.exists() and not dest.is_dir():
        raise CNPError(f"{dest} is a file, not a folder")
    targets = [dest / src.name for src in sources]
    folders = [t.name for t in targets if t.is_dir()]
    if folders:
        raise CNPError(f"{dest} has folders named like notebooks: {', '.join(folders)}")
    existing = [t.name for t in targets if t.exists()]
    if existing and not force:
        raise CNPError(f"{dest} already holds {', '.join(existing)}; "
                       "pass --force to overwrite (edits in those files are lost)")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CNPError(f"cannot create {dest}: {exc.strerror or exc}; choose another folder") from None
    if not os.access(dest, os.W_OK):
        raise CNPError(f"{dest} is not writable; choose another folder")
    mode = 0o666 & ~_umask()  # what a plain copy gets (the temporary file is private)
    for src, target in zip(sources, targets):
        atomic_write_bytes(target, src.read_bytes())
        os.chmod(target, mode)
    return targets


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``cnp-notebooks`` / ``python -m cnp.notebooks``."""
    ap = argparse.ArgumentParser(
        prog="cnp-notebooks",
        description="Copy the CNP notebooks (01_warmup ... 06_figures, every *.ipynb the package "
                    "holds) into DIR, to open them with JupyterLab there.",
        epilog=f"The notebooks use the Jupyter kernel {KERNEL!r}: install it once with "
               f"`python -m ipykernel install --sys-prefix --name {KERNEL}` (in a virtual environment; "
               "--user otherwise). Runs they start go to "
               "$CNP_RUNS, else runs/ beside the notebooks (the checkout's runs/ when cnp runs from a "
               "checkout). Exit codes: 0 copied, 2 bad input (nothing written).")
    ap.add_argument("dir", metavar="DIR", help="target folder (created when missing)")
    ap.add_argument("--force", action="store_true",
                    help="overwrite notebooks of the same name in DIR (default: refuse and write nothing)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code (0 copied, 2 bad input, nothing written)."""
    args = build_parser().parse_args(argv)
    try:
        written = copy_notebooks(args.dir, force=args.force)
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dest = written[0].parent
    print(f"copied {len(written)} notebooks to {dest}: {', '.join(p.name for p in written)}")
    print(f"open them with: jupyter lab {dest}   (kernel {KERNEL!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
