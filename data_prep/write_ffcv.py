#!/usr/bin/env python
"""Write the FFCV .beton files of a long-tailed subset made by data_prep/make_longtail.py.

Reads OUT/manifest.json, reloads the source (its checksum must match), writes OUT/train.beton,
OUT/test.beton and OUT/probe.beton atomically (temp name, fsync, rename) with a sidecar JSON
each, and records their sha256 in the manifest.

    python data_prep/write_ffcv.py OUT [--num-workers 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltssl.data import DataError, write_betons  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder holding manifest.json from make_longtail.py")
    p.add_argument("--num-workers", type=int, default=1, help="writer processes")
    args = p.parse_args(argv)
    try:
        manifest = write_betons(args.out, num_workers=args.num_workers)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for split, info in manifest["files"].items():
        print(f"{Path(args.out) / info['path']}: {info['num_samples']} images, {info['size_bytes']} bytes, {info['sha256'][:23]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
