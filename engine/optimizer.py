"""Optimizers and learning-rate schedules, one optimizer per parameter group.

Why groups, built up front: a Keras 3 optimizer is built once for a fixed
variable list and raises "Unknown variable" when a thawed layer shows up
later. Each group (the head, the backbone) gets its own optimizer, built
eagerly under the strategy scope on every variable the group can EVER train,
and each step applies gradients to the subset that trains in the current
phase (Keras accepts a subset of the built list). So at the unfreeze switch
nothing is rebuilt: head slots carry over untouched, backbone slots are
still at their fresh initial values, and there is no error to hide.

A group's own `iterations` counts only the steps it was applied, so Adam's
bias correction for the backbone starts at step 1 when it thaws instead of
treating its empty moments as thousands of steps old. The learning rate is
a callable of the run's global step, so the schedule continues across the
switch; the backbone group multiplies it by backbone_lr_multiplier.

Gradual unfreezing and layer-wise LR decay split the backbone into one
group per block ("backbone_00" the stem, ...; freeze.per_block_groups):
each block then has its own learning rate (x layer_lr_decay^k, k blocks
below the top) and its own step count, which starts when that block thaws.

Gradients arrive already summed over replicas and clipped (steps.py); the
Keras TF optimizer would all-reduce them again inside `apply`, so each
optimizer's `_all_reduce_sum_gradients` is replaced with the identity.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import keras
import tensorflow as tf

from engine.config import OptimizerConfig
from engine.variables import as_tf_variable


class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup from lr/warmup_steps to the base schedule's value."""

    def __init__(self, base, warmup_steps: int):
        self.base = base
        self.warmup_steps = int(warmup_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        lr = self.base(step) if callable(self.base) else tf.constant(self.base, tf.float32)
        if self.warmup_steps <= 0:
            return lr
        return lr * tf.minimum(1.0, (step + 1.0) / float(self.warmup_steps))

    def get_config(self):
        return {"warmup_steps": self.warmup_steps}


def make_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int,
                  unfreeze_at: int = 0):
    """The run's learning rate as a function of the global step.

    unfreeze_at: the first unfrozen epoch. With cfg.restart_at_unfreeze,
    0 < unfreeze_at < epochs and a constant or cosine schedule, the frozen
    epochs follow the run-long schedule and fine-tuning starts it again from
    the peak (warmup included) over the epochs left (a warm restart). One
    schedule over the run leaves fine-tuning only its tail (12 epochs
    unfrozen at 5: 6e-4 down to 0 for a peak of 1e-3), too little for a
    backbone that starts from random weights; two complete schedules would
    anneal the head to 0 before it is needed again, which cost the frozen
    phase 0.016 val AUC (BUILD_NOTES.md, "The README run's recipe"). The
    step schedule's --lr_step_epochs count epochs of the run: no restart.
    """
    if cfg.restart_at_unfreeze and 0 < unfreeze_at < epochs and cfg.schedule != "step":
        return _Restarted(_one_schedule(cfg, steps_per_epoch, epochs),
                          _one_schedule(cfg, steps_per_epoch, epochs - unfreeze_at),
                          unfreeze_at * steps_per_epoch)
    return _one_schedule(cfg, steps_per_epoch, epochs)


class _Restarted(keras.optimizers.schedules.LearningRateSchedule):
    """first(step) before `boundary`, second(step - boundary) from it on."""

    def __init__(self, first, second, boundary: int):
        self.first, self.second, self.boundary = first, second, int(boundary)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        return tf.where(step < self.boundary, self.first(step),
                        self.second(tf.maximum(step - self.boundary, 0.0)))

    def get_config(self):
        return {"boundary": self.boundary}


def _one_schedule(cfg: OptimizerConfig, steps_per_epoch: int, epochs: int):
    """Warmup, then constant, cosine or step decay over `epochs`."""
    total = max(1, steps_per_epoch * epochs)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "constant":
        base = cfg.learning_rate
    elif cfg.schedule == "cosine":
        base = keras.optimizers.schedules.CosineDecay(
            cfg.learning_rate, decay_steps=max(1, total - warmup))
        base = _Shifted(base, warmup)
    else:  # step
        boundaries = [e * steps_per_epoch for e in cfg.lr_step_epochs]
        values = [cfg.learning_rate * cfg.lr_step_factor ** i for i in range(len(boundaries) + 1)]
        base = keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    return WarmupSchedule(base, warmup)


