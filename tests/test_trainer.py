"""The trainer end to end on tiny_cnn: learning, the unfreeze switch, traces, resume, restore."""
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from engine import freeze
from engine.config import Config, ConfigError, DataConfig, FreezeConfig, ModelConfig, OptimizerConfig, TrainConfig
from engine.data.tfrecord import write_tfrecords
from engine.state import StateError
from engine.trainer import Trainer


def _config(tmp_path, cache, **train):
    t = dict(model_dir=str(tmp_path / "run"), epochs=2, batch_size=16, steps_per_epoch=6,
             steps_per_loop=4, progress=False)
    t.update(train)
    unfreeze_at = t.pop("unfreeze_at", 1)
    opt = t.pop("optimizer", OptimizerConfig(name="momentum", learning_rate=0.05))
    return Config(model=ModelConfig(backbone="tiny_cnn", input_size=32),
                  data=DataConfig(cache_dir=cache), optimizer=opt,
                  freeze=FreezeConfig(unfreeze_at=unfreeze_at), train=TrainConfig(**t))


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def test_loss_falls(tmp_path, embedded_cache):
    cfg = _config(tmp_path, embedded_cache, epochs=3, steps_per_epoch=12, unfreeze_at=0,
                  optimizer=OptimizerConfig(name="adam", learning_rate=0.003, schedule="constant"))
    trainer = Trainer(cfg)
    trainer.restore()
    trainer.enter_phase(freeze.UNFROZEN)
    first = trainer.run_epoch()["loss"]
    trainer.run_epoch()
    last = trainer.run_epoch()["loss"]
    assert last < 0.9 * first


def test_unfreeze_switch_keeps_head_slots_and_starts_backbone(tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache, epochs=3, unfreeze_at=2))
    trainer.restore()
    backbone = trainer.parts.model.get_layer("backbone")
    before = _values(backbone.weights)  # kernels, gamma/beta and BN moving statistics
    trainer.enter_phase(freeze.FROZEN)
    trainer.run_epoch()
    trainer.run_epoch()
    for a, b in zip(before, _values(backbone.weights)):
        np.testing.assert_array_equal(a, b)  # frozen epochs: bit-identical

    head_slots = {k: np.array(v.numpy()) for k, v in trainer.parts.groups["head"].slots.items()}
    assert any(np.any(v != 0) for v in head_slots.values())
    assert int(trainer.parts.groups["backbone"].optimizer.iterations.numpy()) == 0
    trainer.enter_phase(freeze.UNFROZEN)
    for k, v in trainer.parts.groups["head"].slots.items():
        np.testing.assert_array_equal(v.numpy(), head_slots[k])  # carried over unchanged
    for v in trainer.parts.groups["backbone"].slots.values():
        assert not np.any(v.numpy())  # fresh
    kernels = [v for v in backbone.trainable_variables if "kernel" in v.path]
    kernels_before = _values(kernels)
    trainer.run_epoch()
    assert all(not np.array_equal(a, b) for a, b in zip(kernels_before, _values(kernels)))
    assert int(trainer.parts.groups["backbone"].optimizer.iterations.numpy()) == 6
    assert int(trainer.parts.groups["head"].optimizer.iterations.numpy()) == 18


def test_one_trace_per_phase(tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache, epochs=4, unfreeze_at=2, steps_per_epoch=5))
    trainer.train()  # 5 steps per epoch at 4 per call: calls of 4 and 1 steps
    assert {p: t["count"] for p, t in trainer.phase_traces.items()} == {"frozen": 1, "unfrozen": 1}


def test_keras_optimizer_fails_at_unfreeze_where_the_engine_does_not(tmp_path, embedded_cache):
    from models import build_model
    model = build_model("tiny_cnn", 32, 13, seed=0)
    model.get_layer("backbone").trainable = False
    opt = keras.optimizers.SGD(0.01, momentum=0.9)
    x, y = tf.random.uniform([4, 32, 32, 3], 0, 255), tf.zeros([4, 13])

    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(y, model(x, training=True)))
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                model.trainable_variables))
    step()
    model.get_layer("backbone").trainable = True
    with pytest.raises(ValueError, match="Unknown variable"):
        step()
    # The engine, same model family and switch: no error, backbone trains.
    trainer = Trainer(_config(tmp_path, embedded_cache))
    trainer.restore()
    trainer.enter_phase(freeze.FROZEN)
    trainer.run_epoch()
    trainer.enter_phase(freeze.UNFROZEN)
    trainer.run_epoch()
    assert int(trainer.parts.groups["backbone"].optimizer.iterations.numpy()) == 6


