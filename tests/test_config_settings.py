"""Each setting is declared once (config.setting): its flag, default, help and checks."""
import os
import subprocess
import sys
import typing

import pytest
from absl import flags

from engine import flags as engine_flags
from engine.config import Config, ConfigError, specs

FLAGS = flags.FLAGS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))




def test_every_field_has_a_flag_and_every_flag_a_field():
    """The documented exceptions: NOT_FIELDS (--mode) and the aliases (--compare, --input)."""
    fields = {f"{s.group}.{s.name}": s.flag for s in specs()}
    groups = typing.get_type_hints(Config)
    assert len(fields) == sum(len(typing.get_type_hints(cls)) for cls in groups.values())
    assert len(set(fields.values())) == len(fields)  # one flag per field
    defined = {f.name for f in FLAGS.get_flags_for_module("engine.flags")}
    aliases = set(engine_flags.ALIASES)
    assert aliases == {"compare", "input"}
    assert defined == set(fields.values()) | set(engine_flags.NOT_FIELDS) | aliases
    for name in engine_flags.NOT_SAVED:
        assert name in defined, name


def test_flag_defaults_give_the_dataclass_defaults(parse):
    assert parse() == Config()


def _candidates(t):
    """Values of a field's type that some check may refuse."""
    origin = typing.get_origin(t)
    if origin is tuple:
        return [("bogus",), (3, 2), (2, 2)]
    if origin is typing.Union:
        return []
    return {bool: [], str: ["bogus", "", " "], int: [-2, -1, 0],
            float: [-1.0, 0.0, 1.0, 2.0, float("inf"), float("nan")]}[t]


@pytest.mark.parametrize("spec", [s for s in specs() if s.setting.checks],
                         ids=lambda s: s.flag)
def test_a_field_check_names_the_flag(spec):
    refused = []
    for value in _candidates(spec.type):
        try:
            for check in spec.setting.checks:
                check(spec.flag, value)
        except ConfigError:
            refused.append(value)
        except TypeError:  # e.g. a string where a tuple belongs
            pass
    assert refused, f"no candidate value is refused by --{spec.flag}'s checks"
    for value in refused:
        with pytest.raises(ConfigError) as e:
            Config().replace(**{spec.group: {spec.name: value}})
        assert str(e.value).startswith((f"--{spec.flag}=", f"--{spec.flag} ")), str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("group,fields,match", [
    ("benchmark", {"windows": 0}, r"^--benchmark_windows=0 must be >= 1$"),
    ("optimizer", {"name": "lamb"}, r"^--optimizer=lamb is not one of"),
    ("optimizer", {"schedule": "linear"}, r"^--lr_schedule=linear is not one of"),
    ("optimizer", {"lr_step_epochs": (6, 3)}, r"^--lr_step_epochs=6,3 must increase$"),
    ("train", {"allow_changed": ("seed",)}, r"^--allow_changed=seed: seed is not one of"),
    ("train", {"plateau_factor": 1.0}, r"^--plateau_factor=1.0 must be in \(0, 1\)$"),
    ("train", {"max_loss_ratio": float("nan")}, r"^--max_loss_ratio=nan must be a finite"),
])
def test_renamed_fields_are_reported_by_their_flag(group, fields, match):
    with pytest.raises(ConfigError, match=match):
        Config().replace(**{group: fields})


@pytest.mark.parametrize("args,match", [
    (["--bn_momentum=abc"], r"^--bn_momentum=abc must be a number or empty$"),
    (["--lr_step_epochs=1,x"], r"^--lr_step_epochs=1,x must be a comma list of integers$"),
    (["--benchmark_windows=0"], r"^--benchmark_windows=0 must be >= 1$"),
])
def test_flag_conversion_errors_name_the_flag(parse, args, match):
    with pytest.raises(ConfigError, match=match):
        parse(*args)


def test_special_conversions(parse):
    c = parse("--bn_momentum=", "--weights=", "--pos_weight=", "--benchmark_compare=",
              "--init_checkpoint=", "--data_dir=")
    assert (c.model.bn_momentum, c.model.weights, c.loss.pos_weight, c.train.init_checkpoint,
            c.data.data_dir, c.benchmark.compare) == (None, None, None, None, None, "none")
    c = parse("--backbone=inceptionv3", "--bn_momentum=0.5", "--pos_weight=auto")
    assert (c.model.input_size, c.model.bn_momentum, c.loss.pos_weight) == (75, 0.5, "auto")
    assert parse("--input_size=48").model.input_size == 48
    c = parse("--task=segmentation")
    assert (c.model.input_size, c.loss.loss) == (64, "ce")
    assert parse("--task=segmentation", "--loss=dice").loss.loss == "dice"
    c = parse("--predict_input=a", "--predict_output=b.csv", "--input=real", "--compare=ema")
    assert (c.predict.input, c.predict.output, c.benchmark.input, c.benchmark.compare) == (
        "a", "b.csv", "real", "ema")


def test_help_sections_follow_the_groups():
    text = engine_flags.help_text(full=True)
    titles = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ")
              and line.endswith(":")]
    assert titles == ["Model", "Data", "Optimizer", "Freeze", "Loss", "Run", "Training health",
                      "Benchmark (--mode=benchmark)", "Predict (--mode=predict)"]
    assert text.index("--mode (default 'train')") < text.index("--model_dir (default")
    shown = {line.split()[0][2:] for line in text.splitlines() if line.startswith("  --")}
    assert shown == {s.flag for s in specs()} | set(engine_flags.NOT_FIELDS)


def test_config_imports_neither_absl_nor_tensorflow():
    """train_main.py imports it before TensorFlow (and the flags before TF loads)."""
    code = ("import sys, engine.config; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('absl', 'tensorflow')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
