"""Long-tailed datasets and FFCV pipelines (contract in CONTRACTS.md, section Data).

``prepare_dataset(data_cfg) -> PreparedDataset`` is the one call the training job and the sweep
driver use; :mod:`ltssl.data.ffcv` holds ``SSLLoader`` and ``EvalLoader`` (imported lazily:
importing FFCV costs seconds of numba compilation).
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