class _Shifted(keras.optimizers.schedules.LearningRateSchedule):
    """Starts a decay after warmup, so warmup + decay span the run."""

    def __init__(self, base, shift: int):
        self.base, self.shift = base, shift

    def __call__(self, step):
        return self.base(tf.maximum(tf.cast(step, tf.float32) - self.shift, 0.0))

    def get_config(self):
        return {"shift": self.shift}


def _handle(variable):
    """The resource handle of a Keras or TF variable (under a strategy update: this device's)."""
    return as_tf_variable(variable).handle


class FusedAdam(keras.optimizers.Adam):
    """Keras Adam whose per-variable update is TensorFlow's fused ResourceApplyAdam kernel.

    Keras 3 writes the update as ~10 separate element-wise ops per variable
    (each a pass over the weights); the kernel computes the same formula,
    m += (g - m)(1 - b1), v += (g^2 - v)(1 - b2), var -= m alpha / (sqrt(v) + eps)
    with alpha = lr sqrt(1 - b2^t) / (1 - b1^t), in one pass. Same slots, same
    names, same checkpoints; Keras still does everything around the update
    (learning rate, weight decay, iterations, distribution).
    """

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad:
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]), beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, dtype), beta1=beta_1,
            beta2=beta_2, epsilon=tf.cast(self.epsilon, dtype), grad=tf.cast(gradient, dtype))


class FusedAdamW(keras.optimizers.AdamW):
    """AdamW with FusedAdam's update (Keras applies the decoupled weight decay before it)."""

    update_step = FusedAdam.update_step


class FusedSGD(keras.optimizers.SGD):
    """Keras SGD (with or without momentum) on TensorFlow's fused kernels.

    ResourceApplyKerasMomentum is Keras' own formula: m = m momentum - lr g,
    var += m (nesterov: var += m momentum - lr g).
    """

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        lr, grad = tf.cast(learning_rate, dtype), tf.cast(gradient, dtype)
        if self.momentum == 0:
            tf.raw_ops.ResourceApplyGradientDescent(var=_handle(variable), alpha=lr, delta=grad)
            return
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]),
            lr=lr, grad=grad, momentum=tf.cast(self.momentum, dtype), use_nesterov=self.nesterov)


def make_keras_optimizer(cfg: OptimizerConfig, learning_rate: Callable, name: str,
                          fused: bool = True):
    """The configured optimizer; fused: the Fused* subclasses (same math, fewer passes)."""
    common = dict(learning_rate=learning_rate, name=name)
    if cfg.weight_decay:
        common["weight_decay"] = cfg.weight_decay
    sgd, adam, adamw = ((FusedSGD, FusedAdam, FusedAdamW) if fused else
                        (keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW))
    if cfg.name == "sgd":
        return sgd(**common)
    if cfg.name == "momentum":
        return sgd(momentum=cfg.momentum, **common)
    if cfg.name == "adam":
        return adam(**common)
    if cfg.name == "adamw":
        common.setdefault("weight_decay", 0.004)
        return adamw(**common)
    return keras.optimizers.RMSprop(momentum=cfg.momentum, **common)


class ParamGroup:
    """One Keras optimizer over the variables a group may ever train.

    slots maps "<kind>/<variable key>/<slot name>" -> slot variable, recorded
    by a hook on `add_variable_from_reference`, the one method every built-in
    Keras optimizer uses to create per-variable state. The kind (adam,
    momentum, ...) is part of every key, iterations included: Adam's first
    moment and SGD's momentum buffer are both named "momentum" by Keras, and
    without the kind a resume with another --optimizer would read one into
    the other.
    """

    def __init__(self, name: str, optimizer, variables: Sequence, keys: Dict[int, str],
                 kind: str, lr_multiplier: float = 1.0):
        self.name = name
        self.kind = kind
        self.lr_multiplier = lr_multiplier  # over the run's schedule (group_lr_multiplier)
        self.optimizer = optimizer
        self.variables = list(variables)
        self.slots: Dict[str, object] = {}
        self._record_slots(keys)
        optimizer.build(self.variables)
        optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)
        self._check_all_state_named()

    def _record_slots(self, keys):
        original = self.optimizer.add_variable_from_reference

        def add_variable_from_reference(reference_variable, name=None, initializer="zeros"):
            slot = original(reference_variable, name=name, initializer=initializer)
            self.slots[f"{self.kind}/{keys[id(reference_variable)]}/{name or 'var'}"] = slot
            return slot

        self.optimizer.add_variable_from_reference = add_variable_from_reference

    def _check_all_state_named(self):
        named = {id(v) for v in self.slots.values()} | {id(self.optimizer.iterations)}
        unnamed = [v.name for v in self.optimizer.variables if id(v) not in named]
        if unnamed:
            raise RuntimeError(f"optimizer {self.name} has state the engine cannot name: {unnamed}")

    def state(self) -> Dict[str, object]:
        """Key -> variable for the checkpoint: slots by their variable's key."""
        return {f"{self.kind}/iterations": self.optimizer.iterations, **self.slots}

    def apply(self, grads: List[tf.Tensor], variables: List) -> None:
        if variables:
            self.optimizer.apply(grads, variables)


