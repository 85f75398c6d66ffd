"""open_data: the one door to a run's data, by task.

Classification data (engine/data/source.py) and segmentation data
(engine/data/segmentation.py, which builds on source.py) are opened here, so
neither module needs the other's opener (no import cycle).
"""
from __future__ import annotations

from engine.data.segmentation import open_segmentation_data
from engine.data.source import open_classification_data


def open_data(data_dir, cache_dir, seed=0, val_fraction=0.1, task="multilabel",
              skip_bad_records=False):
    """The embedded set (no data_dir), the user's TFRecords, or images + CSV (masks for
    task="segmentation"); bad records left out and counted with skip_bad_records."""
    if task == "segmentation":
        data = open_segmentation_data(data_dir, cache_dir, seed=seed, val_fraction=val_fraction)
        if skip_bad_records:
            data.skip_bad_records()
        return data
    return open_classification_data(data_dir, cache_dir, seed=seed, val_fraction=val_fraction,
                                    skip_bad_records=skip_bad_records)