def _checkpoints(model_dir):
    state = tf.train.get_checkpoint_state(os.path.join(model_dir, "checkpoints"))
    return list(state.all_model_checkpoint_paths)


def _keep_only(model_dir, keep):
    """Makes the model_dir look as if the run had died right after `keep` was written."""
    directory = os.path.join(model_dir, "checkpoints")
    tf.compat.v1.train.update_checkpoint_state(directory, keep, all_model_checkpoint_paths=[keep])


_RESUME = dict(epochs=3, unfreeze_at=2, checkpoint_every_steps=2, keep_checkpoints=20,
               deterministic=True)


# Two replicas (2 virtual CPUs, tests/conftest.py), each fed its own slice of the batch.
_TWO_REPLICAS = dict(strategy="mirrored", num_virtual_cpus=2)


@pytest.fixture(scope="module", params=[{}, _TWO_REPLICAS], ids=["1-replica", "2-replicas"])
def uninterrupted_run(embedded_cache, tmp_path_factory, request):
    """One deterministic run kept whole: its final state and every checkpoint it wrote."""
    root = tmp_path_factory.mktemp("uninterrupted")
    full = Trainer(_config(root, embedded_cache, **_RESUME, **request.param))
    full.train()
    return full.parts.model_dir, full.parts.state.values(), request.param


@pytest.mark.parametrize("stop_step", [4, 12, 14], ids=["mid-epoch-1-frozen", "end-of-unfreeze-epoch", "mid-unfrozen"])
def test_resume_is_bit_identical_under_determinism(tmp_path, embedded_cache, uninterrupted_run,
                                                   stop_step):
    full_dir, expected, replicas = uninterrupted_run
    # The same run, as if it had died right after writing ckpt-<stop_step>.
    shutil.copytree(full_dir, tmp_path / "run")
    model_dir = str(tmp_path / "run")
    keep = next(p for p in _checkpoints(model_dir) if p.endswith(f"ckpt-{stop_step}"))
    _keep_only(model_dir, keep)
    resumed = Trainer(_config(tmp_path, embedded_cache, **_RESUME, **replicas))
    line = resumed.restore()
    assert line.startswith("resumed")
    assert int(resumed.parts.counters.global_step.numpy()) == stop_step
    resumed.train()
    got = resumed.parts.state.values()
    assert set(got) == set(expected)
    for key in expected:
        if key == "train/best_metric":
            continue
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


# Gradual unfreezing: frozen (epoch 1), the top block (epoch 2), all (epoch 3), with
# layer-wise LR decay (one Adam per block) and EMA, checkpoints every 2 of 4 steps.
_GRADUAL = dict(epochs=3, unfreeze_at=0, steps_per_epoch=4, checkpoint_every_steps=2,
                keep_checkpoints=20, deterministic=True, ema_decay=0.9, eval_with_ema=False,
                summary_every=0,
                optimizer=OptimizerConfig(name="adam", learning_rate=0.01, layer_lr_decay=0.5))


def _gradual_config(tmp_path, cache):
    return _config(tmp_path, cache, **_GRADUAL).replace(
        freeze={"unfreeze_schedule": "1:blocks:1,2:all"})


@pytest.fixture(scope="module")
def gradual_run(embedded_cache, tmp_path_factory):
    """The three-phase run kept whole, with its log lines."""
    full = Trainer(_gradual_config(tmp_path_factory.mktemp("gradual"), embedded_cache))
    lines = []
    full.parts.log.listeners.append(lines.append)
    full.train()
    return full, lines


def test_gradual_unfreezing_traces_once_per_phase_and_trains_each_block_from_its_phase(
        gradual_run):
    full, lines = gradual_run
    assert {p: t["count"] for p, t in full.phase_traces.items()} == {
        "frozen": 1, "blocks:1": 1, "all": 1}
    # head 2 variables; block4: conv kernel, BN gamma and beta; all four blocks: 12.
    for text in ("phase: frozen (2 trainable", "phase: blocks:1 (5 trainable",
                 "phase: all (14 trainable"):
        assert any(l.startswith(text) for l in lines), text
    steps = {n: int(g.optimizer.iterations.numpy()) for n, g in full.parts.groups.items()}
    assert steps == {"backbone_00": 4, "backbone_01": 4, "backbone_02": 4, "backbone_03": 8,
                     "head": 12}
    assert {n: g.lr_multiplier for n, g in full.parts.groups.items()} == {
        "backbone_00": 0.125, "backbone_01": 0.25, "backbone_02": 0.5, "backbone_03": 1.0,
        "head": 1.0}
    assert int(full.parts.counters.unfrozen.numpy()) == 2  # the phase index


