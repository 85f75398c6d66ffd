"""Which variables train in which phase.

A run is a schedule of phases (`PhaseSchedule`), each from its start epoch
to the next one's: "frozen" (only the head trains) and one phase per thaw
step. `--unfreeze_at=N --unfreeze_layers=X` is the two-phase case (frozen,
then "unfrozen" from epoch N; N=0: that phase only); `--unfreeze_schedule`
gives several, named by what they thaw ("blocks:2", "all"). A phase's
`index` counts the thaw steps up to it (frozen 0), so --unfreeze_at runs
keep the 0/1 they saved as train/unfrozen before schedules existed.

Setting `trainable` on Keras 3 layers also puts frozen BatchNormalization
into inference mode (moving statistics used, never updated), which is what
fine-tuning wants. A traced step does not see a change of `trainable`, so
the trainer retraces whenever the phase changes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import keras

from engine.config import ConfigError, FreezeConfig, parse_unfreeze_schedule

FROZEN, UNFROZEN = "frozen", "unfrozen"


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase: from start_epoch (0-based) on, the `thawed` backbone layers train."""
    start_epoch: int
    name: str  # FROZEN, UNFROZEN (--unfreeze_at) or the schedule's WHAT
    thawed: Tuple[str, ...]  # backbone layer names (empty when frozen)
    index: int  # thaw steps before and including this one: frozen 0, the k-th thaw k

    @property
    def frozen(self) -> bool:
        return self.name == FROZEN


@dataclasses.dataclass(frozen=True)
class PhaseSchedule:
    """The run's phases in order of start epoch; `flag` made it (for messages)."""
    phases: Tuple[Phase, ...]
    flag: str = "unfreeze_at"

    def phase_for_epoch(self, epoch: int) -> Phase:
        """epoch is 0-based: the last phase that has started by then."""
        return [p for p in self.phases if p.start_epoch <= epoch][-1]

    def named(self, name: str) -> Phase:
        """The phase called name. FROZEN and UNFROZEN always resolve (the
        frozen phase, and the schedule's last phase), so code that thinks in
        two phases (the benchmark) works with any schedule."""
        for phase in self.phases:
            if phase.name == name:
                return phase
        if name == FROZEN:
            return Phase(0, FROZEN, (), 0)
        if name == UNFROZEN:
            return self.phases[-1]
        raise KeyError(f"no phase {name!r} in {[p.name for p in self.phases]}")

    def with_index(self, index: int) -> Optional[Phase]:
        """The phase whose index a checkpoint saved; None when it has none here."""
        if index == 0:
            return self.named(FROZEN)
        return next((p for p in self.phases if p.index == index), None)

    def phase_before(self, phase: Phase, entered: Optional[str],
                     saved_index: int) -> Optional[Phase]:
        """The phase that entering `phase` leaves, or None when nothing switches.

        entered: the phase this process trained last (None: none yet); else
        the restored checkpoint's saved_index says: a resume saved in the
        phase before crosses the switch now, as the uninterrupted run did,
        and one saved inside `phase` (or a fresh start, index -1) does not.
        """
        before = self.named(entered) if entered else self.with_index(saved_index)
        return before if before is not None and before.name != phase.name else None

    @property
    def thaw_steps(self) -> int:
        """How many times more of the backbone starts training."""
        return sum(1 for p in self.phases if not p.frozen)

    def warning(self, epochs: int) -> Optional[str]:
        """A line for the log when some phase starts after the run's last epoch."""
        late = [p for p in self.phases if p.start_epoch >= epochs]
        if not late:
            return None
        if self.flag == "unfreeze_at":
            return (f"WARNING: --unfreeze_at={late[0].start_epoch} >= --epochs={epochs}: the "
                    f"backbone stays frozen for the whole run")
        return (f"WARNING: --unfreeze_schedule phases {', '.join(p.name for p in late)} start "
                f"at or after --epochs={epochs}: they never run")


def phase_schedule(cfg: FreezeConfig, blocks: Sequence[Sequence[str]]) -> PhaseSchedule:
    """The phases of a run, from --unfreeze_schedule or --unfreeze_at/--unfreeze_layers.

    blocks: the backbone's blocks, stem first (models.backbone_blocks). A
    WHAT that thaws no layer is a ConfigError: that phase would silently
    train the head only.
    """
    steps = parse_unfreeze_schedule(cfg.unfreeze_schedule)
    thaws = [(e, w, w) for e, w in steps] or [(cfg.unfreeze_at, UNFROZEN, cfg.unfreeze_layers)]
    phases = [] if thaws[0][0] == 0 else [Phase(0, FROZEN, (), 0)]
    for k, (epoch, name, what) in enumerate(thaws, start=1):
        thawed = tuple(thawed_layer_names(blocks, what))
        if not thawed:
            flag = "unfreeze_schedule" if steps else "unfreeze_layers"
            raise ConfigError(f"--{flag}: {what} matches no layer of the backbone")
        phases.append(Phase(epoch, name, thawed, k))
    return PhaseSchedule(tuple(phases), "unfreeze_schedule" if steps else "unfreeze_at")


