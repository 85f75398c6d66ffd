"""Which backbone layers train in which phase: the schedule as data, and the groups."""
import keras
import pytest

from engine import freeze
from engine.config import Config, ConfigError, FreezeConfig, parse_unfreeze_schedule
from models import backbone_blocks, build_model


@pytest.fixture(scope="module")
def model():
    return build_model("tiny_cnn", 32, 13, seed=0)


@pytest.fixture(scope="module")
def blocks(model):
    return backbone_blocks(model.get_layer("backbone"), "tiny_cnn")  # block1 .. block4


def _names(schedule, epochs):
    return [schedule.phase_for_epoch(e).name for e in range(epochs)]


def test_unfreeze_at_is_the_two_phase_schedule_counted_from_zero(blocks):
    two = freeze.phase_schedule(FreezeConfig(unfreeze_at=5, unfreeze_layers="blocks:1"), blocks)
    assert [(p.start_epoch, p.name, p.index) for p in two.phases] == [(0, "frozen", 0),
                                                                      (5, "unfrozen", 1)]
    assert two.phases[0].thawed == () and two.phases[1].thawed == tuple(blocks[-1])
    assert _names(two, 7) == ["frozen"] * 5 + ["unfrozen"] * 2
    one = freeze.phase_schedule(FreezeConfig(unfreeze_at=0), blocks)
    assert [(p.start_epoch, p.name, p.index) for p in one.phases] == [(0, "unfrozen", 1)]
    assert one.phases[0].thawed == tuple(n for b in blocks for n in b)


def test_schedule_gives_a_frozen_phase_then_one_per_entry(blocks):
    assert parse_unfreeze_schedule("3:blocks:2, 6:blocks:3,9:all") == (
        (3, "blocks:2"), (6, "blocks:3"), (9, "all"))
    assert parse_unfreeze_schedule("") == ()
    assert parse_unfreeze_schedule("0:regex:^block[34]_c{1,2}onv,2:all") == (
        (0, "regex:^block[34]_c{1,2}onv"), (2, "all"))  # the comma inside the regex stays
    s = freeze.phase_schedule(FreezeConfig(unfreeze_schedule="1:blocks:1,3:blocks:2,4:all"),
                              blocks)
    assert [(p.start_epoch, p.name, p.index) for p in s.phases] == [
        (0, "frozen", 0), (1, "blocks:1", 1), (3, "blocks:2", 2), (4, "all", 3)]
    assert _names(s, 6) == ["frozen", "blocks:1", "blocks:1", "blocks:2", "all", "all"]
    assert [p.thawed for p in s.phases] == [
        (), tuple(blocks[3]), tuple(blocks[2] + blocks[3]), tuple(sum(blocks, []))]
    assert s.thaw_steps == 3 and s.warning(5) is None
    assert s.warning(4) == ("WARNING: --unfreeze_schedule phases all start at or after "
                            "--epochs=4: they never run")
    from_start = freeze.phase_schedule(FreezeConfig(unfreeze_schedule="0:blocks:1,2:all"), blocks)
    assert [p.name for p in from_start.phases] == ["blocks:1", "all"]  # no frozen phase


def test_phases_resolve_by_name_and_by_saved_index(blocks):
    s = freeze.phase_schedule(FreezeConfig(unfreeze_schedule="2:blocks:1,4:all"), blocks)
    assert s.named("blocks:1").index == 1
    assert s.named(freeze.UNFROZEN).name == "all"  # two-phase callers get the last phase
    assert s.with_index(2).name == "all" and s.with_index(0).frozen
    assert s.with_index(-1) is None and s.with_index(7) is None
    all_ = s.named("all")
    assert s.phase_before(all_, "blocks:1", 2) == s.named("blocks:1")  # this process switches
    assert s.phase_before(all_, None, 1).name == "blocks:1"  # resumed, saved the phase before
    assert s.phase_before(all_, None, 2) is None  # resumed inside the phase
    assert s.phase_before(all_, None, -1) is None  # a fresh start
    assert s.phase_before(all_, "all", 1) is None
    started = freeze.phase_schedule(FreezeConfig(unfreeze_at=0), blocks)
    assert started.named(freeze.FROZEN).frozen and started.with_index(0).frozen
    with pytest.raises(KeyError):
        s.named("blocks:9")


@pytest.mark.parametrize("text,match", [
    ("3:blocks:2,3:all", "the epochs must increase"),
    ("6:all,3:blocks:2", "the epochs must increase"),
    ("3:blocks:2,6:blocks:2", "blocks:2 appears twice"),
    ("3:some", "3:some: some must be all, blocks:K or regex:PATTERN"),
    ("3:blocks:0", "blocks:0 must be all"),
    ("three:all", "'three:all' is not EPOCH:WHAT"),
    ("3:", "'3:' is not EPOCH:WHAT"),
    ("-1:all", "is not EPOCH:WHAT"),
    ("3:regex:(", "regex:\\(: bad pattern"),
])
def test_bad_schedules_are_one_line_errors_naming_the_flag(text, match):
    with pytest.raises(ConfigError, match=match) as e:
        Config().replace(freeze={"unfreeze_schedule": text})
    assert str(e.value).startswith(f"--unfreeze_schedule={text}") and "\n" not in str(e.value)


