"""tf.data pipelines: the embedded dataset, user TFRecords, images + CSV.

The trainer uses only these three names; see source.py for the pipeline
(a pure function of seed and epoch) and tfrecord.py for the record schema.
replicas.py feeds those batches to a strategy's replicas, each its own slice
(the controller's `feed`, the eval step and BN calibration use it).
"""

from engine.data.errors import DataError
from engine.data.opening import open_data
from engine.data.source import DataSource

__all__ = ["open_data", "DataSource", "DataError"]
