"""Long-tailed datasets and FFCV pipelines.

``prepare_dataset(data_cfg) -> PreparedDataset`` (:mod:`ltssl.data.prepare`, which defines both)
is the one call the training job and the sweep driver use: it builds, once per content, the LT
subset's ``train.beton`` / ``test.beton`` / ``probe.beton`` and their ``manifest.json``.
:mod:`ltssl.data.ffcv` holds ``SSLLoader`` (K augmented views per image) and ``EvalLoader``
(plain images in file order); it is not imported here because it imports torch, and FFCV itself
on first use (seconds of numba compilation), which the login-node checks must not pay.
Every bad input raises :class:`DataError` with a one-line message naming the field or file.
"""

from .errors import DataError
from .longtail import balanced_counterpart, balanced_counts, class_counts, class_groups, longtail_subset
from .prepare import PreparedDataset, dataset_dir_name, make_longtail_manifest, prepare_dataset, write_betons

__all__ = [
    "DataError",
    "PreparedDataset",
    "balanced_counterpart",
    "balanced_counts",
    "class_counts",
    "class_groups",
    "dataset_dir_name",
    "longtail_subset",
    "make_longtail_manifest",
    "prepare_dataset",
    "write_betons",
]
