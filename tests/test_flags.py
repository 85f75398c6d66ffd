"""Flags -> Config mapping and the one-line errors it raises."""
import pytest
from absl import flags

from engine import flags as engine_flags
from engine.config import Config, ConfigError

FLAGS = flags.FLAGS




def test_flags_map_to_config_groups(parse):
    c = parse("--backbone=inceptionv3", "--unfreeze_at=5", "--batch_size=16", "--optimizer=adamw",
              "--lr_schedule=step", "--lr_step_epochs=3,6", "--unfreeze_layers=blocks:2",
              "--backbone_lr_multiplier=0.1", "--ema_decay=0.999", "--init_include=model/backbone/*",
              "--data_dir=/data", "--weights=")
    assert c.model.backbone == "inceptionv3" and c.model.weights is None
    assert c.freeze.unfreeze_at == 5 and c.freeze.unfreeze_layers == "blocks:2"
    assert c.train.batch_size == 16 and c.train.ema_decay == 0.999
    assert c.optimizer.name == "adamw" and c.optimizer.lr_step_epochs == (3, 6)
    assert c.optimizer.backbone_lr_multiplier == 0.1
    assert c.train.init_include == ("model/backbone/*",)
    assert c.data.data_dir == "/data"


def test_schedule_and_layer_lr_decay_flags(parse):
    c = parse("--unfreeze_schedule=3:blocks:2,6:regex:^block[23],9:all", "--layer_lr_decay=0.7")
    assert c.freeze.unfreeze_schedule == "3:blocks:2,6:regex:^block[23],9:all"
    assert c.optimizer.layer_lr_decay == 0.7
    with pytest.raises(ConfigError, match=r"^--layer_lr_decay=0.0 must be in \(0, 1\]$"):
        parse("--layer_lr_decay=0")
    with pytest.raises(ConfigError, match="^--unfreeze_schedule replaces --unfreeze_at"):
        parse("--unfreeze_schedule=3:all", "--unfreeze_at=2")


def test_defaults_equal_the_dataclass_defaults(parse):
    c = parse()
    d = Config()
    assert c.train == d.train and c.optimizer == d.optimizer and c.freeze == d.freeze


@pytest.mark.parametrize("args,match", [
    (["--backbone=vgg"], r"--backbone=vgg is not one of inceptionv3"),
    (["--optimizer=lamb"], r"--optimizer=lamb is not one of"),
    (["--batch_size=0"], r"--batch_size=0 must be >= 1"),
    (["--unfreeze_layers=some"], r"--unfreeze_layers=some must be all, blocks:K or regex:PATTERN"),
    (["--lr_schedule=step"], r"--lr_schedule=step needs --lr_step_epochs"),
    (["--lr_step_epochs=a,b"], r"--lr_step_epochs=a,b must be a comma list"),
    (["--ema_decay=1.5"], r"--ema_decay=1.5 must be in \[0, 1\)"),
    (["--num_virtual_cpus=2"], r"--num_virtual_cpus needs --strategy=mirrored"),
    (["--threshold_objective=macro"], r"--threshold_objective=macro is not one of samples, per_label"),
    (["--export_from="], r"--export_from is empty"),
])
def test_bad_values_name_the_flag(parse, args, match):
    with pytest.raises(ConfigError, match=match):
        parse(*args)


def test_effective_flags_round_trip_through_a_flagfile(parse, tmp_path):
    parse("--backbone=resnet50", "--epochs=7", "--lr_step_epochs=2,4")
    path = tmp_path / "flags.txt"
    path.write_text(engine_flags.effective_flags(FLAGS))
    c = parse(f"--flagfile={path}")
    assert c.model.backbone == "resnet50" and c.train.epochs == 7
    assert c.optimizer.lr_step_epochs == (2, 4)


def test_flags_txt_never_fixes_mode(parse, tmp_path):
    """`--mode=export --flagfile=RUN/flags.txt` exports (DESIGN.md), whatever mode wrote it."""
    parse("--mode=train", "--export_from=latest", "--threshold_objective=samples")
    path = tmp_path / "flags.txt"
    path.write_text(engine_flags.effective_flags(FLAGS))
    assert not [l for l in path.read_text().splitlines() if l.startswith("--mode=")]
    c = parse("--mode=export", "--export_from=latest", f"--flagfile={path}")
    assert FLAGS.mode == "export"  # neither is fixed by the file; the run's settings are
    assert c.train.export_from == "latest" and c.train.threshold_objective == "samples"


def test_benchmark_aliases_set_the_benchmark_flags_and_stay_out_of_flags_txt(parse):
    c = parse("--mode=benchmark", "--compare=keras_fit", "--input=real")
    assert c.benchmark.compare == "keras_fit" and c.benchmark.input == "real"
    text = engine_flags.effective_flags(FLAGS)
    assert "\n--compare=" not in text and "\n--input=" not in text
    assert "--benchmark_" not in text  # action settings: a flagfile must not override them


def test_flags_txt_never_fixes_the_mode_or_other_action_flags(parse):
    """absl lets the later value win: a saved --mode=train would turn `--mode=eval --flagfile=`
    into a training run."""
    parse("--mode=eval", "--allow_changed=optimizer", "--export_raw")
    text = engine_flags.effective_flags(FLAGS)
    for name in ("mode", "allow_changed", "export_raw", "noexport_raw"):
        assert f"--{name}=" not in text and f"--{name}\n" not in text
    assert "--backbone=" in text


def test_predict_flags_map_to_config_and_stay_out_of_flags_txt(parse):
    """--mode=predict --flagfile=RUN/flags.txt must not predict the last run's images again."""
    c = parse("--mode=predict", "--predict_input=test-jpg", "--predict_output=sub.csv",
              "--predict_model=runs/x/export/5")
    assert (c.predict.input, c.predict.output, c.predict.model) == (
        "test-jpg", "sub.csv", "runs/x/export/5")
    text = engine_flags.effective_flags(FLAGS)
    assert "--predict_" not in text and "test-jpg" not in text


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_learning_rate_must_be_finite_and_positive(parse, value):
    with pytest.raises(ConfigError, match=f"--learning_rate={value}.* must be a finite number > 0"):
        parse(f"--learning_rate={value}")


def test_mode_and_overwrite_stay_out_of_flags_txt(parse, tmp_path):
    """They say what one command asks for: `--mode=eval --flagfile=RUN/flags.txt` evaluates,
    and a run repeated from its flags.txt never moves anything aside."""
    c = parse("--overwrite", "--epochs=3")
    assert c.train.overwrite
    path = tmp_path / "flags.txt"
    path.write_text(engine_flags.effective_flags(FLAGS))
    assert "--mode=" not in path.read_text() and "overwrite" not in path.read_text()
    c = parse("--mode=eval", f"--flagfile={path}")
    assert FLAGS.mode == "eval" and not c.train.overwrite and c.train.epochs == 3
