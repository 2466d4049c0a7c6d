"""Safe loading: weights-only checkpoints, no eval/exec of parameter strings, file
names from manifests and label CSVs confined to their root.

* Every ``torch.load`` in the package passes ``weights_only=True`` (an AST scan); nothing imports
  pickle-like modules or loads pickles by another door (``np.load(allow_pickle=True)``,
  ``yaml.load``).
* A checkpoint that pickles an object of an arbitrary class (here one whose unpickling would
  create a file) is refused by every loader with a clear :class:`~cnp.io.CNPError`, or rebuilt
  with a message where it sits in a cache, and its payload never runs.
* No ``eval``/``exec``/``compile``/``__import__`` in the package or the notebooks; the
  notebooks' parameters cells are plain literal assignments; a parameter string that looks like
  code stays a string.
* ``safe_join`` and the manifests' ``label_csv`` reject absolute paths, ``..`` and symlinks out.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import warnings
from pathlib import Path

import nbformat
import pytest
import torch

from cnp.io import CNPError, safe_join, safe_torch_load

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "cnp"
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _package_sources() -> dict[str, ast.AST]:
    return {str(p.relative_to(REPO)): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _notebook_sources() -> dict[str, ast.AST]:
    out = {}
    for nb_path in NOTEBOOKS:
        nb = nbformat.read(nb_path, as_version=4)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                src = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
                out[f"{nb_path.name}[{i}]"] = ast.parse(src)
    return out


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


# ============================================================================ static scans
def test_every_torch_load_is_weights_only_and_no_pickle_door():
    loads, problems = [], []
    for where, tree in _package_sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n and n.split(".")[0] in ("pickle", "dill", "cloudpickle", "marshal",
                                                                      "shelve", "joblib", "_pickle")]
                if bad:
                    problems.append(f"{where}:{node.lineno} imports {bad}")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "load") and (name == "torch.load" or "weights_only" in kw):
                loads.append(where)
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if not ok:
                    problems.append(f"{where}:{node.lineno} calls torch.load without weights_only=True")
            if name.endswith(("np.load", "numpy.load")) and isinstance(kw.get("allow_pickle"), ast.Constant) \
                    and kw["allow_pickle"].value:
                problems.append(f"{where}:{node.lineno} np.load(allow_pickle=True)")
            if name in ("yaml.load", "yaml.unsafe_load", "torch.jit.load", "torch.package.PackageImporter"):
                problems.append(f"{where}:{node.lineno} {name}")
    assert not problems, problems
    assert loads == ["cnp/io.py"], f"torch.load outside cnp.io.safe_torch_load: {loads}"


def test_no_eval_or_exec_in_package_or_notebooks():
    banned = {"eval", "exec", "compile", "__import__", "builtins.eval", "builtins.exec", "execfile"}
    found = []
    for where, tree in {**_package_sources(), **_notebook_sources()}.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and _dotted(node.func) in banned:
                found.append(f"{where}:{node.lineno} {_dotted(node.func)}(...)")
    assert not found, found


def _literal_or_env(node: ast.AST) -> bool:
    """A literal, or ``os.environ.get(<literal>, <literal>)`` compared with literals."""
    try:
        ast.literal_eval(node)
        return True
    except ValueError:
        pass
    if isinstance(node, ast.Compare):
        return all(_literal_or_env(n) for n in (node.left, *node.comparators))
    return (isinstance(node, ast.Call) and _dotted(node.func) == "os.environ.get" and not node.keywords
            and all(_literal_or_env(a) for a in node.args))


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cells_are_plain_literals(nb_path):
    """What papermill injects and what the cell holds are literals (the only other value is a
    flag read from an environment variable): nothing is computed from a parameter string."""
    nb = nbformat.read(nb_path, as_version=4)
    (cell,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Import):
            continue
        assert isinstance(node, ast.Assign | ast.AnnAssign), ast.dump(node)
        assert _literal_or_env(node.value), ast.unparse(node)


def test_code_looking_parameter_strings_stay_strings(tmp_path):
    from cnp import sweep
    from cnp.pipeline import make_params, notebook_params

    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    assert sweep.parse_value(payload) == payload  # neither JSON nor a literal: kept as text
    assert sweep.parse_assignments([f"wm_text={payload}"]) == {"wm_text": payload}
    with pytest.raises(CNPError, match="wrong type"):
        make_params(K=payload)
    with pytest.raises(CNPError, match="wrong type"):
        notebook_params({"K": payload})
    assert make_params(wm_text=payload).data.wm_text == payload
    assert not marker.exists()


# ============================================================================ hostile checkpoints
class Exploit:
    """Unpickling this calls ``open(path, 'w')``: a harmless but observable side effect."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def hostile(tmp_path):
    """A checkpoint shaped like a cnp model file that also pickles an :class:`Exploit`."""
    from cnp.models import VGG, block_widths_to_conv_widths

    marker = tmp_path / "payload-ran"
    model = VGG(block_widths_to_conv_widths((4, 8, 8, 16, 16)), num_classes=2, hidden=8)
    path = tmp_path / "hostile.pt"
    torch.save({"arch": model.arch, "state_dict": model.state_dict(), "extra": {"note": Exploit(marker)}}, path)
    return path, marker