def thawed_layer_names(blocks: Sequence[Sequence[str]], unfreeze_layers: str) -> List[str]:
    """The backbone layers that train after unfreezing.

    unfreeze_layers: "all", "blocks:K" (the last K blocks) or "regex:PATTERN"
    (layers whose name matches).
    """
    names = [n for block in blocks for n in block]
    if unfreeze_layers == "all":
        return names
    if unfreeze_layers.startswith("blocks:"):
        k = int(unfreeze_layers.split(":", 1)[1])
        return [n for block in blocks[-k:] for n in block]
    pattern = re.compile(unfreeze_layers.split(":", 1)[1])
    return [n for n in names if pattern.search(n)]


def apply_phase(model, phase: str, *, thawed: Sequence[str], freeze_bn: bool) -> None:
    """Sets `trainable` on the backbone's layers for the phase.

    phase: FROZEN (the whole backbone), or any other phase's name: the
    `thawed` layers train (BatchNorm not with freeze_bn), the others not.
    """
    backbone = model.get_layer("backbone")
    if phase == FROZEN:
        backbone.trainable = False
        return
    # Keras 3 sets every sublayer only when the value changes: True on an
    # already-trainable backbone would leave earlier per-layer choices in place.
    backbone.trainable = False
    backbone.trainable = True
    thawed = set(thawed)
    for layer in backbone.layers:
        keep = layer.name in thawed
        if freeze_bn and isinstance(layer, keras.layers.BatchNormalization):
            keep = False
        if not keep:
            layer.trainable = False


def per_block_groups(schedule: PhaseSchedule, layer_lr_decay: float) -> bool:
    """Whether the backbone needs one optimizer group per block.

    With layer-wise LR decay the blocks need their own learning rates, and a
    Keras optimizer has one. With several thaw steps, blocks start training
    at different times, and Adam's bias correction counts its optimizer's
    steps: a block thawed later into an optimizer that has run for a while
    would take its first steps with almost no correction (several times the
    learning rate). Otherwise one backbone group, the keys of every
    --unfreeze_at checkpoint.
    """
    return layer_lr_decay != 1.0 or schedule.thaw_steps > 1


def block_group_names(blocks: Sequence[Sequence[str]]) -> List[str]:
    """"backbone_00" (the stem) .. one per block, in the blocks' order.

    Numbered from the stem, so a block's name never depends on the schedule.
    """
    return [f"backbone_{i:02d}" for i in range(len(blocks))]


def block_depths(blocks: Optional[Sequence[Sequence[str]]]) -> Dict[str, int]:
    """Block group name -> its distance from the top block (the top one is 0)."""
    if not blocks:
        return {}
    names = block_group_names(blocks)
    return {name: len(names) - 1 - i for i, name in enumerate(names)}


def trainable_in_every_phase(model, blocks: Optional[Sequence[Sequence[str]]] = None) -> dict:
    """Variables each group could ever train: {"head": [...], "backbone": [...]}.

    With blocks (per_block_groups), the backbone is split into one group per
    block, named by block_group_names, every block listed even when it has
    no variable. Found by briefly making everything trainable; the caller
    applies the real phase afterwards.
    """
    backbone = model.get_layer("backbone")
    # Both, as in apply_phase: True alone leaves earlier per-layer choices.
    model.trainable = False
    model.trainable = True
    backbone_ids = {id(v) for v in backbone.trainable_variables}
    head = [v for v in model.trainable_variables if id(v) not in backbone_ids]
    if not blocks:
        return {"backbone": list(backbone.trainable_variables), "head": head}
    groups = {name: [v for layer in block for v in backbone.get_layer(layer).trainable_variables]
              for name, block in zip(block_group_names(blocks), blocks)}
    grouped = [id(v) for vs in groups.values() for v in vs]
    if len(grouped) != len(backbone_ids) or set(grouped) != backbone_ids:
        raise RuntimeError("the backbone's blocks do not hold each of its variables once")
    groups["head"] = head
    return groups


def changing_weights(model):
    """Weights that change while training in the current phase.

    Trainable variables, plus BatchNorm moving statistics of BN layers that
    run in training mode (trainable ones).
    """
    changing = list(model.trainable_variables)
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable:
            changing += [layer.moving_mean, layer.moving_variance]
    return changing