class _Died(Exception):
    """Stands for a kill -9 right after a checkpoint was written."""


def _dies_after_saving(trainer, step):
    def die():
        if int(trainer.parts.counters.global_step.numpy()) == step:
            raise _Died(step)

    trainer.checkpointer.after_rolling_save.append(die)  # runs once the save is written


def _saved(path):
    reader = tf.train.load_checkpoint(path)
    suffix = "/.ATTRIBUTES/VARIABLE_VALUE"
    return {k[:-len(suffix)]: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.endswith(suffix) and not k.startswith(("train/best_metric", "save_counter"))}


def test_gradual_resume_is_bit_identical_when_stopped_in_every_phase_and_at_a_switch(
        tmp_path, embedded_cache, gradual_run):
    """One run dies at step 2 (frozen), then its resumes die at 6 (blocks:1), 8 (the
    switch to all: the resume crosses it), 10 (all), and the last one finishes; each
    checkpoint and the end state equal the uninterrupted run's, tensor for tensor."""
    full, _ = gradual_run
    shutil.copytree(full.parts.model_dir, tmp_path / "run")
    model_dir = str(tmp_path / "run")
    _keep_only(model_dir, next(p for p in _checkpoints(model_dir) if p.endswith("ckpt-2")))
    for stop, phases in ((6, {"frozen", "blocks:1"}), (8, {"blocks:1"}), (10, {"all"}),
                         (None, {"all"})):
        resumed = Trainer(_gradual_config(tmp_path, embedded_cache))
        if stop is None:
            resumed.train()
            got, expected = resumed.parts.state.values(), full.parts.state.values()
            expected.pop("train/best_metric"), got.pop("train/best_metric")
        else:
            _dies_after_saving(resumed, stop)
            with pytest.raises(_Died):
                resumed.train()
            got = _saved(os.path.join(model_dir, "checkpoints", f"ckpt-{stop}"))
            expected = _saved(os.path.join(full.parts.model_dir, "checkpoints", f"ckpt-{stop}"))
        assert {p: t["count"] for p, t in resumed.phase_traces.items()} == dict.fromkeys(phases, 1)
        assert set(got) == set(expected)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=f"{stop} {key}")


def test_resume_at_a_switch_restarts_the_ema_of_what_starts_changing_only(
        tmp_path, embedded_cache):
    """Block 4 trains, freezes, trains again: its average restarts at the third phase.

    A resumed run whose checkpoint was saved in the phase before does what the
    uninterrupted run did at the switch; one saved inside the phase changes nothing.
    """
    cfg = _config(tmp_path, embedded_cache, epochs=4, unfreeze_at=0, ema_decay=0.9).replace(
        freeze={"unfreeze_schedule": "1:regex:^block4,2:regex:^block3,3:all"})
    for saved_in, restarted in ((2, ("block1", "block2", "block4")), (3, ())):
        trainer = Trainer(cfg)
        trainer.restore()
        # as restored from a checkpoint of that phase
        trainer.parts.counters.unfrozen.assign(saved_in)
        for shadow, weight in zip(trainer.parts.ema.shadows, trainer.parts.ema.weights):
            shadow.assign(weight + 1.0)  # averages away from the weights
        trainer.enter_phase("all")
        shadows = {k: v for k, v in trainer.parts.ema.state().items() if k != "_num_updates"}
        for (key, shadow), weight in zip(shadows.items(), trainer.parts.ema.weights):
            block = key.split("/")[1].split("_")[0]
            want = weight.numpy() if block in restarted else weight.numpy() + 1.0
            np.testing.assert_array_equal(shadow.numpy(), want, err_msg=f"{saved_in} {key}")
        assert int(trainer.parts.counters.unfrozen.numpy()) == 3


@pytest.fixture(scope="module")
def one_epoch_runs(embedded_cache, tmp_path_factory):
    """unfreeze_at -> (model_dir, state values) of a run trained one epoch, made on first use;
    a test restores a copy of its own."""
    runs = {}

    def get(unfreeze_at):
        if unfreeze_at not in runs:
            first = Trainer(_config(tmp_path_factory.mktemp(f"first{unfreeze_at}"), embedded_cache,
                                    epochs=1, unfreeze_at=unfreeze_at))
            first.train()
            runs[unfreeze_at] = first.parts.model_dir, first.parts.state.values()
        return runs[unfreeze_at]
    return get