def test_hostile_payload_is_live_without_weights_only(hostile, tmp_path):
    """Sanity check of the fixture: a plain ``torch.load(weights_only=False)`` would run it."""
    path, marker = hostile
    code = "import sys, torch\ntorch.load(sys.argv[1], weights_only=False)\n"
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, timeout=120)
    assert marker.exists()


def test_hostile_checkpoint_refused_by_every_loader(hostile, tmp_path, monkeypatch, capsys):
    from cnp import drsa, figures
    from cnp.data.splits import PairData
    from cnp.models import load_model, load_torchvision_vgg16

    path, marker = hostile
    refused = r"could not load .*hostile.pt as a weights-only checkpoint .*delete it and rebuild"
    with pytest.raises(CNPError, match=refused) as info:
        safe_torch_load(path)
    assert "\n" not in str(info.value) and "Unsupported global" in str(info.value)  # one line, says why
    with pytest.raises(CNPError, match=refused):
        load_model(path)
    with pytest.raises(CNPError, match=refused):
        PairData.load(path)
    with pytest.raises(CNPError, match=refused):
        load_torchvision_vgg16(path, expected_sha256=None)
    run_dir = tmp_path / "run"
    (run_dir / "ablate").mkdir(parents=True)
    (run_dir / "ablate" / "heatmaps.pt").write_bytes(path.read_bytes())
    with pytest.raises(CNPError, match="weights-only"):
        figures.load_heatmaps(run_dir)
    # a DRSA checkpoint is ignored with a warning, and the fit starts over
    ckpt = tmp_path / "drsa.pt"
    ckpt.write_bytes(path.read_bytes())
    A = torch.rand(40, 8, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="unreadable and is ignored"):
        res = drsa.fit(A, A.flip(0), K=2, steps=3, restarts=1, progress=False, checkpoint=ckpt)
    assert res.resumed_from == 0
    assert not marker.exists()


