"""N replicas on N virtual CPUs, in a process of their own (tests/test_steps.py, test_data.py).

    python tests/replicas_worker.py N OUT.npz

The device count is fixed once per process and the test session already
split the CPU into 2, so 3 replicas need their own process; the session
records 1 and 2 replicas on its own devices (record(), conftest.py's
replica_runs). Writes to OUT.npz:

  rows_<step>_<j>, device_<step>_<j>   the row ids replica j received at each step
                                       of replica_batches (and the device it is on)
  traced_shapes                        the input shape each replica's model call was
                                       traced with (-1: unknown)
  spec_shapes                          the per-replica specs of the loop's iterator
  get_next_readers                     per get-next of the traced loop: the devices
                                       of the ops reading it
  weights_<i>, x, y                    a short momentum-SGD run with a binding global
                                       clip, and the data it trained on
  eval_images, eval_probs, eval_loss,  a short batch through make_eval_batch, and the
  eval_kernel, eval_bias               model's weights (a linear model: the test computes it)
  eval_pad_readers                     devices of the eval graph's ops reading the
                                       padded whole batch
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GLOBAL_BATCH, STEPS, ROWS_STEPS = 6, 4, 3
LEARNING_RATE, MOMENTUM, CLIPNORM = 0.1, 0.9, 1.0


def split_devices(n):
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(n)])
    return [f"/cpu:{i}" for i in range(n)]


def data(n_rows, seed=0):
    """Features [n, 3] and targets [n, 1] (float32), the same in test and worker."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n_rows, 3)).astype(np.float32),
            (3.0 * rng.normal(size=(n_rows, 1))).astype(np.float32))


def _mse(labels, logits):
    import tensorflow as tf
    return tf.reduce_mean(tf.square(logits - labels), axis=-1)


def _model(seen):
    """Dense(1) behind a layer that records the input shape each replica traces it with."""
    import keras
    import numpy as np

    class Recorder(keras.layers.Layer):
        def call(self, x):
            seen.append(tuple(x.shape))
            return x

    inputs = keras.Input([3])
    model = keras.Model(inputs, keras.layers.Dense(1, name="dense")(Recorder()(inputs)))
    model.get_layer("dense").set_weights([np.array([[0.5], [-1.0], [2.0]], np.float32),
                                          np.array([0.25], np.float32)])
    return model


def row_ids(strategy, out):
    """What replica_batches hands each replica: a dataset of row ids, 3 steps."""
    import numpy as np
    import tensorflow as tf
    from engine.data.replicas import replica_batches
    n = GLOBAL_BATCH * ROWS_STEPS
    ids = np.arange(n, dtype=np.int32)
    batches = tf.data.Dataset.from_tensor_slices(
        (ids.astype(np.float32)[:, None] * np.ones([1, 3], np.float32), ids)).batch(
        GLOBAL_BATCH, drop_remainder=True)
    iterator = iter(replica_batches(batches, strategy))
    for step in range(ROWS_STEPS):
        _, labels = next(iterator)
        for j, part in enumerate(strategy.experimental_local_results(labels)):
            out[f"rows_{step}_{j}"] = part.numpy()
            out[f"device_{step}_{j}"] = part.device


def get_next_readers(graph_def):
    """For each iterator get-next in the traced graph (and function bodies): the devices reading it.

    The old path had ONE get-next of the whole batch, read by a StridedSlice on
    every replica's device (each device received all of it). Fed per replica,
    each device has its own iterator, read on that device only.
    """
    out = []
    for nodes in [graph_def.node] + [f.node_def for f in graph_def.library.function]:
        get_next = {n.name for n in nodes if n.op in ("IteratorGetNext", "OptionalGetValue")}
        readers = {name: set() for name in get_next}
        for n in nodes:
            for name in n.input:
                producer = name.lstrip("^").split(":")[0]
                if producer in readers and n.device:
                    readers[producer].add(n.device.rsplit("/", 1)[-1])
        out += [",".join(sorted(devices)) for devices in readers.values()]
    return out