@pytest.mark.parametrize("first_unfreeze,second_unfreeze", [(5, 5), (5, 0), (0, 0), (0, 5)],
                         ids=["frozen->frozen", "frozen->unfrozen", "unfrozen->unfrozen", "unfrozen->frozen"])
def test_restore_in_all_four_directions(tmp_path, embedded_cache, one_epoch_runs, first_unfreeze,
                                        second_unfreeze):
    # The first run (one epoch, frozen throughout or unfrozen from the start): trained once
    # for both directions out of it; this test resumes a copy.
    first_dir, saved = one_epoch_runs(first_unfreeze)
    shutil.copytree(first_dir, tmp_path / "run")
    second = Trainer(_config(tmp_path, embedded_cache, epochs=2, unfreeze_at=second_unfreeze))
    line = second.restore()
    assert "missing" not in line and "wrong shape" not in line
    got = second.parts.state.values()
    assert set(got) == set(saved)
    for key in saved:
        np.testing.assert_array_equal(got[key], saved[key], err_msg=key)
    second.train()  # and it goes on in the new phase
    assert int(second.parts.counters.epoch.numpy()) == 2


def _five_label_data(data_dir, names: int):
    """TFRecords whose 40 records carry labels 0-4, and a labels.txt naming `names` labels."""
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(40, 32, 32, 3), dtype=np.uint8)
    labels = [[int(i % 5)] for i in range(40)]
    write_tfrecords(str(data_dir / "train"), images[:32], labels[:32])
    write_tfrecords(str(data_dir / "val"), images[32:], labels[32:])
    (data_dir / "labels.txt").write_text("\n".join(f"l{i}" for i in range(names)) + "\n")
    return data_dir


