#!/usr/bin/env python
"""Make a long-tailed subset: decide the train (LT or same-n balanced), test and probe images.

Writes OUT/manifest.json (source checksum, seed, per-class counts, indices, the balanced/LT
pairing, many/medium/few groups). Then `python data_prep/write_ffcv.py OUT` writes the .beton files.

    python data_prep/make_longtail.py --dataset cifar10 --root DIR --imbalance-ratio 100 --out OUT
    python data_prep/make_longtail.py --dataset digits --imbalance-ratio 10 --out OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltssl.config import DataConfig  # noqa: E402
from ltssl.data import DataError, make_longtail_manifest  # noqa: E402
from ltssl.data.prepare import write_manifest  # noqa: E402

DEFAULT_RATIO = 100.0  # without a split file: CIFAR-LT's usual r


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=["digits", "cifar10", "cifar100", "imagefolder"],
                   help="source: scikit-learn digits (embedded), CIFAR 'python version' folder, or image folder")
    p.add_argument("--root", help="source folder (cifar-10-batches-py / cifar-100-python or its parent; "
                                  "imagefolder: root with train/ and val/ class folders); not for digits")
    p.add_argument("--imbalance-ratio", type=float, default=None,
                   help=f"n_max / n_min of the exponential profile (class c keeps int(n_max * r^(-c/(C-1)))); 1 = balanced; "
                        f"default {DEFAULT_RATIO:g}. With --split-file the split decides it (its n_max / n_min, recorded in "
                        f"the manifest); a value given then must agree with it")
    p.add_argument("--n-max", type=int, default=None, help="images of the most frequent class (default: the smallest class size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-class image choice (PCG64)")
    p.add_argument("--balanced", action="store_true", help="train on the same-n balanced counterpart instead of the LT subset")
    p.add_argument("--class-order", type=lambda s: [int(c) for c in s.split(",")], default=None,
                   help="comma-separated class ids from frequent to rare (default 0,1,...,C-1)")
    p.add_argument("--semi-synthetic", action="store_true",
                   help="Liu et al. 2022 layout: frequent-class images carry a rare-class image beside them")
    p.add_argument("--split-file", help="published subset: index list (CIFAR pool positions) or 'relative/path label' list")
    p.add_argument("--test-split-file", help="imagefolder: published test list")
    p.add_argument("--probe-per-class", type=int, default=None, help="images per class of the balanced probe subset")
    p.add_argument("--image-size", type=int, default=32, help="training image side in pixels (JPEG size for image folders)")
    p.add_argument("--out", required=True, help="output folder (manifest.json; write_ffcv.py adds the .beton files)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ratio = args.imbalance_ratio
    if ratio is None and not args.split_file:
        ratio = DEFAULT_RATIO
    # DataConfig is a plain dataclass: None (a split file decides the ratio) passes to the data layer as is.
    cfg = DataConfig(dataset=args.dataset, root=args.root, split_file=args.split_file, imbalance_ratio=ratio,
                     n_max=args.n_max, balanced=args.balanced, class_order=args.class_order,
                     semi_synthetic=args.semi_synthetic, image_size=args.image_size, seed=args.seed,
                     test_split_file=args.test_split_file, probe_per_class=args.probe_per_class)
    try:
        manifest = make_longtail_manifest(cfg)
        path = write_manifest(manifest, args.out)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t = manifest["train"]
    ratio = manifest["imbalance_ratio"]
    print(f"{path}: {t['subset']} train subset of {t['n']} images, counts {t['counts']}, "
          f"imbalance ratio {'unbounded' if ratio is None else format(ratio, '.4g')}; "
          f"test {manifest['test']['n']}, probe {manifest['probe']['n']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