def short_run(strategy, local, out):
    """STEPS steps of momentum SGD with a binding global clip, K steps in one call."""
    import numpy as np
    import tensorflow as tf
    from engine.config import OptimizerConfig
    from engine.data.replicas import replica_batches
    from engine.optimizer import make_param_groups, make_schedule
    from engine.state import model_variable_keys
    from engine.steps import make_train_loop

    cfg = OptimizerConfig(name="momentum", learning_rate=LEARNING_RATE, momentum=MOMENTUM,
                          schedule="constant", global_clipnorm=CLIPNORM)
    counter = dict(trainable=False, aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
    seen = []
    with strategy.scope():
        model = _model(seen)
        step = tf.Variable(0, dtype=tf.int64, **counter)
        groups = make_param_groups(cfg, {"head": model.trainable_variables},
                                   model_variable_keys(model), make_schedule(cfg, STEPS, 1),
                                   step, tf.Variable(1.0, **counter))
    seen.clear()  # the model's build, not a replica's trace
    loop, traces = make_train_loop(
        model=model, loss_fn=_mse, groups=groups,
        phase_variables={"head": model.trainable_variables}, strategy=strategy,
        global_batch=GLOBAL_BATCH, local_replicas=local, global_step=step,
        global_clipnorm=CLIPNORM)
    x, y = data(GLOBAL_BATCH * STEPS)
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH, drop_remainder=True)
    iterator = iter(replica_batches(batches, strategy))
    out["spec_shapes"] = np.array([s.shape.as_list() for s in tf.nest.flatten(
        iterator.element_spec, expand_composites=True)])
    loop(iterator, tf.constant(STEPS))
    assert traces["count"] == 1
    graph = loop.get_concrete_function(iterator, tf.constant(STEPS)).graph.as_graph_def()
    out["get_next_readers"] = np.array(get_next_readers(graph))
    out["traced_shapes"] = np.array([[-1 if d is None else d for d in shape] for shape in seen])
    for i, w in enumerate(model.get_layer("dense").weights):
        out[f"weights_{i}"] = w.numpy()
    out["x"], out["y"] = x, y


def short_eval(strategy, local, out):
    """A 5-row batch (padded to the replicas on the host, then cut) through make_eval_batch."""
    import keras
    import numpy as np
    import tensorflow as tf
    from engine.steps import make_eval_batch

    with strategy.scope():
        inputs = keras.Input([2, 2, 3])
        pooled = keras.layers.GlobalAveragePooling2D()(inputs)
        model = keras.Model(inputs, keras.layers.Dense(2, name="dense")(pooled))
    eval_batch = make_eval_batch(model=model, loss_fn=_mse, strategy=strategy,
                                 local_replicas=local, input_size=2, num_outputs=2,
                                 multiclass=False)
    images = np.random.default_rng(1).normal(size=(5, 2, 2, 3)).astype(np.float32)
    labels = np.zeros([5, 2], np.float32)
    probs, per_example = eval_batch(images, labels)
    out["eval_images"], out["eval_probs"] = images, probs.numpy()
    out["eval_loss"] = per_example.numpy()
    out["eval_kernel"], out["eval_bias"] = (w.numpy() for w in model.get_layer("dense").weights)
    graph = eval_batch.get_concrete_function().graph
    # The pads of the arguments (the gather pads the replicas' outputs too, on their devices).
    pads = [op for op in graph.get_operations()
            if op.type in ("Pad", "PadV2") and op.inputs[0].op.type == "Placeholder"]
    out["eval_pad_readers"] = np.array(
        [reader.device for op in pads for reader in op.outputs[0].consumers()])


def main(n, path):
    record(split_devices(int(n)), path)


def record(devices, path):
    """Everything above for a MirroredStrategy over `devices`, written to path (an npz)."""
    import numpy as np
    from engine import distribute
    strategy = distribute.mirrored_strategy(devices)
    local = distribute.local_replica_count(strategy)
    out = {}
    row_ids(strategy, out)
    short_run(strategy, local, out)
    short_eval(strategy, local, out)
    np.savez(path, **out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
