"""Interactive pieces of notebook 03: the live ablation explorer and the watermark labeller.

Both follow one pattern: a plain class holds the logic and is tested without a browser
(:class:`AblationExplorer`, :class:`WatermarkLabeler`); a function builds a thin ipywidgets UI
on it (:func:`ablation_widget`, :func:`labeler_widget`). Under papermill or nbval (no
front end) the widgets are created and rendered once, headless, without error.

AblationExplorer
    Stage 2 of the paper, interactively: a strength slider ``s_k`` in [0, 1] per subspace
    ``U_k`` (1 = kept, 0 = ablated; the paper's binary ablated set ``K'`` is one click away)
    and the ablation mode (``zero``: ``U_k' = 0``, the paper; ``mean``: the subspace
    carries its dataset-mean signal, the paper's footnote 3). Each change recomputes, on the
    augmented network, the subspace and overall LRP heatmaps of a few chosen images, their
    positive-class probability, and the accuracy on a small c0w1 set (negatives with a
    watermark: the OOD subgroup) and a small c1w0 set (positives without one).

WatermarkLabeler
    Human labelling of watermark presence on real (ImageNet) images; writes the label CSV
    (``file,watermark``) that the pair manifests read, through
    :func:`cnp.data.imagenet.write_label_csv` (atomic, validated).
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnp.io import CNPError


def _images_of(split_or_images: Any) -> torch.Tensor:
    if split_or_images is None:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    images = getattr(split_or_images, "images", split_or_images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        raise CNPError("pass a Split or uint8 images (n, 3, H, W)")
    return images


# ============================================================================ ablation explorer
class AblationExplorer:
    """Live ablation of concept subspaces on an augmented model (logic of the 03 widget).

    Parameters
    ----------
    model : nn.Module
        The warmed-up model carrying the virtual layer ``vl`` (see
        :func:`cnp.pipeline.augmented_model`).
    vl : VirtualLayer
    images : Split or uint8 tensor (n, 3, H, W)
        The images whose heatmaps and positive-class probabilities are shown.
    c0w1, c1w0 : Split or uint8 tensor, optional
        Small evaluation sets: negatives with a watermark (label 0) and positives without one
        (label 1). Their accuracy is reported per update.
    lrp_config : LRPConfig, optional
    mean_images : uint8 tensor, optional
        Images for the dataset-mean activation of ``mode='mean'`` (fitted on first use).
    device : str or torch.device
    """

    def __init__(self, model: nn.Module, vl, images, c0w1=None, c1w0=None, lrp_config=None,
                 mean_images: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        self.model, self.vl = model.eval(), vl
        self.images = _images_of(images)
        if self.images.shape[0] == 0:
            raise CNPError("AblationExplorer needs at least one image to show")
        self.eval_sets = {"c0w1": (_images_of(c0w1), 0), "c1w0": (_images_of(c1w0), 1)}
        self.lrp_config = lrp_config
        self.mean_images = mean_images
        self.device = torch.device(device)
        self._cache: dict[tuple, dict] = {}

    @property
    def K(self) -> int:
        return int(self.vl.K)

    @classmethod
    def from_run(cls, run, n_images: int = 4, n_eval: int = 40) -> AblationExplorer:
        """An explorer on a run's augmented model (stage outputs of 01 and 02 must exist).

        Images: the run's heatmap examples (positives with a watermark first, as in the
        figures); evaluation sets: the first ``n_eval`` test images of c0w1 and of c1w0.
        """
        from cnp.pipeline import augmented_model, lrp_config

        model, vl = augmented_model(run)
        test = run.data()["test"]
        order = torch.cat([test.subgroup_index("c1w1"), test.subgroup_index("c1w0")])[:n_images]
        return cls(model, vl, test.images[order],
                   c0w1=test.images[test.subgroup_index("c0w1")[:n_eval]],
                   c1w0=test.images[test.subgroup_index("c1w0")[:n_eval]],
                   lrp_config=lrp_config(run.params), mean_images=run.data()["drsa"].images,
                   device=run.device)

    def _configure(self, ablated: Sequence[int], mode: str,
                   strengths: Sequence[float] | None) -> tuple[tuple[int, ...], tuple[float, ...]]:
        abl = tuple(sorted({int(k) for k in ablated}))
        s = tuple(float(v) for v in strengths) if strengths is not None else (1.0,) * self.K
        if mode == "mean" and (abl or min(s, default=1.0) < 1) and not self.vl._has_mean:
            if self.mean_images is None:
                raise CNPError("mean ablation needs images for the dataset-mean activation (mean_images)")
            self.vl.fit_mean(self.model, self.mean_images)
        self.vl.set_ablation(abl, mode)  # validates indices, mode, 'keep at least one'
        self.vl.set_strengths(s)         # validates one value per subspace, each in [0, 1]
        # one key per setting: an ablated subspace has weight 0, whatever its strength says
        return abl, tuple(0.0 if k in abl else v for k, v in enumerate(s))

    def update(self, ablated: Sequence[int] = (), mode: str = "zero",
               strengths: Sequence[float] | None = None) -> dict[str, Any]:
        """Ablate ``ablated`` with ``mode`` at subspace ``strengths`` (default all 1: the paper's
        binary ablation) and recompute everything shown (cached per setting).

        Returns
        -------
        dict
            ``ablated`` (sorted list), ``mode``, ``strengths`` (list), ``subspaces`` (n, K, H, W) and ``overall``
            (n, H, W) heatmaps as numpy arrays, ``p_positive`` (n,), ``acc`` {``c0w1``,
            ``c1w0``} (NaN for an empty set), ``seconds`` (compute time; 0 when cached).

        Raises
        ------
        CNPError
            Index outside 0..K-1, every subspace ablated, an unknown mode, or strengths that are
            not one value in [0, 1] per subspace.
        """
        from cnp.concepts import subspace_heatmaps
        from cnp.images import normalize_images
        from cnp.training import predict_logits

        abl, s = self._configure(ablated, mode, strengths)
        key = (abl, mode, s)
        if key in self._cache:
            return {**self._cache[key], "seconds": 0.0}
        t0 = time.perf_counter()
        was = self.vl.enabled
        self.vl.enabled = True
        try:
            x = normalize_images(self.images, self.device)
            maps_k, maps = subspace_heatmaps(self.model, self.vl, x, lrp_config=self.lrp_config)
            with torch.no_grad():
                p = predict_logits(self.model, self.images, device=self.device).softmax(1)[:, 1]
                acc = {}
                for name, (imgs, label) in self.eval_sets.items():
                    if imgs.shape[0] == 0:
                        acc[name] = float("nan")
                        continue
                    pred = predict_logits(self.model, imgs, device=self.device).argmax(1)
                    acc[name] = float((pred == label).float().mean())
        finally:
            self.vl.enabled = was
        res = {"ablated": list(abl), "mode": mode, "strengths": list(s), "subspaces": maps_k.detach().cpu().numpy(),
               "overall": maps.detach().cpu().numpy(), "p_positive": p.numpy(), "acc": acc}
        self._cache[key] = res
        return {**res, "seconds": time.perf_counter() - t0}

    def compare(self, settings: Sequence[tuple[Sequence[int], str]]) -> list[dict]:
        """Numbers (no heatmaps) for several ``(ablated, mode)`` settings, for a static table."""
        rows = []
        for ablated, mode in settings:
            r = self.update(ablated, mode)
            rows.append({"K'": "{" + ", ".join(map(str, r["ablated"])) + "}", "mode": mode,
                         "mean p(positive)": f"{float(np.mean(r['p_positive'])):.3f}",
                         "acc c0w1": f"{r['acc']['c0w1']:.3f}", "acc c1w0": f"{r['acc']['c1w0']:.3f}"})
        return rows

    def images_hwc(self) -> np.ndarray:
        return self.images.permute(0, 2, 3, 1).numpy()


def static_widgets() -> bool:
    """True when widgets should be shown as static output (``$CNP_STATIC_WIDGETS`` set, not 0).

    The sweep sets it for the notebooks it runs: nobody can click a widget in a batch run, and
    nbclient can block forever on a cell that displays ipywidgets (jupyter/nbclient#312, open; it
    hung a sweep here twice at 03's ablation widget, on the same seed).
    """
    return os.environ.get("CNP_STATIC_WIDGETS", "") not in ("", "0")


def format_status(res: dict) -> str:
    """The widget's status line: the setting, p(positive) per image and the two accuracies
    (three decimals each)."""
    weak = [f"U_{k} {v:.2f}" for k, v in enumerate(res.get("strengths", [])) if v < 1 and k not in res["ablated"]]
    setting = f"K' = {{{', '.join(map(str, res['ablated']))}}}" + (f", strengths {', '.join(weak)}" if weak else "")
    p = ", ".join(f"{float(v):.3f}" for v in res["p_positive"])
    return (f"{setting}, mode {res['mode']}: p(positive) of the images [{p}]; "
            f"accuracy c0w1 {res['acc']['c0w1']:.3f}, c1w0 {res['acc']['c1w0']:.3f} ({res['seconds']:.2f} s)")


def ablation_widget(explorer: AblationExplorer, initial: Sequence[int] = (), mode: str = "zero"):
    """ipywidgets UI on an :class:`AblationExplorer`: a strength slider ``s_k`` per subspace
    (1 = kept, 0 = ablated), buttons for the paper's binary setting (the proposed ``K'`` =
    ``initial`` at 0, every other subspace at 1) and for no ablation, the mode, a status line with
    the numbers, and the heatmap figure. Returns the widget box.

    Under :func:`static_widgets` it returns the heatmap figure of the initial setting instead (a
    matplotlib Figure, the same picture the widget starts with).
    """
    from cnp.figures import fig_explorer

    initial = sorted({int(k) for k in initial})
    if static_widgets():
        return fig_explorer(explorer.update(initial, mode), explorer.images_hwc(),
                            title="ablated subspaces marked; red = positive relevance (static: CNP_STATIC_WIDGETS)")
    import ipywidgets as w
    from IPython.display import display

    sliders = [w.FloatSlider(value=0.0 if k in initial else 1.0, min=0.0, max=1.0, step=0.05, description=f"U_{k}",
                             continuous_update=False, readout_format=".2f", orientation="vertical",
                             tooltip=f"strength of subspace U_{k} (0 = ablated)", layout=w.Layout(height="140px"))
               for k in range(explorer.K)]
    paper = w.Button(description=f"paper: K' = {{{', '.join(map(str, initial))}}}",
                     tooltip="the paper's binary ablation of the proposed set (0 or 1 per subspace)")
    none = w.Button(description="no ablation", tooltip="every subspace at strength 1")
    mode_w = w.ToggleButtons(options=["zero", "mean"], value=mode, description="mode",
                             tooltips=["U_k' = 0 (the paper)", "dataset-mean signal (footnote 3)"])
    status = w.HTML()
    out = w.Output()
    busy = {"on": False}

    def refresh(*_):
        if busy["on"]:
            return
        strengths = [sl.value for sl in sliders]
        ablated = [k for k, v in enumerate(strengths) if v == 0.0]
        try:
            res = explorer.update(ablated, mode_w.value, strengths)
        except CNPError as exc:
            status.value = f"<b style='color:#b00'>{exc}</b>"
            return
        status.value = format_status(res)
        fig = fig_explorer(res, explorer.images_hwc(), title="ablated subspaces marked; red = positive relevance")
        with out:
            out.clear_output(wait=True)
            display(fig)

    def set_all(values):
        busy["on"] = True
        try:
            for sl, v in zip(sliders, values):
                sl.value = v
        finally:
            busy["on"] = False
        refresh()

    paper.on_click(lambda _: set_all([0.0 if k in initial else 1.0 for k in range(explorer.K)]))
    none.on_click(lambda _: set_all([1.0] * explorer.K))
    for sl in sliders:
        sl.observe(refresh, names="value")
    mode_w.observe(refresh, names="value")
    refresh()
    return w.VBox([w.HBox([w.Label("strength s_k:"), *sliders]), w.HBox([paper, none, mode_w]), status, out])


# ============================================================================ watermark labeller
class WatermarkLabeler:
    """Label watermark presence on image files and keep the label CSV up to date.

    Parameters
    ----------
    root : path
        The ImageNet root; ``files`` are relative to it (``train/<wnid>/<name>.JPEG``).
    files : sequence of str
        The files to label, in order.
    out_csv : path
        The label CSV (``file,watermark``). Existing labels in it are loaded (labelling
        resumes at the first unlabelled file) and kept; every :meth:`label` rewrites it
        atomically.
    """

    def __init__(self, root: str | os.PathLike, files: Sequence[str], out_csv: str | os.PathLike) -> None:
        from cnp.data.imagenet import read_label_csv

        self.root, self.out_csv = Path(root), Path(out_csv)
        self.files = list(files)
        if not self.files:
            raise CNPError(f"no image files to label under {self.root}")
        self.labels: dict[str, int] = read_label_csv(self.out_csv, self.root) if self.out_csv.is_file() else {}
        self.index = self._next_unlabelled(0)

    @classmethod
    def for_pair(cls, pair: str, root: str | os.PathLike, out_csv: str | os.PathLike | None = None,
                 splits: Sequence[str] = ("train", "val"), limit: int | None = None) -> WatermarkLabeler:
        """All images of the pair's two classes (sorted): ``root/<split>/<wnid>/`` for an
        ImageNet-layout manifest, ``root/<class folder>/`` for a folder-layout one
        (``python -m cnp.data manifest``); ``pair`` is a packaged pair or a manifest file.

        ``out_csv`` defaults to the manifest's ``watermark.label_csv`` (read by
        :func:`cnp.data.imagenet.build_pair` when it exists); ``limit`` caps the files per class
        (and split, for the ImageNet layout).
        """
        from cnp.data.imagenet import IMAGE_SUFFIXES, check_root, list_class_files, load_manifest

        man = load_manifest(pair)
        if out_csv is None:
            out_csv = man.default_label_csv()
            if out_csv is None:
                raise CNPError(f"the manifest of {pair!r} names no label_csv; pass out_csv=<path>")
        if getattr(man, "layout", "imagenet") != "imagenet":
            r = check_root(root, man.layout) if root is not None else man.root_dir()
            if r is None:
                raise CNPError(f"the manifest of {pair!r} records no root; pass root=<the image tree>")
            found = list_class_files(man, r)
            files = [f for key in ("positive", "negative") for f in found[key][:limit]]
            return cls(r, files, out_csv)
        r = check_root(root)
        files = []
        for split in splits:
            for cls_ in (man.positive, man.negative):
                d = r / split / cls_.wnid
                if not d.is_dir():
                    continue
                names = sorted(p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                               and p.suffix.lower() in IMAGE_SUFFIXES)
                files += [f"{split}/{cls_.wnid}/{n}" for n in names[:limit]]
        return cls(r, files, out_csv)

    def _next_unlabelled(self, start: int) -> int:
        for i in range(start, len(self.files)):
            if self.files[i] not in self.labels:
                return i
        return len(self.files)

    @property
    def done(self) -> bool:
        return self.index >= len(self.files)

    def current(self) -> str | None:
        """The file to label now (None when every file is labelled)."""
        return None if self.done else self.files[self.index]

    def progress(self) -> tuple[int, int]:
        """(labelled files among ``files``, total)."""
        return sum(f in self.labels for f in self.files), len(self.files)

    def label(self, watermark: bool | int, file: str | None = None) -> str | None:
        """Label ``file`` (default: the current one), save the CSV, move to the next unlabelled file."""
        f = file if file is not None else self.current()
        if f is None:
            raise CNPError("every file is labelled already")
        if f not in self.files:
            raise CNPError(f"{f!r} is not among the files being labelled")
        self.labels[f] = int(bool(watermark))
        self.save()
        if file is None or file == self.current():
            self.index = self._next_unlabelled(self.index + 1)
        return self.current()

    def skip(self) -> str | None:
        """Leave the current file unlabelled and move to the next file."""
        if not self.done:
            self.index += 1
        return self.current()

    def back(self) -> str | None:
        """Go back one file (to relabel it)."""
        self.index = max(0, self.index - 1)
        return self.current()

    def save(self) -> Path:
        from cnp.data.imagenet import write_label_csv

        return write_label_csv(self.out_csv, self.labels, root=self.root)

    def image_bytes(self, file: str | None = None, size: int = 320) -> bytes:
        """The image (longest side ``size``) as PNG bytes, for display."""
        from PIL import Image

        from cnp.io import safe_join

        f = file if file is not None else self.current()
        if f is None:
            return b""
        with Image.open(safe_join(self.root, f)) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
        return buf.getvalue()


def labeler_widget(labeler: WatermarkLabeler):
    """ipywidgets UI on a :class:`WatermarkLabeler`: the image, 'watermark' / 'clean' / 'skip' /
    'back' buttons and a progress line. Every click saves the CSV.

    Under :func:`static_widgets` it returns the progress line only (IPython HTML).
    """
    if static_widgets():
        from IPython.display import HTML

        n, total = labeler.progress()
        return HTML(f"labelled {n} / {total} &rarr; <code>{labeler.out_csv}</code> "
                    "(static output: unset CNP_STATIC_WIDGETS and run the notebook in Jupyter to label)")
    import ipywidgets as w

    img = w.Image(format="png", layout=w.Layout(max_width="340px"))
    info = w.HTML()
    buttons = {name: w.Button(description=name, button_style=style)
               for name, style in (("watermark", "danger"), ("clean", "success"), ("skip", ""), ("back", ""))}

    def show():
        n, total = labeler.progress()
        f = labeler.current()
        img.value = labeler.image_bytes() if f else b""
        where = f"<code>{f}</code>" if f else "<b>all files labelled</b>"
        info.value = f"{where} &nbsp; labelled {n} / {total} &rarr; <code>{labeler.out_csv}</code>"

    def act(name):
        def handler(_):
            if name in ("watermark", "clean") and not labeler.done:
                labeler.label(name == "watermark")
            elif name == "skip":
                labeler.skip()
            elif name == "back":
                labeler.back()
            show()
        return handler

    for name, b in buttons.items():
        b.on_click(act(name))
    show()
    return w.VBox([info, img, w.HBox(list(buttons.values()))])


__all__ = ["AblationExplorer", "WatermarkLabeler", "ablation_widget", "format_status", "labeler_widget",
           "static_widgets"]
