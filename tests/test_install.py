"""The package outside the checkout: the wheel's contents, a fresh install, ``cnp-notebooks``.

The repository keeps ``notebooks/`` and ``data_manifests/`` at its top level; a wheel carries
them as ``cnp/_data/notebooks`` and ``cnp/_data/manifests`` (``pyproject.toml``), and
:mod:`cnp.resources` finds whichever applies. The slow test builds the wheel from a copy of the
sources, installs it into a new virtual environment (the heavy dependencies come from the
development environment through a ``.pth`` file, so nothing is downloaded), and runs the smoke
sweep and the copy command from there, in a folder outside the checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from netguard import guard_env, refused

from cnp import notebooks as copy_cmd
from cnp import resources, sweep

REPO = Path(__file__).resolve().parents[1]
REPO_NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
REPO_MANIFESTS = sorted(p.name for p in (REPO / "data_manifests").iterdir() if p.suffix in (".json", ".md"))


# ============================================================================ packaging config
def test_pyproject_lists_every_package_and_maps_the_data_folders():
    """``packages`` is an explicit list (the data folders need a package-dir mapping, which
    package discovery cannot express): every sub-package of ``cnp`` must be in it."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "cnp").rglob("__init__.py")}
    listed = set(tool["packages"])
    assert found - listed == set(), "sub-packages missing from [tool.setuptools] packages"
    assert listed - found == {"cnp._data.notebooks", "cnp._data.manifests"}
    assert tool["package-dir"] == {"cnp._data.notebooks": "notebooks", "cnp._data.manifests": "data_manifests"}
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cnp-notebooks"] == "cnp.notebooks:main" and scripts["cnp-sweep"] == "cnp.sweep:main"


def test_resources_from_the_checkout():
    from cnp.data import imagenet as imn

    assert resources.checkout_root() == REPO
    assert resources.notebook_dir() == sweep.NOTEBOOK_DIR == REPO / "notebooks"
    assert resources.manifest_dir() == imn.MANIFEST_DIR == REPO / "data_manifests"
    assert [p.name for p in resources.notebook_files()] == REPO_NOTEBOOKS
    assert {"01_warmup.ipynb", "06_figures.ipynb"} <= set(REPO_NOTEBOOKS)


def test_installed_package_defaults_go_to_the_working_directory(tmp_path, monkeypatch):
    """Without a checkout, runs and figures default to the current directory (not next to the
    installed package), and the data folders are the package's ``_data`` copies."""
    monkeypatch.setattr(resources, "checkout_root", lambda: None)
    monkeypatch.delenv("CNP_RUNS", raising=False)
    monkeypatch.delenv("CNP_FIGURES", raising=False)
    monkeypatch.chdir(tmp_path)
    assert sweep.default_runs_root() == tmp_path / "runs"
    assert sweep.default_figures_dir() == tmp_path / "figures"
    assert sweep.default_run_dir("carton-dugong", 2, smoke=True) == tmp_path / "runs" / "smoke" / "carton-dugong" / "seed2"
    package = Path(resources.__file__).resolve().parent
    assert resources.notebook_dir() == package / "_data" / "notebooks"
    assert resources.manifest_dir() == package / "_data" / "manifests"
    monkeypatch.setenv("CNP_RUNS", str(tmp_path / "elsewhere"))
    assert sweep.default_runs_root() == tmp_path / "elsewhere"


