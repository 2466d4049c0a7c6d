"""Method settings of the embedded benchmark (no torch needed: the sweep and notebooks read it).

The :class:`cnp.pipeline.Params` defaults are the paper's method (Appendix A). Where the embedded
benchmark needs other method settings, they are here, in one place, and the notebooks'
parameters cells and every preset on the embedded benchmark use them.
"""

from __future__ import annotations

from typing import Any

#: The embedded benchmark's method settings where they differ from the paper's (the ``Params``
#: defaults), used by the notebooks' parameters cells and every preset on the embedded benchmark:
#: K = 8 subspaces of the 128-channel conv4_3 (chosen among Table 1's values on validation; the
#: paper: K = 4 of VGG-16's 512 channels) and the pruning rate counted over the prunable filters
#: (80 % of all filters, the paper's basis, is 91 % of the prunable ones, which leaves this
#: network - 4x narrower than VGG-16 - as a constant classifier).
BENCHMARK_DEFAULTS: dict[str, Any] = {"K": 8, "rate_of": "prunable"}

#: One line per :class:`cnp.pipeline.Params` field: what it means (``python -m cnp.sweep
#: --list-params`` prints it with the field's type and default; a test keeps it complete).
PARAM_HELP: dict[str, str] = {
    # run
    "pair": "class pair: carton-dugong (easy), crate-packet (hard), basketball (Figure 1 demo); imagenet/folder: or a manifest file",
    "seed": "seed of the data split, the warm-up, DRSA's starts and the fine-tunes",
    "dataset": "synthetic (the embedded benchmark, no download), imagenet (an ImageNet tree) or folder (any tree a manifest describes)",
    "run_dir": "run directory ('' : runs/<pair>/seed<k>)",
    "device": "auto, cpu or cuda",
    "threads": "torch threads (0: $CNP_THREADS, else all cores)",
    "smoke": "tiny sizes and few steps (a check of the machinery, minutes on a CPU)",
    "memory_format": "channels_last (NHWC convolutions, faster) or contiguous (NCHW: the arithmetic of versions before 0.4)",
    "drsa_precision": "DRSA's two large GEMMs: auto (bf16 where the device computes it natively, else fp32), bf16, fp32",
    "precision": "the fine-tunes' arithmetic: auto (bf16 autocast on CUDA, fp32 on the CPU), bf16 (also on CPUs with native bf16: AVX512-BF16, AMX), fp32",
    # model
    "arch": "vgg16 (the paper's network) or a torchvision CNN (vgg16_bn, resnet18, resnet50 ...); synthetic: pretrained on the embedded corpus",
    "weights": "imagenet/folder: torchvision weights by name (IMAGENET1K_V1, DEFAULT; '': weights_path, or VGG-16's file in the hub cache; embedded: the embedded benchmark's backbone)",
    "allow_download": "imagenet/folder: let torchvision download missing weights (default: never touch the network)",
    "expected_sha256": "imagenet/folder: SHA-256 of weights_path ('': torchvision's own check; 'none': skip, for your own weights)",
    # data
    "imagenet_root": "dataset=imagenet: the folder with train/<wnid>/ class folders",
    "weights_path": "imagenet/folder: a weights file of arch ('': torchvision's cache)",
    "label_csv": "watermark labels file,watermark ('': the manifest's, when it has one)",
    "data_root": "dataset=folder: the image tree, root/<class>/ or root/train/<wnid>/ ('': the manifest's root)",
    "overlay": "imagenet/folder: the overlay that makes the w1 subgroups: auto (the manifest's), cnp or imagenet-w",
    "overlay_style": "imagenet/folder: the cnp overlay's style: manifest (its watermark.style) or params (the wm_* values)",
    "image_size": "image side in pixels (0: 48 for synthetic, else the manifest's centre crop, 224 for the paper's pairs)",
    "n_train_per_class": "training images per class (warm-up and fine-tuning)",
    "n_drsa": "positive images DRSA is fitted on",
    "n_rank": "images the filter ranking uses",
    "n_val_per_subgroup": "validation images per subgroup c0w0, c0w1, c1w0, c1w1",
    "n_test_per_subgroup": "test images per subgroup",
    "wm_text": "synthetic (imagenet/folder with overlay_style=params): the watermark's text",
    "wm_size": "synthetic (imagenet/folder with overlay_style=params): watermark height / image size",
    "wm_opacity": "synthetic (imagenet/folder with overlay_style=params): watermark opacity",
    "wm_color": "synthetic (imagenet/folder with overlay_style=params): watermark colour",
    "wm_placement": "synthetic (imagenet/folder with overlay_style=params): random, fixed or tiled",
    "wm_rate_pos": "share of positive training images with a watermark",
    "wm_rate_neg": "share of negative training images with a watermark",
    "faint_rate": "synthetic: share of images with a faint class signal (-1: the pair's default)",
    "faint_opacity": "synthetic: opacity of the faint class signal",
    "backbone_epochs": "synthetic: pretraining epochs of the embedded backbone",
    "backbone_images_per_class": "synthetic: pretraining images per corpus class",
    # warm-up
    "warmup_epochs": "epochs of the binary warm-up",
    "warmup_lr": "learning rate of the warm-up",
    "warmup_head": "what the warm-up trains: classifier (fc6-fc8, fc8 new) or fc8 (the new last layer only)",
    # augment
    "layer": "the DRSA layer l (paper or qualified name; the virtual layer sits on its ReLU)",
    "K": "number of concept subspaces U_k",
    "d_k": "subspace dimension (0: D / K; K * d_k must equal D)",
    "lrp_variant": "LRP rules: alpha1beta0 (the paper), epsilon or gamma",
    "drsa_steps": "DRSA optimisation steps",
    "drsa_restarts": "DRSA restarts (the best objective J is kept)",
    "n_positions": "feature-map positions sampled per image for DRSA",
    "subspace_method": "drsa (the paper), prca (baseline) or oracle (from watermark masks)",
    # ablate
    "ablate": "ablated set K': auto (latent analysis), indices like 3 or 1,3, or mask:<part>",
    "ap_threshold": "auto: ablate subspaces whose watermark AP reaches this",
    "max_ablate": "auto: at most this many subspaces (0: no limit)",
    "ablation_mode": "zero (the paper) or mean (the paper's footnote 3)",
    # prune
    "methods": "pruning methods, comma-separated: cnp, vanilla, l1, random, cnp-keep, cnp-rr, cnp-recompute",
    "step": "share of the filters removed per pruning step",
    "target": "final pruning rate",
    "rate_of": "what step and target count: all filters (the paper) or the prunable ones",
    "epochs_per_step": "fine-tuning epochs after each pruning step",
    "final_epochs": "epochs of the final recovery fine-tune",
    "ft_lr": "fine-tuning learning rate",
    "ft_batch_size": "fine-tuning batch size",
    "ft_grad_clip": "fine-tuning gradient-norm clip (0: off)",
    "ranking_data": "pos (positive images, the paper) or pos+neg",
    "aggregation": "relevance per filter: signed (the paper's code), abs (Yeom et al.) or abs_of_sum",
    "normalisation": "per layer: sum, v / sum(v) (the paper's code and Yeom et al.), mean or none",
    "freeze_drsa_layer": "do not fine-tune the DRSA layer's weights",
    "finetune_with_virtual_layer": "fine-tune with the ablated layer active (the paper's code; text: bypassed)",
    "recompute_drsa": "refit DRSA after every fine-tune for cnp too (the method cnp-recompute does this)",
    "rr_lambda": "cnp-rr: weight of the concept penalty in the fine-tunes",
    "wm_share_images": "watermarked test images explained per evaluation (relevance share on the watermark)",
    "heatmap_images": "example images whose heatmaps the notebooks show",
}