@pytest.mark.parametrize("other", [{"unfreeze_at": 2}, {"unfreeze_layers": "blocks:1"}])
def test_schedule_excludes_unfreeze_at_and_unfreeze_layers(other):
    with pytest.raises(ConfigError, match="--unfreeze_schedule replaces --unfreeze_at and "
                                          "--unfreeze_layers"):
        Config().replace(freeze={"unfreeze_schedule": "2:all", **other})
    Config().replace(freeze={"unfreeze_schedule": "2:all", "unfreeze_at": 0})  # defaults: fine


def test_a_what_that_thaws_nothing_is_an_error_naming_the_flag(blocks):
    with pytest.raises(ConfigError, match=r"--unfreeze_schedule: regex:\^conv matches no layer"):
        freeze.phase_schedule(FreezeConfig(unfreeze_schedule="1:regex:^conv"), blocks)
    with pytest.raises(ConfigError, match=r"--unfreeze_layers: regex:\^conv matches no layer"):
        freeze.phase_schedule(FreezeConfig(unfreeze_at=1, unfreeze_layers="regex:^conv"), blocks)


def test_each_phase_trains_its_thawed_layers(model, blocks):
    s = freeze.phase_schedule(FreezeConfig(unfreeze_schedule="1:blocks:1,2:blocks:3"), blocks)
    backbone = model.get_layer("backbone")
    trained = []
    for phase in s.phases:
        freeze.apply_phase(model, phase.name, thawed=phase.thawed, freeze_bn=False)
        trained.append({l.name.split("_")[0] for l in backbone.layers if l.trainable and l.weights})
    assert trained == [set(), {"block4"}, {"block2", "block3", "block4"}]


def test_per_block_groups_when_blocks_need_their_own_rate_or_step_count(model, blocks):
    two = freeze.phase_schedule(FreezeConfig(unfreeze_at=2), blocks)
    gradual = freeze.phase_schedule(FreezeConfig(unfreeze_schedule="1:blocks:1,2:all"), blocks)
    assert not freeze.per_block_groups(two, 1.0)  # today's groups: head and backbone
    assert freeze.per_block_groups(two, 0.8) and freeze.per_block_groups(gradual, 1.0)
    groups = freeze.trainable_in_every_phase(model, blocks)
    assert list(groups) == ["backbone_00", "backbone_01", "backbone_02", "backbone_03", "head"]
    assert [sorted(v.path.split("/")[0] for v in groups[f"backbone_0{i}"]) for i in range(4)] == [
        [f"block{i + 1}_bn", f"block{i + 1}_bn", f"block{i + 1}_conv"] for i in range(4)]
    assert freeze.block_depths(blocks) == {"backbone_00": 3, "backbone_01": 2, "backbone_02": 1,
                                           "backbone_03": 0}
    assert freeze.block_depths(None) == {}


def test_frozen_phase_trains_only_the_head(model):
    freeze.apply_phase(model, freeze.FROZEN, thawed=[], freeze_bn=False)
    assert {v.path.split("/")[0] for v in model.trainable_variables} == {"logits"}


def test_last_k_blocks_thaw_only_those(model):
    blocks = backbone_blocks(model.get_layer("backbone"), "tiny_cnn")
    thawed = freeze.thawed_layer_names(blocks, "blocks:1")
    assert thawed == blocks[-1]
    freeze.apply_phase(model, freeze.UNFROZEN, thawed=thawed, freeze_bn=False)
    backbone = model.get_layer("backbone")
    trainable_layers = {l.name for l in backbone.layers if l.trainable and l.weights}
    assert trainable_layers == {n for n in blocks[-1] if backbone.get_layer(n).weights}


def test_regex_and_freeze_bn(model):
    blocks = backbone_blocks(model.get_layer("backbone"), "tiny_cnn")
    thawed = freeze.thawed_layer_names(blocks, "regex:^block[34]")
    assert thawed and all(n.startswith(("block3", "block4")) for n in thawed)
    freeze.apply_phase(model, freeze.UNFROZEN, thawed=freeze.thawed_layer_names(blocks, "all"),
                       freeze_bn=True)
    backbone = model.get_layer("backbone")
    bns = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    convs = [l for l in backbone.layers if isinstance(l, keras.layers.Conv2D)]
    assert bns and not any(l.trainable for l in bns)  # inference mode, no gradients
    assert all(l.trainable for l in convs)


def test_trainable_in_every_phase_covers_backbone_and_head(model):
    freeze.apply_phase(model, freeze.FROZEN, thawed=[], freeze_bn=False)
    groups = freeze.trainable_in_every_phase(model)
    backbone = model.get_layer("backbone")
    assert list(groups) == ["backbone", "head"]
    assert len(groups["backbone"]) == len(backbone.trainable_variables)
    assert [v.path for v in groups["head"]] == ["logits/kernel", "logits/bias"]
