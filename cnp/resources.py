"""Where the notebooks and the pair manifests are, in a checkout and in an installed package,
and where runs and figures go by default.

The repository keeps them at its top level (``notebooks/``, ``data_manifests/``). A wheel
carries the same files as package data, ``cnp/_data/notebooks`` and ``cnp/_data/manifests``
(the mapping is in ``pyproject.toml``). Run from a checkout (``pip install -e .``, or the
repository on ``sys.path``), the functions here return the checkout's folders, so edits to the
notebooks take effect at once; otherwise they return the installed copies.

No torch is imported here: the sweep's command line and its worker processes use this module.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from cnp.io import CNPError

__all__ = ["checkout_root", "default_figures_dir", "default_run_dir", "default_runs_root", "manifest_dir",
           "notebook_dir", "notebook_files"]

#: the ``cnp`` package folder
_PACKAGE_DIR = Path(__file__).resolve().parent
#: folder names at the repository's top level -> under ``cnp/_data`` in an installed package
_FOLDERS = {"notebooks": "notebooks", "data_manifests": "manifests"}


def checkout_root() -> Path | None:
    """The repository root when ``cnp`` runs from a checkout, else ``None``.

    A checkout is recognised by ``pyproject.toml``, ``notebooks/`` and ``data_manifests/`` beside
    the ``cnp`` package folder; an installed package lies in ``site-packages``, which has none of
    them.

    Returns
    -------
    pathlib.Path or None
        The folder that holds ``cnp/``, ``notebooks/`` and ``data_manifests/``, or ``None`` for
        an installed package.
    """
    root = _PACKAGE_DIR.parent
    if (root / "pyproject.toml").is_file() and all((root / name).is_dir() for name in _FOLDERS):
        return root
    return None


def _folder(name: str) -> Path:
    """The checkout's top-level folder ``name``, else its installed copy under ``cnp/_data``."""
    root = checkout_root()
    if root is not None:
        return root / name
    packaged = importlib.resources.files("cnp") / "_data" / _FOLDERS[name]
    try:
        return Path(os.fspath(packaged))
    except TypeError:
        raise CNPError(f"cnp is installed in a form whose data files are not on disk ({packaged}); "
                       "install it from its wheel with pip") from None


def notebook_dir() -> Path:
    """The folder of the notebooks ``01_warmup.ipynb`` ... ``06_figures.ipynb``.

    Returns
    -------
    pathlib.Path
        ``<checkout>/notebooks`` when running from a checkout, else the installed package's
        ``cnp/_data/notebooks``. The folder is not checked for existence.
    """
    return _folder("notebooks")


def manifest_dir() -> Path:
    """The folder of the packaged pair manifests (``<pair>.json``, schema in its ``README.md``).

    Returns
    -------
    pathlib.Path
        ``<checkout>/data_manifests`` when running from a checkout, else the installed package's
        ``cnp/_data/manifests``. The folder is not checked for existence.
    """
    return _folder("data_manifests")


def notebook_files() -> list[Path]:
    """Every notebook (``*.ipynb``) of :func:`notebook_dir`, sorted by name.

    Returns
    -------
    list of pathlib.Path
        The notebooks; empty when the folder is missing or holds none.
    """
    d = notebook_dir()
    return sorted(p for p in d.glob("*.ipynb") if p.is_file()) if d.is_dir() else []


# ---------------------------------------------------------------------------- where results go
def _default_base() -> Path:
    """The checkout's root, or the current directory for an installed package (never
    ``site-packages``)."""
    return checkout_root() or Path.cwd()


def default_runs_root() -> Path:
    """Where runs go when a notebook is given no ``run_dir``: ``$CNP_RUNS``, else ``<repo>/runs``
    from a checkout, else ``runs/`` in the current directory (an installed package)."""
    return Path(os.environ.get("CNP_RUNS") or _default_base() / "runs")


def default_figures_dir() -> Path:
    """Where 06 writes figures by default: ``$CNP_FIGURES``, else ``<repo>/figures`` from a
    checkout, else ``figures/`` in the current directory (an installed package)."""
    return Path(os.environ.get("CNP_FIGURES") or _default_base() / "figures")


def default_run_dir(pair: str, seed: int, smoke: bool = False) -> Path:
    """``<runs root>/<pair>/seed<k>`` (smoke runs: ``<runs root>/smoke/<pair>/seed<k>``)."""
    root = default_runs_root()
    return (root / "smoke" if smoke else root) / str(pair) / f"seed{int(seed)}"
