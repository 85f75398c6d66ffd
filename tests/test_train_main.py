"""The CLI as a user meets it: a short run, resume, and one-line errors."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_main.py"), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_train_then_resume_from_the_same_model_dir(tiny_run, own_tiny_run):
    # The first run: conftest's tiny_run (one frozen epoch), trained once; this test resumes a copy.
    run = own_tiny_run
    assert "epoch 1:" in tiny_run["stdout"] and "fresh start" in tiny_run["stdout"]
    assert open(run / "flags.txt").read().count("--backbone=tiny_cnn") == 1
    # Again, through a flagfile of the effective flags (it repeats the setup), one epoch longer.
    second = _run(f"--flagfile={run}/flags.txt", "--epochs=2")
    assert second.returncode == 0, second.stderr
    assert "resumed" in second.stdout and "epoch 2:" in second.stdout and "epoch 1:" not in second.stdout
    rows = open(run / "metrics.csv").read().splitlines()
    assert rows[0].startswith("epoch,loss") and len(rows) == 3


# In a process of its own: errors found before TensorFlow loads (absl's flag parsing,
# the config checks) and the one that needs its own devices (3 virtual CPUs).
@pytest.mark.parametrize("args,message", [
    (["--backbone=vgg16"], "error: --backbone=vgg16 is not one of"),
    (["--mode=serve"], "error: --mode=serve is not one of"),
    (["--flagfile=/nonexistent/flags.txt"], "error: Unable to open flagfile"),
    (["--epochs=abc"], "error: flag --epochs=abc: invalid literal"),
    (["--strategy=mirrored", "--num_virtual_cpus=3", "--batch_size=16"],
     "error: --batch_size=16 does not split evenly over 3 replicas"),
])
def test_user_errors_are_one_line_with_a_nonzero_exit(tmp_path, embedded_cache, args, message):
    result = _run(f"--model_dir={tmp_path}/run", f"--cache_dir={embedded_cache}", *args)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith(message), result.stderr
    assert "Traceback" not in result.stderr


# Found once TensorFlow is loaded (building the model, the data, the loss; the model_dir):
# main() in this process, which returns the code the CLI exits with.
@pytest.mark.parametrize("args,message", [
    (["--backbone=inceptionv3", "--input_size=40"], "error: --input_size=40 is below inceptionv3's minimum of 75"),
    (["--data_dir=/nonexistent/data"], "error: --data_dir=/nonexistent/data does not exist"),
    (["--mode=eval"], "error: --model_dir="),
    (["--loss=foo"], "error: --loss=foo: unknown loss 'foo'; choose from bce"),
])
def test_user_errors_after_tensorflow_loads_are_one_line_with_exit_code_2(
        tmp_path, embedded_cache, train_main_here, args, message):
    code, _, err = train_main_here(f"--model_dir={tmp_path}/run", f"--cache_dir={embedded_cache}",
                                   *args)
    assert code == 2
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines[-1].startswith(message), err
    assert "Traceback" not in err


def test_csv_naming_a_missing_image_is_a_one_line_error(tmp_path, train_main_here):
    data = tmp_path / "planet"
    (data / "images").mkdir(parents=True)
    (data / "labels.csv").write_text("image_name,tags\ntrain_0,clear primary\n")
    code, _, err = train_main_here(f"--model_dir={tmp_path}/run", f"--data_dir={data}")
    assert code == 2 and "Traceback" not in err
    assert "train_0" in err.splitlines()[-1]


@pytest.mark.slow
def test_readme_flagfile_commands_evaluate_and_export_and_a_failed_run_keeps_flags_txt(
        own_tiny_run):
    """The documented flow: train (conftest's tiny_run, one epoch of 2 steps with EMA; this
    test's copy), then `--mode=eval|export --flagfile=RUN/flags.txt`."""
    run = own_tiny_run
    assert (run / "thresholds.json").exists() and (run / "thresholds_ema.json").exists()
    flags_txt = (run / "flags.txt").read_text()
    assert "--mode=" not in flags_txt
    checkpoints = sorted(os.listdir(run / "checkpoints"))
    # The README's commands: the flagfile must not turn them back into training runs.
    evaluated = _run("--mode=eval", f"--flagfile={run}/flags.txt")
    assert evaluated.returncode == 0, evaluated.stderr
    assert "val_loss:" in evaluated.stdout and "epoch 1:" not in evaluated.stdout
    assert sorted(os.listdir(run / "checkpoints")) == checkpoints
    exported = _run(f"--flagfile={run}/flags.txt", "--mode=export")
    assert exported.returncode == 0, exported.stderr
    line = exported.stdout.strip().splitlines()[-1]
    assert line.startswith(f"exported EMA weights of step 2 from {run}/best/ckpt-2 "
                           f"(best by --best_metric, "), line
    assert f" to {run}/export/2 " in line and "epoch 1:" not in exported.stdout
    for name in ("saved_model.pb", "labels.txt", "thresholds.json"):
        assert (run / "export" / "2" / name).exists(), name
    # A command that fails on this model_dir leaves its flags.txt alone.
    changed = _run(f"--flagfile={run}/flags.txt", "--optimizer=momentum", "--epochs=2")
    assert changed.returncode == 2
    assert "--allow_changed=optimizer" in changed.stderr.splitlines()[-1]
    assert (run / "flags.txt").read_text() == flags_txt


def test_help_shows_the_key_flags_by_section_and_helpfull_all_of_them():
    short = _run("--help", timeout=60)
    assert short.returncode == 0, short.stderr
    assert "Model:\n  --backbone" in short.stdout and "--unfreeze_at" in short.stdout
    assert "--histogram_every" not in short.stdout
    full = _run("--helpfull", timeout=60)
    assert full.returncode == 0
    assert "Training health:" in full.stdout and "--histogram_every" in full.stdout