def test_head_change_warm_start_restores_backbone_and_reports_head(tmp_path, embedded_cache):
    first = Trainer(_config(tmp_path / "a", embedded_cache, epochs=1))
    first.train()
    data_dir = _five_label_data(tmp_path / "five", names=5)
    cfg = _config(tmp_path / "b", embedded_cache, epochs=1, init_checkpoint=first.parts.model_dir)
    cfg = cfg.replace(data={"data_dir": str(data_dir)})
    second = Trainer(cfg)
    line = second.restore()
    assert "warm start" in line and "2 wrong shape" in line and "head/logits/kernel" in line
    for a, b in zip(first.parts.model.get_layer("backbone").weights,
                    second.parts.model.get_layer("backbone").weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_resume_into_another_model_stops_with_a_clear_error(tmp_path, embedded_cache):
    Trainer(_config(tmp_path, embedded_cache, epochs=1)).train()
    cfg = _config(tmp_path, embedded_cache, epochs=2).replace(model={"backbone": "mobilenetv2"})
    with pytest.raises(ConfigError, match="--backbone changed from tiny_cnn to mobilenetv2.*"
                                          "use another --model_dir"):
        Trainer(cfg).restore()
    os.remove(tmp_path / "run" / "manifest.json")  # a run of an older tapeworks: the tensors tell
    with pytest.raises(StateError, match="does not fit this model.*--allow_partial_restore"):
        Trainer(cfg).restore()


def test_truncated_newest_checkpoint_falls_back_with_a_warning(tmp_path, embedded_cache):
    trainer = Trainer(_config(tmp_path, embedded_cache, epochs=2))
    trainer.train()
    newest = _checkpoints(trainer.parts.model_dir)[-1]
    data = [f for f in os.listdir(os.path.dirname(newest))
            if f.startswith(os.path.basename(newest) + ".data")][0]
    path = os.path.join(os.path.dirname(newest), data)
    with open(path, "r+b") as f:
        f.truncate(16)
    again = Trainer(_config(tmp_path, embedded_cache, epochs=2))
    line = again.restore()
    assert "WARNING" in line and "unreadable" in line and line.rstrip().count("resumed") == 1
    assert int(again.parts.counters.epoch.numpy()) == 1


def test_warm_start_from_a_keras_weights_file(tmp_path, embedded_cache):
    first = Trainer(_config(tmp_path / "a", embedded_cache, epochs=1))
    first.train()
    path = str(tmp_path / "model.weights.h5")
    first.parts.model.save_weights(path)
    second = Trainer(_config(tmp_path / "b", embedded_cache, epochs=1, init_checkpoint=path))
    assert "warm start: restored 22 of 22 model tensors" in second.restore()
    for a, b in zip(first.parts.model.weights, second.parts.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_shadows_start_from_the_weights_the_run_starts_from(tmp_path, embedded_cache, warmup):
    """The prior head bias is set after the EMA is built: its shadow must start there too."""
    cfg = _config(tmp_path, embedded_cache, epochs=1, steps_per_epoch=1, steps_per_loop=1,
                  unfreeze_at=0, ema_decay=0.5, ema_warmup=warmup, summary_every=0)
    trainer = Trainer(cfg)
    trainer.restore()
    bias = trainer.parts.model.get_layer("head").get_layer("logits").bias
    shadow = trainer.parts.ema.state()["head/logits/bias"]
    w0 = bias.numpy().copy()
    assert np.abs(w0).max() > 0.5  # logit(prevalence): far from the zeros it was built with
    np.testing.assert_array_equal(shadow.numpy(), w0)
    trainer.train()  # one step; a fresh start again sets the same prior
    d = min(0.5, 1 / 10) if warmup else 0.5
    np.testing.assert_allclose(shadow.numpy(), d * w0 + (1 - d) * bias.numpy(), rtol=1e-6)


def test_resume_with_changed_settings_says_what_changed_and_refuses_what_changes_meaning(
        tmp_path, embedded_cache):
    adam = OptimizerConfig(name="adam", learning_rate=0.01)
    first = Trainer(_config(tmp_path, embedded_cache, epochs=1, optimizer=adam))
    first.train()
    saved = first.parts.state.values()
    momentum = OptimizerConfig(name="momentum", learning_rate=0.01)
    with pytest.raises(ConfigError, match=r"--optimizer adam -> momentum.*--allow_changed=optimizer"):
        Trainer(_config(tmp_path, embedded_cache, epochs=2, optimizer=momentum)).restore()
    with pytest.raises(ConfigError, match=r"--input_size 32 -> 48"):
        Trainer(_config(tmp_path, embedded_cache, epochs=2, optimizer=adam)
                .replace(model={"input_size": 48})).restore()
    # Allowed: momentum buffers start at zero (not Adam's moments), EMA shadows at the weights.
    second = Trainer(_config(tmp_path, embedded_cache, epochs=2, optimizer=momentum, ema_decay=0.9,
                             allow_changed=("optimizer",))
                     .replace(freeze={"unfreeze_at": 1, "unfreeze_layers": "blocks:1"}))
    line = second.restore()
    assert "--optimizer: adam -> momentum (allowed: optimizer slots" in line
    assert "--unfreeze_layers: all -> blocks:1" in line and "--ema_decay: 0.0 -> 0.9" in line
    assert "EMA:" in line and "start from the restored weights" in line
    for group in second.parts.groups.values():
        assert group.slots and all(not np.any(v.numpy()) for v in group.slots.values())
    for key, shadow in second.parts.ema.state().items():
        if key != "_num_updates":
            np.testing.assert_array_equal(shadow.numpy(), saved["model/" + key])


def test_a_run_from_before_the_manifest_reads_its_slots_only_for_the_same_optimizer(
        tmp_path, embedded_cache):
    from engine.state import TrainingState, existing_checkpoints
    first = Trainer(_config(tmp_path, embedded_cache, epochs=1))  # momentum
    first.train()
    saved = first.parts.state.values()
    os.remove(tmp_path / "run" / "manifest.json")
    legacy = TrainingState()  # the old naming: optimizer/<group>/<variable key>/<slot>
    for key, value in saved.items():
        legacy.add(key.replace("/momentum/", "/", 1) if key.startswith("optimizer/") else key,
                   tf.Variable(value))
    legacy.checkpoint().write(existing_checkpoints(str(tmp_path / "run" / "checkpoints"))[0])
    (tmp_path / "run" / "flags.txt").write_text("--optimizer=momentum\n")
    again = Trainer(_config(tmp_path, embedded_cache, epochs=2))
    line = again.restore()
    assert "has no manifest.json" in line
    for key, value in saved.items():
        np.testing.assert_array_equal(again.parts.state[key].numpy(), value)
    (tmp_path / "run" / "flags.txt").write_text("--optimizer=adam\n")
    other = Trainer(_config(tmp_path, embedded_cache, epochs=2))
    assert "optimizer slots start fresh" in other.restore()
    assert not any(np.any(v.numpy()) for v in other.parts.groups["head"].slots.values())


def test_labels_that_no_training_record_carries_are_named(tmp_path, embedded_cache, capsys):
    data_dir = _five_label_data(tmp_path / "data", names=7)  # l5, l6: in no record
    cfg = _config(tmp_path, embedded_cache, epochs=1, steps_per_epoch=1, unfreeze_at=0)
    Trainer(cfg.replace(data={"data_dir": str(data_dir)})).train()
    out = capsys.readouterr().out
    assert "WARNING: 2 labels have no positive example in the training split (l5, l6)" in out