# ============================================================================ cnp-notebooks
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_copy_notebooks_refuses_to_overwrite_without_force(tmp_path, capsys):
    dest = tmp_path / "new" / "nb"
    assert copy_cmd.main([str(dest)]) == 0
    assert sorted(p.name for p in dest.iterdir()) == REPO_NOTEBOOKS
    for name in REPO_NOTEBOOKS:
        assert (dest / name).read_bytes() == (REPO / "notebooks" / name).read_bytes()
    assert f"copied {len(REPO_NOTEBOOKS)} notebooks to {dest}" in capsys.readouterr().out
    edited = dest / "03_ablate.ipynb"
    edited.write_text("my edits")
    assert copy_cmd.main([str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "already holds" in err and "--force" in err and len(err.splitlines()) == 1
    assert edited.read_text() == "my edits"
    assert copy_cmd.main([str(dest), "--force"]) == 0
    assert edited.read_bytes() == (REPO / "notebooks" / "03_ablate.ipynb").read_bytes()
    assert _leftovers(dest) == []  # the temporary files were renamed into place


def test_copy_notebooks_takes_every_notebook_and_writes_nothing_on_refusal(tmp_path, monkeypatch, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("01_warmup.ipynb", "07_later.ipynb"):
        (src / name).write_text(json.dumps({"name": name}))
    (src / "notes.txt").write_text("not a notebook")
    monkeypatch.setattr(resources, "notebook_dir", lambda: src)
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "07_later.ipynb").write_text("mine")
    assert copy_cmd.main([str(dest)]) == 2
    assert "07_later.ipynb" in capsys.readouterr().err
    assert sorted(p.name for p in dest.iterdir()) == ["07_later.ipynb"]  # 01 was not written either
    written = copy_cmd.copy_notebooks(dest, force=True)
    assert [p.name for p in written] == ["01_warmup.ipynb", "07_later.ipynb"]
    assert json.loads((dest / "07_later.ipynb").read_text()) == {"name": "07_later.ipynb"}
    assert not (dest / "notes.txt").exists()


def test_copy_notebooks_bad_input(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert copy_cmd.main([str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    taken = tmp_path / "taken"
    (taken / "01_warmup.ipynb").mkdir(parents=True)
    assert copy_cmd.main([str(taken), "--force"]) == 2
    assert "folders named like notebooks: 01_warmup.ipynb" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        copy_cmd.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage: cnp-notebooks" in out and "--force" in out and "DIR" in out
    with pytest.raises(SystemExit) as exc:
        copy_cmd.main([])
    assert exc.value.code == 2
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(resources, "notebook_dir", lambda: empty)
    assert copy_cmd.main([str(tmp_path / "dest")]) == 2
    assert "no notebooks" in capsys.readouterr().err and not (tmp_path / "dest").exists()


# ============================================================================ wheel, fresh install
def _run(cmd, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res


def _build_wheel(tmp_path: Path, env: dict) -> Path:
    """Build the wheel from a copy of the sources: a build in the checkout itself would leave
    ``build/`` and ``cnp.egg-info`` there."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".ipynb_checkpoints")
    for name in ("cnp", "notebooks", "data_manifests"):
        shutil.copytree(REPO / name, src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", dist], env=env, cwd=tmp_path, timeout=300)
    (wheel,) = dist.glob("cnp-*.whl")
    return wheel


def _check_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for nb in REPO_NOTEBOOKS:
        assert f"cnp/_data/notebooks/{nb}" in names
    for man in REPO_MANIFESTS:
        assert f"cnp/_data/manifests/{man}" in names
    code = {p.relative_to(REPO).as_posix() for p in (REPO / "cnp").rglob("*.py")} | {"cnp/py.typed"}
    assert code - names == set(), "modules missing from the wheel"
    assert not [n for n in names if n.split("/")[0] in ("notebooks", "data_manifests", "tests", "bench")]
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "cnp-notebooks = cnp.notebooks:main" in text and "cnp-sweep = cnp.sweep:main" in text


def _fresh_venv(venv: Path, env: dict) -> Path:
    """A virtual environment without ``cnp`` that sees the development environment's packages
    (torch, papermill, ipykernel, pip, ...) through a ``.pth`` file. A plain path line does not
    run the ``.pth`` files there, so the checkout's editable install stays invisible."""
    _run([sys.executable, "-m", "venv", "--without-pip", venv], env=env, timeout=120)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     env=env).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (site / "_cnp_dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


PROBE = """
import json, cnp, cnp.resources as r, cnp.sweep as s, cnp.data.imagenet as imn
print(json.dumps({"cnp": cnp.__file__, "root": str(r.checkout_root()), "nb": str(s.NOTEBOOK_DIR),
                  "nbs": [p.name for p in r.notebook_files()], "man": str(imn.MANIFEST_DIR),
                  "pairs": imn.known_pairs(), "runs": str(s.default_runs_root()),
                  "figures": str(s.default_figures_dir())}))
"""
KERNEL_PROBE = """
from jupyter_client.kernelspec import KernelSpecManager
spec = KernelSpecManager().get_kernel_spec("cnp")
print(spec.argv[0])
"""


@pytest.mark.slow
def test_wheel_installs_and_runs_the_smoke_sweep_outside_the_checkout(tmp_path):
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CNP_RUNS", "CNP_FIGURES", "CNP_SMOKE",
                         "JUPYTER_PATH", "JUPYTER_DATA_DIR")}
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    base.update({"CNP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                 "CNP_THREADS": "1", "CNP_PROGRESS": "0", "PYTHONHASHSEED": "0",
                 "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
                 # the fresh environment's kernels come first (a user-wide 'cnp' kernel runs the checkout)
                 "JUPYTER_PATH": str(venv / "share" / "jupyter"),
                 "PATH": os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")])})
    env, netlog = guard_env(base, tmp_path / "netguard", allow_loopback=True)

    wheel = _build_wheel(tmp_path, env)
    _check_wheel_contents(wheel)
    python = _fresh_venv(venv, env)
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], env=env, cwd=work, timeout=300)

    # the installed package, not the checkout, with its data and run defaults outside site-packages
    info = json.loads(_run([python, "-c", PROBE], env=env, cwd=work, timeout=120).stdout)
    package = Path(info["cnp"]).resolve().parent
    assert package.is_relative_to(venv.resolve()) and not package.is_relative_to(REPO), info
    assert info["root"] == "None"
    assert Path(info["nb"]).resolve() == package / "_data" / "notebooks" and info["nbs"] == REPO_NOTEBOOKS
    assert Path(info["man"]).resolve() == package / "_data" / "manifests"
    assert info["pairs"] == sorted(p.stem for p in (REPO / "data_manifests").glob("*.json"))
    assert Path(info["runs"]) == work / "runs" and Path(info["figures"]) == work / "figures"

    # cnp-notebooks DIR from the installed package
    res = _run([venv / "bin" / "cnp-notebooks", work / "nb"], env=env, cwd=work, timeout=120)
    assert f"copied {len(REPO_NOTEBOOKS)} notebooks" in res.stdout
    for name in REPO_NOTEBOOKS:
        assert (work / "nb" / name).read_bytes() == (REPO / "notebooks" / name).read_bytes()
    again = subprocess.run([python, "-m", "cnp.notebooks", work / "nb"], env=env, cwd=work,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "already holds" in again.stderr, again.stdout + again.stderr
    assert "--force" in _run([python, "-m", "cnp.notebooks", "--help"], env=env, cwd=work).stdout

    # the kernel 'cnp' of the fresh environment, then the smoke sweep with the packaged notebooks
    _run([python, "-m", "ipykernel", "install", "--prefix", venv, "--name", "cnp",
          "--display-name", "Python (cnp)"], env=env, cwd=work, timeout=120)
    assert _run([python, "-c", KERNEL_PROBE], env=env, cwd=work).stdout.strip() == str(python)
    out, figs = work / "sweep", work / "figs"
    _run([venv / "bin" / "cnp-sweep", "--preset", "smoke", "--out", out, "--figures", figs,
          "--workers", "1", "--threads", "1"], env=env, cwd=work, timeout=600)
    metrics = json.loads((out / "carton-dugong" / "seed0" / "metrics.json").read_text())
    assert {"pair", "seed", "dataset", "params", "unpruned", "drsa", "curves", "timings_s"} <= set(metrics)
    assert (metrics["pair"], metrics["seed"], metrics["dataset"]) == ("carton-dugong", 0, "synthetic")
    assert metrics["params"]["smoke"] is True and {"cnp", "vanilla"} <= set(metrics["curves"])
    for curve in metrics["curves"].values():
        assert curve and {"overall", "c0w1"} <= set(curve[-1]["acc"])
    assert {"overall", "c0w1"} <= set(metrics["unpruned"]["acc"])
    for name in sweep.RUN_NOTEBOOKS:
        assert (out / "carton-dugong" / "seed0" / name).is_file()
    assert (figs / "fig3_accuracy_carton-dugong.png").stat().st_size > 0
    assert not (package / "_data" / "notebooks" / "runs").exists() and not (work / "runs").exists()
    assert refused(netlog) == []  # offline: nothing but loopback was tried
