"""The traced train and eval steps: the heart of the engine.

One code path for one and many replicas: each replica receives only its own
slice of the worker's batch, cut on the host and prefetched to its device
(engine/data/replicas.py: the train loop iterates `replica_batches(dataset,
strategy)`, what `Controller.feed` returns; the eval functions cut their one
batch on the host inside the traced function). Each replica averages its
per-example loss over the GLOBAL batch, and the replicas' gradients are
summed before clipping, so the clipped norm is the norm of the true global
gradient (Keras would clip each replica's part first). The data position
never depends on the distributed iterator: every epoch's dataset is rebuilt
at the saved step (engine/data/source.py), so that iterator is never saved.

`make_train_loop` returns a tf.function that runs K steps per call, so the
Python dispatch cost is paid once per K steps; K arrives as a tensor, so a
shorter last call of an epoch does not retrace. The variable lists are fixed
when the function is built: build a new one when the phase changes.

The non-finite guard: after the all-reduce every replica holds the same
summed gradients and the same global loss, so all agree on
`ok = isfinite(loss) and all(isfinite(grads))`. Each step is two
`strategy.run` calls: forward/backward/all-reduce, then (only under
`tf.cond(ok)`, in cross-replica context) clip + optimizer apply. The apply
cannot sit in a cond inside the replica function:
Keras' apply synchronizes replicas with `merge_call`, which MirroredStrategy
refuses inside control flow of the replica function. The forward pass runs
in a Keras StatelessScope, so what it would write (BatchNorm moving
statistics, dropout RNG state) comes out as new values; the replica
function checks them and writes them under `tf.cond(ok)`. A bad step thus
changes no weight, slot, optimizer iteration count, EMA shadow or BN
statistic; it is counted (health.StepGuard) and its batch is kept for a
diagnosis.

The EMA update of a good step runs at the start of the NEXT step (and after
the last step of a call): it reads the weights that step left and writes
only its shadows, and the next forward pass only reads those weights, so
the executor runs the two side by side instead of the update holding up the
loop's next iteration (an EMA is memory traffic beside a compute-bound
forward pass: inceptionv3's is three passes over 87 MB, engine/ema.py).
Automatic control dependencies keep it exact: the next apply, which writes
the weights, waits for the update's reads. After a call returns, the
shadows are exactly what an update right after each step would have made.
The global step still advances on a bad step: it counts consumed batches,
which is what the data position and the checkpoint numbering mean.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import keras
import tensorflow as tf

from engine.data.replicas import first_replica, is_per_replica, split_on_host, whole_batch
from engine.health import StepGuard, StepSummaries
from engine.optimizer import ParamGroup, clip_gradients
from engine.precision import DynamicLossScale
from engine.variables import as_tf_variable


def _next_replica_batch(iterator, local_replicas: int):
    """(images, labels) of the next step, one slice per replica (checked when traced).

    A plain tensor with several local replicas means the iterator yields
    whole worker batches: every replica would then train on all of it.
    """
    images, labels = next(iterator)
    if local_replicas > 1 and not is_per_replica(images):
        raise TypeError(f"the train loop of {local_replicas} replicas needs per-replica "
                        f"batches: iterate engine.data.replicas.replica_batches(dataset, "
                        f"strategy) (Controller.feed), not the dataset itself")
    return images, labels


def make_train_loop(*, model, loss_fn: Callable, groups: Dict[str, ParamGroup],
                    phase_variables: Dict[str, List], strategy, global_batch: int,
                    local_replicas: int, global_step: tf.Variable,
                    global_clipnorm: float = 0.0,
                    after_step: Optional[Callable[[], None]] = None,
                    clipnorm: float = 0.0, clipvalue: float = 0.0,
                    guard: Optional[StepGuard] = None,
                    summaries: Optional[StepSummaries] = None,
                    loss_scale: Optional[DynamicLossScale] = None,
                    jit_compile: bool = False):
    """Returns (train_loop, trace_counter).

    train_loop(iterator, num_steps) runs num_steps steps and returns the mean
    loss over its good (finite) steps (NaN when none was) and the last
    step's global gradient norm (replica-summed, before clipping). The
    iterator is over replica_batches(dataset, strategy) (Controller.feed):
    one slice per replica, already on its device.
    phase_variables: group name -> the variables that train in this phase.
    after_step: cross-replica work after each good step (the EMA update); it
    must only read what the step trained and write its own state, since it
    runs deferred: beside the next step's forward pass, or at the end of the
    call for the last step.
    guard: where bad steps are counted; one is made when None (it is then
    trace_counter["guard"]). summaries: in-graph TensorBoard summaries,
    written when a default writer is set around the calls.
    loss_scale: float16 training (precision.py): the loss is scaled before
    the gradient and the summed gradients unscaled; an overflow step is
    skipped like any non-finite one but counted there, not as a bad step.
    jit_compile: XLA-compile each replica's forward/backward pass (the bulk of
    a step; the iterator and the optimizer's apply stay outside XLA).
    """
    names = [n for n in groups if phase_variables.get(n)]
    variables = [v for n in names for v in phase_variables[n]]
    if guard is None:
        with strategy.scope():
            guard = StepGuard()
    traces = {"count": 0, "guard": guard}
    summaries = summaries if summaries is not None and summaries.enabled else None
    want_logits = summaries is not None and bool(summaries.image_every)
    forward, with_grads = _forward_and_graded(model, loss_fn, variables, global_batch=global_batch,
                                              loss_scale=loss_scale, want_logits=want_logits,
                                              jit_compile=jit_compile)
    apply = _cross_replica_apply(strategy, {n: groups[n] for n in names}, phase_variables,
                                 with_grads, clipvalue=clipvalue, clipnorm=clipnorm,
                                 global_clipnorm=global_clipnorm)
    settle = _deferred(after_step)
    count = _step_counter(guard, loss_scale)
    write_summaries = _summary_writer(summaries, strategy, global_step, guard, with_grads,
                                      {n: groups[n] for n in names})

    @tf.function
    def train_loop(iterator, num_steps):
        traces["count"] += 1  # Python side effect: runs once per trace.
        total = tf.constant(0.0)
        good = tf.constant(0.0)
        norm = tf.constant(0.0)
        pending = tf.constant(False)  # the last step was good and after_step has not run
        first = strategy.experimental_local_results  # all replicas agree after the all-reduce
        for _ in tf.range(num_steps):
            settle(pending)
            images, labels = _next_replica_batch(iterator, local_replicas)
            out = strategy.run(forward, args=(images, labels))
            loss, grads, norm_r, ok_r = out[:4]
            loss, norm, ok = first(loss)[0], first(norm_r)[0], first(ok_r)[0]
            tf.cond(ok, lambda: apply(grads, norm_r), lambda: tf.constant(False))
            count(ok, lambda i=images, l=labels: whole_batch(strategy, (i, l)))
            total += tf.where(ok, loss, 0.0)
            good += tf.cast(ok, tf.float32)
            if write_summaries is not None:
                write_summaries(loss, norm, grads, images, labels, out[4] if want_logits else None)
            global_step.assign_add(1)
            pending = ok
        settle(pending)
        mean = tf.where(good > 0, total / tf.maximum(good, 1.0), float("nan"))
        return mean, norm

    return train_loop, traces


def _forward_and_graded(model, loss_fn: Callable, variables: List, *, global_batch: int,
                        loss_scale: Optional[DynamicLossScale], want_logits: bool,
                        jit_compile: bool):
    """(replica forward function, with_grads()): with_grads gives the variables that got a
    gradient, in the order of the gradients.

    Which variables got one is known when the step is traced (None is a
    graph-structure fact); the forward pass records it, and those without one
    are left out of the all-reduce and the apply, as Keras does: a zero
    gradient would still move them through momentum or weight decay.
    """
    has_grad: List[bool] = []
    forward = _replica_forward(model, loss_fn, variables, has_grad, global_batch=global_batch,
                               loss_scale=loss_scale, want_logits=want_logits)
    if jit_compile:
        forward = tf.function(forward, jit_compile=True)

    def with_grads():
        return [v for v, has in zip(variables, has_grad) if has]

    return forward, with_grads


def _deferred(after_step: Optional[Callable[[], None]]) -> Callable:
    """settle(pending): runs after_step when the previous step was good and it has not run.

    A no-op without after_step, so a loop without an EMA traces no extra cond.
    """
    def settle(pending):
        if after_step is None:
            return

        def run():
            after_step()
            return tf.constant(True)

        tf.cond(pending, run, lambda: tf.constant(False))

    return settle


def _step_counter(guard: StepGuard, loss_scale: Optional[DynamicLossScale]) -> Callable:
    """count(ok, batch), cross-replica, once per step: the guard's counters and the loss
    scale's search (batch() gives the worker's batch, kept only on a bad step). A float16 overflow step is skipped like any non-finite one
    but is the scale search at work, not divergence: the guard does not count it."""
    def count(ok, batch: Callable[[], tuple]):
        counted_ok = ok
        if loss_scale is not None:
            counted_ok = tf.logical_or(ok, loss_scale.is_overflow(ok))
            loss_scale.update(ok)
        guard.record(counted_ok, batch)

    return count


def _summary_writer(summaries: Optional[StepSummaries], strategy, global_step, guard,
                    with_grads: Callable[[], List], groups: Dict[str, ParamGroup]):
    """write(loss, norm, grads, images, labels, logits) of the step's in-graph summaries
    (cross-replica, replica-agreeing values taken from the first replica), or None when
    summaries are off: then not a single summary op is traced."""
    if summaries is None:
        return None
    first = strategy.experimental_local_results
    learning_rates = {n: (lambda g=g: g.optimizer.learning_rate) for n, g in groups.items()}

    def write(loss, norm, grads, images, labels, logits):
        summaries.write(step=global_step + 1, loss=loss, norm=norm,
                        grads=[first(g)[0] for g in grads], variables=with_grads(),
                        learning_rates=learning_rates, bad_steps=guard.bad_steps,
                        # replica 0's slice: the first rows, whose logits are shown
                        images=first_replica(strategy, (images,))[0],
                        labels=first_replica(strategy, (labels,))[0],
                        logits=first(logits)[0] if logits is not None else None)

    return write


def _replica_forward(model, loss_fn: Callable, variables: List, has_grad: List[bool], *,
                     global_batch: int,
                     loss_scale: Optional[DynamicLossScale], want_logits: bool):
    """The replica function: this replica's slice, loss over the GLOBAL batch, gradients
    summed over replicas, and the verdict `ok` every replica agrees on.

    The forward pass runs in a Keras StatelessScope, so what it writes (BN
    moving statistics, dropout RNG state) is held as new values instead of
    being written; they are written only when the step is ok. A bad step
    (non-finite loss, gradient norm or BN statistic) thus never touches them,
    with no copy taken before the forward pass and no put-back after it.
    """
    # The tape wants tf.Variables; Keras 3 variables wrap one in `.value`.
    watched = [as_tf_variable(v) for v in variables]
    state = list(model.variables)

    def replica_forward(images, labels):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            # Watch only what trains: a frozen backbone's forward pass is then
            # not recorded at all, so a frozen step costs about a forward pass.
            tape.watch(watched)
            with keras.StatelessScope(collect_losses=True) as scope:
                logits = model(images, training=True)
                regularization = model.losses  # read in the scope: it holds add_loss terms
            per_example = loss_fn(labels, logits)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            if regularization:
                loss += tf.nn.scale_regularization_loss(tf.add_n(regularization))
            scaled = loss * loss_scale.scale if loss_scale is not None else loss
        grads = tape.gradient(scaled, watched)
        has_grad[:] = [g is not None for g in grads]
        grads = [g for g in grads if g is not None]
        written = _written_by_forward(scope, state)
        stats_bad = _any_non_finite([value for _, value in written])
        ctx = tf.distribute.get_replica_context()
        if ctx.num_replicas_in_sync > 1:
            # One all-reduce: every replica then holds the global loss too.
            loss, stats_bad, *grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM,
                                                     [loss, stats_bad] + grads)
        if loss_scale is not None:
            grads = [g / loss_scale.scale for g in grads]
        # The global norm is finite exactly when every gradient is (or it
        # overflows float32, above ~1.8e19, a step also worth skipping).
        norm = tf.linalg.global_norm(grads) if grads else tf.constant(0.0)
        ok = tf.math.is_finite(loss) & tf.equal(stats_bad, 0.0) & tf.math.is_finite(norm)
        _write_if(ok, written)
        return (loss, grads, norm, ok) + ((logits,) if want_logits else ())

    return replica_forward


def _written_by_forward(scope, state: List) -> List:
    """[(variable, new value)] of what the forward pass wrote in `scope`, in model order.

    Raises at trace time if it wrote a variable the model does not hold (it
    could then not be written back).
    """
    written = [(v, scope.get_current_value(v)) for v in state]
    written = [(v, value) for v, value in written if value is not None]
    if len(written) != len(scope.state_mapping):
        raise ValueError("the forward pass wrote a variable that is not in model.variables")
    return written


def _any_non_finite(values: List) -> tf.Tensor:
    """1.0 when an element of a floating-point value is NaN or infinite, else 0.0.

    A finite loss can come with an overflowed BN batch variance. Each replica
    judges its own statistics; the all-reduce then makes every replica agree.
    One concatenation and one sum for all values (BN statistics are small; a
    NaN or inf anywhere makes the sum non-finite), not a reduction per variable.
    """
    flat = [tf.cast(t, tf.float32) for t in values if t.dtype.is_floating]
    flat = [t if t.shape.rank == 1 else tf.reshape(t, [-1]) for t in flat]
    if not flat:
        return tf.constant(0.0)
    total = tf.reduce_sum(tf.concat(flat, axis=0) if len(flat) > 1 else flat[0])
    return 1.0 - tf.cast(tf.math.is_finite(total), tf.float32)


def _write_if(ok, written: List) -> None:
    """Writes what the forward pass computed for its state, only when the step is ok."""
    if not written:
        return

    def write():
        for v, value in written:
            v.assign(value)
        return tf.constant(True)

    tf.cond(ok, write, lambda: tf.constant(False))


def _cross_replica_apply(strategy, groups: Dict[str, ParamGroup], phase_variables,
                         with_grads: Callable[[], List], *, clipvalue: float,
                         clipnorm: float, global_clipnorm: float):
    """apply(grads, norm): clip the replica-summed gradients and apply each group's part,
    in cross-replica context.

    The apply cannot sit in a cond inside the replica function: Keras' apply
    synchronizes replicas with `merge_call`, which MirroredStrategy refuses
    inside control flow of the replica function.
    """
    def replica_apply(grads, norm):
        grads = clip_gradients(grads, clipvalue=clipvalue, clipnorm=clipnorm,
                               global_clipnorm=global_clipnorm, norm=norm)
        applied = with_grads()
        for name, group in groups.items():
            members = {id(v) for v in phase_variables[name]}
            pairs = [(g, v) for g, v in zip(grads, applied) if id(v) in members]
            group.apply([g for g, _ in pairs], [v for _, v in pairs])

    def apply(grads, norm):
        strategy.run(replica_apply, args=(grads, norm))
        return tf.constant(True)

    return apply


def holds_xla_function(concrete_function) -> bool:
    """Whether a traced train loop runs its forward/backward pass under XLA.

    What --jit_compile is checked by: the replica function, jit-compiled, is a
    library function (or call node) named after it with _XlaMustCompile. Other
    XLA functions do not count: the EMA update is XLA-compiled in every loop
    that averages (engine/ema.py).
    """
    def must(attrs):
        return "_XlaMustCompile" in attrs and attrs["_XlaMustCompile"].b

    def forward(name):
        return "replica_forward" in name

    graph = concrete_function.graph.as_graph_def()
    nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
    return any(must(f.attr) and forward(f.signature.name) for f in graph.library.function) or any(
        must(n.attr) and "f" in n.attr and forward(n.attr["f"].func.name) for n in nodes)


def make_eval_batch(*, model, loss_fn: Callable, strategy, local_replicas: int,
                    input_size: int, num_outputs: int, multiclass: bool):
    """Returns a tf.function (images, labels) -> (probabilities, per-example loss).

    Works on any batch size, including a short last batch: it is padded to a
    multiple of the local replica count, cut on the host into one part per
    replica (only its part reaches each device), and the padding is cut off
    again after gathering the replicas' outputs in replica order.
    Probabilities are made here, at the edge: the model and the loss only see
    logits.
    """
    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.float32),
            tf.TensorSpec([None, num_outputs], tf.float32))

    def replica_eval(images, labels):
        logits = model(images, training=False)
        probs = tf.nn.softmax(logits) if multiclass else tf.sigmoid(logits)
        return probs, loss_fn(labels, logits)

    @tf.function(input_signature=spec)
    def eval_batch(images, labels):
        n = tf.shape(images)[0]
        args = split_on_host(strategy, (images, labels), local_replicas)  # zero-padded
        probs, per_example = strategy.run(replica_eval, args=args)
        probs = strategy.gather(probs, axis=0)[:n]
        per_example = strategy.gather(per_example, axis=0)[:n]
        return probs, per_example

    return eval_batch


def make_segmentation_eval_batch(*, model, loss_fn: Callable, strategy, local_replicas: int,
                                 input_size: int, num_classes: int, one_hot: bool = False):
    """make_eval_batch for per-pixel logits: (images, masks) -> (ids, loss, stats).

    masks: int32 class ids [B, S, S], or one-hot float32 [B, S, S, C] with
    one_hot=True. Returns the argmax class ids [B, S, S] int32 (taken here, on
    the device, so only ids cross to the host), the loss [B], and per image
    the sums over pixels of the softmax probabilities and of their squares
    [B, 2, C] (what the collapse check needs). Short last batches are padded
    and cut as in make_eval_batch.
    """
    label_spec = (tf.TensorSpec([None, input_size, input_size, num_classes], tf.float32)
                  if one_hot else tf.TensorSpec([None, input_size, input_size], tf.int32))
    spec = (tf.TensorSpec([None, input_size, input_size, 3], tf.float32), label_spec)

    def replica_eval(images, labels):
        logits = model(images, training=False)
        probs = tf.nn.softmax(tf.cast(logits, tf.float32))
        stats = tf.stack([tf.reduce_sum(probs, axis=[1, 2]),
                          tf.reduce_sum(tf.square(probs), axis=[1, 2])], axis=1)
        return tf.argmax(logits, axis=-1, output_type=tf.int32), loss_fn(labels, logits), stats

    @tf.function(input_signature=spec)
    def eval_batch(images, labels):
        n = tf.shape(images)[0]
        args = split_on_host(strategy, (images, labels), local_replicas)  # zero-padded
        ids, per_example, stats = strategy.run(replica_eval, args=args)
        ids = strategy.gather(ids, axis=0)[:n]
        per_example = strategy.gather(per_example, axis=0)[:n]
        stats = strategy.gather(stats, axis=0)[:n]
        return ids, per_example, stats

    return eval_batch