def test_hostile_cache_files_are_rebuilt_not_run(hostile, tmp_path, monkeypatch, capsys, tiny_vgg, tiny_pair,
                                                 random_U):
    """In the pair-data and backbone caches and as a pruning checkpoint, the hostile file is
    reported and replaced; its payload never runs."""
    from cnp.data.synthetic import PairConfig, load_pair
    from cnp.pretrain import BackboneConfig, backbone_path, load_backbone
    from cnp.pruning import PruneConfig, run_pruning

    path, marker = hostile
    monkeypatch.setenv("CNP_CACHE", str(tmp_path / "cache"))
    cfg = PairConfig(pair="carton-dugong", image_size=32, n_train_per_class=4, n_drsa=2, n_rank=2,
                     n_val_per_subgroup=1, n_test_per_subgroup=1)
    load_pair(cfg, verbose=False)
    (cached,) = (f for f in (tmp_path / "cache" / "pairs").iterdir() if not f.name.startswith("."))
    cached.write_bytes(path.read_bytes())
    load_pair(cfg)
    assert "is corrupt" in capsys.readouterr().out and _loads_as_pair_data(cached)

    from cnp.data.synthetic import CorpusConfig

    bcfg = BackboneConfig(block_widths=(4, 8, 8, 16, 16), hidden=8, epochs=1,
                          corpus=CorpusConfig(n_per_class=2, n_val_per_class=2))
    bpath = backbone_path(bcfg)
    bpath.parent.mkdir(parents=True)
    bpath.write_bytes(path.read_bytes())
    load_backbone(bcfg, verbose=True)
    assert "could not be read" in capsys.readouterr().out

    pdir = tmp_path / "prune"
    pdir.mkdir()
    (pdir / "prune_vanilla.pt").write_bytes(path.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pruning(tiny_vgg, tiny_pair, "vanilla", PruneConfig(step=0.4, target=0.8, epochs_per_step=0,
                                                                final_epochs=0, wm_share_images=0,
                                                                protect=("conv4_3",)),
                    run_dir=pdir, verbose=True)
    assert "is unreadable" in capsys.readouterr().out and safe_torch_load(pdir / "prune_vanilla.pt")["done"]
    assert not marker.exists()


def _loads_as_pair_data(path: Path) -> bool:
    from cnp.data.splits import PairData

    return bool(PairData.load(path).splits)


# ============================================================================ paths
def test_safe_join_confines_paths_to_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "x.JPEG").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.JPEG").write_bytes(b"s")
    (root / "train" / "a" / "link.JPEG").symlink_to(outside / "secret.JPEG")
    (root / "train" / "dirlink").symlink_to(outside, target_is_directory=True)
    (root / "train" / "inside.JPEG").symlink_to(root / "train" / "a" / "x.JPEG")
    assert safe_join(root, "train/a/x.JPEG") == (root / "train/a/x.JPEG").resolve()
    assert safe_join(root, "./train/inside.JPEG") == (root / "train/a/x.JPEG").resolve()  # a link inside is fine
    for bad, pattern in [("/etc/passwd", "absolute"), (str(outside / "secret.JPEG"), "absolute"),
                         ("\\etc\\passwd", "absolute"), ("../outside/secret.JPEG", r"'\.\.'"),
                         ("train/a/../../../outside/secret.JPEG", r"'\.\.'"), ("train/..", r"'\.\.'"),
                         ("train/a/link.JPEG", "outside the data root"),
                         ("train/dirlink/secret.JPEG", "outside the data root")]:
        with pytest.raises(CNPError, match=pattern):
            safe_join(root, bad)
    # backslashes are ordinary characters on POSIX: such a name stays inside the root
    assert root.resolve() in safe_join(root, "..\\..\\etc\\passwd").parents


def test_manifest_label_csv_cannot_escape_its_folder(tmp_path):
    import cnp.data.imagenet as imn

    raw = json.loads((imn.MANIFEST_DIR / "carton-dugong.json").read_text())
    man_dir = tmp_path / "manifests"
    man_dir.mkdir()
    (tmp_path / "elsewhere.csv").write_text("file,watermark\n")
    (man_dir / "link.csv").symlink_to(tmp_path / "elsewhere.csv")
    for bad, pattern in [("../elsewhere.csv", r"'\.\.'"), (str(tmp_path / "elsewhere.csv"), "absolute"),
                         ("link.csv", "outside the data root")]:
        raw["watermark"]["label_csv"] = bad
        man = imn.manifest_from_dict(raw, man_dir / "carton-dugong.json")
        with pytest.raises(CNPError, match=pattern):
            man.default_label_csv()
    raw["watermark"]["label_csv"] = "labels/mine.csv"
    man = imn.manifest_from_dict(raw, man_dir / "carton-dugong.json")
    assert man.default_label_csv() == (man_dir / "labels" / "mine.csv").resolve()
