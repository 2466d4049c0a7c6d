"""``python -m cnp.data``: manifests for your own data, and the embedded benchmark on disk.

Commands::

    python -m cnp.data manifest --root ROOT --positive NAME --negative NAME --out FILE.json
        [--layout imagenet|folder] [--pair NAME] [--label-csv CSV] [--masks DIR|beside]
        [--splits CSV] [--sizes train=N,val=N,...] [--resize 256 --crop 224] [--overlay auto]
    python -m cnp.data export-synthetic --pair carton-dugong --seed 0 --out DIR
        [--format png|jpeg] [--quality 95] [--smoke] [-p NAME=VALUE ...]
    python -m cnp.data summary MANIFEST [--root ROOT] [--seed 0]

Errors are one line on stderr (exit status 2); see docs/data.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cnp.io import CNPError


def _parse_sizes(text: str | None) -> dict[str, int] | None:
    if not text:
        return None
    out: dict[str, int] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise CNPError(f"--sizes: expected key=value items such as train=60,val=15, got {item!r}")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            raise CNPError(f"--sizes: {key.strip()}={value!r} is not an integer") from None
    return out


def _parse_params(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CNPError(f"-p expects NAME=VALUE (a cnp.pipeline.Params field), got {item!r}")
        out[key.strip()] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m cnp.data``."""
    ap = argparse.ArgumentParser(prog="python -m cnp.data",
                                 description="Manifests for your own data, and the embedded benchmark on disk.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    m = sub.add_parser("manifest", help="write a manifest for two classes of an image tree")
    m.add_argument("--root", required=True, help="the image tree (root/<class>/ or root/train/<wnid>/)")
    m.add_argument("--positive", required=True, help="positive class (label 1): folder name, or wnid for imagenet")
    m.add_argument("--negative", required=True, help="negative class (label 0): folder name, or wnid for imagenet")
    m.add_argument("--out", required=True, help="manifest file to write (.json); paths in it are relative to its folder")
    m.add_argument("--layout", choices=("imagenet", "folder"), default=None,
                   help="imagenet (root/train/<wnid>/) or folder (root/<class>/); default: imagenet when root/train exists")
    m.add_argument("--pair", default=None, help="pair name (default <positive>-<negative>)")
    m.add_argument("--positive-name", default=None, help="display name of the positive class")
    m.add_argument("--negative-name", default=None, help="display name of the negative class")
    m.add_argument("--label-csv", default=None, help="watermark labels file,watermark (files relative to --root)")
    m.add_argument("--masks", default=None,
                   help="watermark masks: a folder mirroring the images' relative paths, or 'beside' (next to the images)")
    m.add_argument("--mask-suffix", default=".mask.png", help="mask file name: <image stem><suffix> (default .mask.png)")
    m.add_argument("--splits", default=None, help="split file file,split[,label,watermark]: use these splits as they are")
    m.add_argument("--sizes", default=None,
                   help="split sizes, e.g. train=60,drsa=40,rank=30,val=10,test=15 (default: the paper's, scaled to fit)")
    m.add_argument("--resize", type=int, default=256, help="short side after resizing, at --crop (256)")
    m.add_argument("--crop", type=int, default=224, help="centre crop (224); image_size defaults to it")
    m.add_argument("--overlay", default="auto", choices=("auto", "cnp", "imagenet-w"),
                   help="watermark overlay that fills the w1 subgroups")
    m.add_argument("--description", default=None, help="free text")
    m.add_argument("--force", action="store_true", help="replace an existing --out")

    e = sub.add_parser("export-synthetic", help="write the embedded benchmark's pair as an image tree")
    e.add_argument("--pair", default="carton-dugong", help="carton-dugong, crate-packet or basketball")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", required=True, help="folder to create")
    e.add_argument("--format", default="png", choices=("png", "jpeg"), help="image files (png: lossless)")
    e.add_argument("--quality", type=int, default=95, help="JPEG quality (4:4:4)")
    e.add_argument("--smoke", action="store_true", help="the smoke sizes (60 train images per class, ...)")
    e.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a cnp.pipeline.Params field of the synthetic data, e.g. -p n_test_per_subgroup=100")
    e.add_argument("--force", action="store_true", help="replace an existing, non-empty --out")

    s = sub.add_parser("summary", help="build a manifest's splits and print their subgroup counts")
    s.add_argument("manifest", help="a manifest file or a packaged pair name")
    s.add_argument("--root", default=None, help="the image tree (default: the manifest's root)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=None, help="default: the manifest's centre crop")
    s.add_argument("--label-csv", default=None)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status (0, or 2 after a one-line error on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "manifest":
            from cnp.data.folder import make_manifest
            from cnp.data.imagenet import load_manifest

            path = make_manifest(
                args.root, args.positive, args.negative, args.out, layout=args.layout, pair=args.pair,
                positive_name=args.positive_name, negative_name=args.negative_name, label_csv=args.label_csv,
                masks=args.masks, mask_suffix=args.mask_suffix, splits=args.splits, sizes=_parse_sizes(args.sizes),
                resize=args.resize, crop=args.crop, overlay=args.overlay, description=args.description,
                overwrite=args.force,
            )
            man = load_manifest(path)
            print(f"wrote {path}: pair {man.pair!r}, layout {man.layout}, {man.positive.name} (positive) vs "
                  f"{man.negative.name} (negative), sizes {man.sizes}")
            if man.root is None:
                print(f"  the root {args.root} is outside the manifest's folder: pass it at run time "
                      f"(data_root={args.root} or build_pair(..., root=...))")
        elif args.command == "export-synthetic":
            from cnp.data.folder import export_synthetic

            path = export_synthetic(args.out, pair=args.pair, seed=args.seed, smoke=args.smoke,
                                    image_format=args.format, quality=args.quality, overwrite=args.force,
                                    **_parse_params(args.param))
            print(f"wrote {path.parent} (manifest {path}); read it back with dataset='folder', pair='{path}'")
        else:
            from cnp.data.imagenet import build_pair

            data = build_pair(args.manifest, args.root, args.seed, image_size=args.image_size,
                              label_csv=args.label_csv)
            print(data.summary())
            for name, split in data.splits.items():
                known = split.meta.get("masks_known_per_image", [])
                n_wm = int(split.wm.sum())
                n_known = sum(1 for k, w in zip(known, split.wm.tolist()) if k and w)
                print(f"  {name:<6s} watermarked {n_wm}, with known masks {n_known}")
    except CNPError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