def make_param_groups(cfg: OptimizerConfig, groups: Dict[str, Sequence], keys: Dict[int, str],
                      schedule, global_step: tf.Variable, lr_scale: tf.Variable,
                      block_depths: Optional[Dict[str, int]] = None) -> Dict[str, ParamGroup]:
    """Builds one ParamGroup per non-empty group. Call under strategy.scope().

    block_depths: backbone block group -> its distance from the top block
    (freeze.block_depths), for layer-wise LR decay; see group_lr_multiplier.
    """
    out = {}
    for name, variables in groups.items():
        if not variables:
            continue
        multiplier = group_lr_multiplier(cfg, name, block_depths)

        def learning_rate(multiplier=multiplier):
            return schedule(global_step) * lr_scale * multiplier

        opt = make_keras_optimizer(cfg, learning_rate, name=f"{name}_optimizer")
        out[name] = ParamGroup(name, opt, variables, keys, kind=cfg.name, lr_multiplier=multiplier)
    return out


def group_lr_multiplier(cfg: OptimizerConfig, name: str,
                        block_depths: Optional[Dict[str, int]] = None) -> float:
    """A group's learning rate over the schedule's.

    head: 1; "backbone": backbone_lr_multiplier; a backbone block k blocks
    below the top one: backbone_lr_multiplier x layer_lr_decay^k, so lower
    (more generic) blocks move less. A separate optimizer per block, not a
    gradient scale: Adam divides by the gradient's own scale, so scaling the
    gradient would leave its step unchanged.
    """
    if block_depths and name in block_depths:
        return cfg.backbone_lr_multiplier * cfg.layer_lr_decay ** block_depths[name]
    return cfg.backbone_lr_multiplier if name == "backbone" else 1.0


def clip_by_global_norm(grads: List[tf.Tensor], clipnorm: float):
    """Clips the already replica-summed gradients; returns (grads, norm)."""
    norm = tf.linalg.global_norm(grads)
    if clipnorm and clipnorm > 0:
        grads, _ = tf.clip_by_global_norm(grads, clipnorm, use_norm=norm)
    return grads, norm


def clip_gradients(grads: List[tf.Tensor], *, clipvalue: float = 0.0, clipnorm: float = 0.0,
                   global_clipnorm: float = 0.0, norm=None) -> List[tf.Tensor]:
    """Clips the already replica-summed gradients, in the order value, norm, global norm.

    clipvalue: each element into [-clipvalue, clipvalue]; clipnorm: each
    variable's gradient to at most that L2 norm; global_clipnorm: all of them
    together to at most that global norm (Keras' meanings; unlike Keras, any
    combination is allowed and applied in this order). `norm` is the global
    norm of `grads` when the caller has it already (only used when nothing
    before the global clip changed the gradients). 0 turns a clip off.
    """
    grads = list(grads)
    if clipvalue and clipvalue > 0:
        grads = [tf.clip_by_value(g, -clipvalue, clipvalue) for g in grads]
        norm = None
    if clipnorm and clipnorm > 0:
        grads = [tf.clip_by_norm(g, clipnorm) for g in grads]
        norm = None
    if global_clipnorm and global_clipnorm > 0:
        if norm is None:
            norm = tf.linalg.global_norm(grads)
        grads, _ = tf.clip_by_global_norm(grads, global_clipnorm, use_norm=norm)
    return grads