#: Parameters added after runs were first recorded, with the default that reproduces what those
#: runs did: at this value they are left out of every key (stage caches, the sweep's up-to-date
#: check), so runs recorded before the parameter existed stay valid; any other value is keyed.
KEY_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "rr_lambda": 1.0, "data_root": "", "overlay": "auto", "overlay_style": "manifest",
    "arch": "vgg16", "weights": "", "allow_download": False, "expected_sha256": "",
    # the arithmetic of versions before 0.4 (NCHW convolutions, fp32 fine-tunes on the CPU; the
    # key holds the precision as resolved on the device): runs recorded then stay valid at these
    # values; channels_last (the default) and bf16 are keyed
    "memory_format": "contiguous", "precision": "fp32", "drsa_precision": "fp32",
}

#: Per data set, the values that reproduce earlier runs where they differ from
#: :data:`KEY_NEUTRAL_DEFAULTS`. ImageNet runs recorded before ``overlay_style`` existed overlaid
#: the w1 subgroups in the ``wm_*`` style (``"params"``); the default ``"manifest"`` changes their
#: images, so on ImageNet it is keyed (those runs are recomputed, not reused) and ``"params"`` is not.
KEY_NEUTRAL_BY_DATASET: dict[str, dict[str, Any]] = {"imagenet": {"overlay_style": "params"}}


def key_dict(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` (a ``Params.to_dict()``) without the parameters at their key-neutral value.

    That value is the :data:`KEY_NEUTRAL_DEFAULTS` entry, or the
    :data:`KEY_NEUTRAL_BY_DATASET` entry of ``params['dataset']`` where it has one.
    """
    neutral = {**KEY_NEUTRAL_DEFAULTS, **KEY_NEUTRAL_BY_DATASET.get(params.get("dataset"), {})}
    return {k: v for k, v in params.items() if not (k in neutral and v == neutral[k])}


__all__ = ["BENCHMARK_DEFAULTS", "KEY_NEUTRAL_BY_DATASET", "KEY_NEUTRAL_DEFAULTS", "PARAM_HELP", "key_dict"]
