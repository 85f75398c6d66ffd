"""absl flags generated from engine/config.py's settings, and flags -> Config.

Only train_main.py imports this module; the library takes a Config. Each
Config field declares its flag (name, help, default, checks, conversion)
with config.setting(); this module defines one flag per field, of the kind
its type asks for, and converts the parsed flags back in one loop. Flags
are validated once, in Config.validated, so a bad value gives the same
one-line message from the CLI and from code.
"""
from __future__ import annotations

import typing
from typing import Dict, List

from absl import flags

from engine.config import FIELD_DEFAULT, Config, ConfigError, Spec, specs

# Flags that are not settings of a run, with their --help section.
flags.DEFINE_string("mode", "train", "train, eval, benchmark, export or predict.")
NOT_FIELDS = {"mode": "Run"}


def _kind(t) -> str:
    """The absl flag kind of a field type: Optional -> string, Tuple -> list."""
    origin = typing.get_origin(t)
    if origin is typing.Union:  # Optional[X]: empty means None
        return "string"
    if origin is tuple:
        return "list"
    return {bool: "boolean", int: "integer", float: "float", str: "string"}[t]


def _flag_default(spec: Spec):
    """The flag's default: the field's, in the flag's form, unless setting(flag_default=)."""
    if spec.flag_default is not FIELD_DEFAULT:
        return spec.flag_default
    origin = typing.get_origin(spec.type)
    if origin is typing.Union:  # Optional[X]: None is the empty string
        return "" if spec.default is None else str(spec.default)
    return list(spec.default) if origin is tuple else spec.default


def _from_flag(spec: Spec, value):
    """The field's value from its flag's by the field's type (setting(parse=) aside)."""
    origin = typing.get_origin(spec.type)
    if origin is typing.Union:  # Optional[X]
        if not value.strip():
            return None
        inner = next(a for a in typing.get_args(spec.type) if a is not type(None))
        if inner is str:
            return value
        try:
            return inner(value)
        except ValueError:
            raise ValueError("must be a number or empty") from None
    if origin is tuple:
        item = typing.get_args(spec.type)[0]
        try:
            return tuple(item(v) for v in value)
        except ValueError:
            raise ValueError("must be a comma list of integers") from None  # int items only
    return value


_DEFINE = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
           "float": flags.DEFINE_float, "boolean": flags.DEFINE_boolean,
           "list": flags.DEFINE_list}
_SECTIONS: Dict[str, List[str]] = {}  # --help: section title -> flag names, in order
ALIASES: Dict[str, str] = {}  # --compare=keras_fit, --input=real: what users type
for _spec in specs():
    _DEFINE[_kind(_spec.type)](_spec.flag, _flag_default(_spec), _spec.setting.help)
    _SECTIONS.setdefault(_spec.section, []).append(_spec.flag)
    ALIASES.update({alias: _spec.flag for alias in _spec.setting.aliases})
for _name, _section in NOT_FIELDS.items():
    _SECTIONS[_section].insert(0, _name)
for _alias, _name in sorted(ALIASES.items()):
    flags.DEFINE_alias(_alias, _name)


class _Given:
    """What a setting's parse= sees of the other flags: f["task"], f.given("loss")."""

    def __init__(self, f):
        self._f = f

    def __getitem__(self, name):
        return self._f[name].value

    def given(self, name) -> bool:
        return bool(self._f[name].present)


def config_from_flags(f=flags.FLAGS) -> Config:
    """The one place flags become settings: each field from its flag, then validated."""
    given, groups = _Given(f), {}
    for spec in specs():
        value = f[spec.flag].value
        try:
            if spec.setting.parse is not None:
                value = spec.setting.parse(value, given)
            else:
                value = _from_flag(spec, value)
        except ConfigError:
            raise
        except ValueError as e:  # the parse's text, after the flag as typed
            shown = ",".join(value) if isinstance(value, list) else value
            raise ConfigError(f"--{spec.flag}={shown} {e}") from None
        groups.setdefault(spec.group, {})[spec.name] = value
    return Config().replace(**groups)  # validated


# Flags that choose what to do with a run rather than describe it. flags.txt
# leaves them out: absl lets the later of two values win, and a flagfile's
# --mode=train would otherwise override the --mode=eval typed before
# --flagfile (and a saved --overwrite would wipe the run on the next use).
NOT_SAVED = ("mode", "overwrite", "allow_changed", "export_from", "export_raw",
             "benchmark_window_s", "benchmark_windows", "benchmark_input", "benchmark_compare",
             "benchmark_xla_steps_per_loop", "predict_input", "predict_output", "predict_model")


def effective_flags(f=flags.FLAGS) -> str:
    """This module's flags as a flagfile: `--flagfile=<it>` repeats the run (in any --mode)."""
    return "\n".join(flag.serialize() for flag in f.get_flags_for_module(__name__)
                     if flag.name not in ALIASES and flag.name not in NOT_SAVED) + "\n"


# What `--help` shows: the flags of the README, by section. `--helpfull` shows all.
KEY_FLAGS = ("backbone", "input_size", "weights", "task", "data_dir", "optimizer",
             "learning_rate", "unfreeze_at", "unfreeze_layers", "unfreeze_schedule",
             "layer_lr_decay", "loss", "mode", "model_dir",
             "epochs", "batch_size", "steps_per_epoch", "seed", "deterministic", "strategy",
             "num_virtual_cpus", "init_checkpoint", "allow_changed", "ema_decay", "export_from",
             "threshold_objective", "overwrite", "predict_input", "predict_output",
             "predict_model", "calibrate_bn_steps")


def help_text(full: bool, f=flags.FLAGS) -> str:
    """Flags grouped by section: the key ones (full=False) or all of them."""
    lines = ["usage: python train_main.py [--flag=value ...] [--flagfile=FILE]",
             "  e.g. python train_main.py --backbone=inceptionv3 --unfreeze_at=5",
             "       python train_main.py --mode=eval --flagfile=runs/default/flags.txt", ""]
    for title, section in _SECTIONS.items():
        names = [n for n in section if full or n in KEY_FLAGS]
        if not names:
            continue
        lines.append(f"{title}:")
        for name in names:
            flag = f[name]
            default = flag.default_as_str or "''"
            lines.append(f"  --{name} (default {default})")
            lines.append(f"      {flag.help}")
        lines.append("")
    lines.append("--helpfull lists every flag." if not full else
                 "--flagfile=FILE reads flags from a file (later flags win).")
    return "\n".join(lines) + "\n"
