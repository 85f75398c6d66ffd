"""Group a backbone's layers into ordered blocks for gradual unfreezing.

The engine unfreezes "the last K blocks", so a block must be a unit a user
would recognise (an Inception module, a ResNet bottleneck, a MobileNet
inverted residual) and every weight-carrying layer must be in exactly one.
Weightless layers ride along with their block; layers that belong to no
named block (the input, the final pooling) join the block before them, or
the first block if they come first.
"""

import re

from models.backbones import BACKBONES
from models.errors import ModelError


def _resnet50_key(name):
    # conv1_*/pool1_* is the stem; each bottleneck is convN_blockM_*.
    m = re.match(r"(conv\d+_block\d+)_", name)
    if m:
        return m.group(1)
    return "stem" if re.match(r"(conv1|pool1)_", name) else None


def _mobilenetv2_key(name):
    # Conv1/bn_Conv1/Conv1_relu is the stem; expanded_conv_* is Keras'
    # block 0; block_N_* are the inverted residuals; Conv_1*/out_relu the top.
    if name in ("Conv1", "bn_Conv1", "Conv1_relu"):
        return "stem"
    if name.startswith("expanded_conv"):
        return "block_0"
    m = re.match(r"(block_\d+)_", name)
    if m:
        return m.group(1)
    if name.startswith("Conv_1") or name == "out_relu":
        return "top"
    return None


def _efficientnetb0_key(name):
    # rescaling/normalization/stem_* is the stem; blockNx_* one MBConv each.
    m = re.match(r"(block\d+[a-z])_", name)
    if m:
        return m.group(1)
    if name.startswith("top_"):
        return "top"
    if name.startswith("stem_") or name in ("rescaling", "normalization"):
        return "stem"
    return None


def _tiny_cnn_key(name):
    m = re.match(r"(block\d+)_", name)
    return m.group(1) if m else None


def _group_by_key(layers, key_fn):
    blocks, current = {}, None
    for layer in layers:
        key = key_fn(layer.name)
        if key is None:
            key = current
        current = key
        blocks.setdefault(key, []).append(layer.name)
    if None in blocks:  # leading unkeyed layers (the input) join block one
        lead = blocks.pop(None)
        first = next(iter(blocks), None)
        if first is None:
            return [lead]
        blocks[first] = lead + blocks[first]
    return list(blocks.values())


def _parents(layer):
    # The backbone's own graph is the layer's first inbound node; later
    # nodes come from calling the backbone inside the full model.
    if not layer._inbound_nodes:
        return []
    return [node.operation for node in layer._inbound_nodes[0].parent_nodes]


def _ancestry(layer, cache):
    """Names of `layer` and everything upstream of it (memoized, iterative
    so deep graphs cannot hit Python's recursion limit)."""
    stack = [layer]
    while stack:
        top = stack[-1]
        if top.name in cache:
            stack.pop()
            continue
        missing = [p for p in _parents(top) if p.name not in cache]
        if missing:
            stack.extend(missing)
            continue
        names = {top.name}
        for parent in _parents(top):
            names |= cache[parent.name]
        cache[top.name] = names
        stack.pop()
    return cache[layer.name]


def _inceptionv3_blocks(model):
    """Block k ends at the concat "mixed{k}"; the stem is what all of
    mixed0's branches share. Done on the graph, because InceptionV3's other
    layers carry only auto names (conv2d_17)."""
    cache = {}
    ends = [l for l in model.layers if re.fullmatch(r"mixed\d+", l.name)]
    ends.sort(key=lambda l: int(l.name[5:]))
    if not ends:
        raise ModelError("backbone has no mixedN layers; is it inceptionv3?")
    stem = set.intersection(*[_ancestry(p, cache) for p in _parents(ends[0])])
    assigned, seen = [stem], set(stem)
    for end in ends:
        block = _ancestry(end, cache) - seen
        assigned.append(block)
        seen |= block
    assigned[-1] |= {l.name for l in model.layers} - seen  # the final pooling
    order = {l.name: i for i, l in enumerate(model.layers)}
    return [sorted(block, key=order.__getitem__) for block in assigned]


_KEY_FNS = {
    "resnet50": _resnet50_key,
    "mobilenetv2": _mobilenetv2_key,
    "efficientnetb0": _efficientnetb0_key,
    "tiny_cnn": _tiny_cnn_key,
    # segmentation encoders (models/segmentation.py), named by --seg_model
    "unet": _tiny_cnn_key,
    "deeplabv3plus": _mobilenetv2_key,
}


def backbone_blocks(backbone_model, backbone_name):
    """The backbone's layer names as ordered blocks, first (stem) to last.

    Each inner list is in model.layers order and every layer, hence every
    weight-carrying layer, is in exactly one block. Rules per backbone:
    inceptionv3: stem, then one block per mixed0..mixed10;
    resnet50: stem (conv1, pool1), then one block per convN_blockM;
    mobilenetv2: stem (Conv1), expanded_conv, block_1..block_16, top (Conv_1);
    efficientnetb0: stem, one block per block1a..block7a, top;
    tiny_cnn: block1..block4.
    Segmentation encoders: unet: block1..block{depth+1}; deeplabv3plus:
    MobileNetV2's blocks up to block_13 (where the encoder is cut).
    """
    if backbone_name not in BACKBONES and backbone_name not in _KEY_FNS:
        raise ModelError(
            f"--backbone={backbone_name} is not one of {', '.join(BACKBONES)}"
        )
    if backbone_name == "inceptionv3":
        blocks = _inceptionv3_blocks(backbone_model)
    else:
        blocks = _group_by_key(backbone_model.layers, _KEY_FNS[backbone_name])
    return [list(block) for block in blocks if block]
