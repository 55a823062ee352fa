"""The ImageNet bases tlkeras fine-tunes: one row each, the facts every module reads.

    BASES["mobilenet_v2"].label     # "MobileNetV2": the keras.applications constructor's name
    BASES["vgg16"].blocks           # the unfreeze points that name a group of layers

Plain data, no Keras import, so a config is checked (backbone, finetune.unfreeze) in
milliseconds; tlkeras.model builds a row with keras.applications, and a test compares the
layer names here with the built model.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Base:
    label: str  # the keras.applications constructor's name ("VGG16"), also used in messages
    # The base's layer names after its input layer, in order, and the unfreeze points that
    # name a group of them (a block: its first layer and everything above).
    layers: tuple[str, ...]
    blocks: tuple[str, ...]
    features: int  # channels of the pooled features (model.split_at_features' extractor output)
    weights_file: str  # the notop file Keras downloads for weights="imagenet"
    native_resolution: int = 224  # the input size its ImageNet weights were trained at


def _mobilenet_v2_layers() -> tuple[str, ...]:
    """Keras's MobileNetV2 layer names after the input layer: a stem, block 0, blocks 1-16."""
    middle = ("depthwise", "depthwise_BN", "depthwise_relu", "project", "project_BN")
    names = ["Conv1", "bn_Conv1", "Conv1_relu", *(f"expanded_conv_{s}" for s in middle)]
    for b in range(1, 17):
        p = f"block_{b}_"
        names += [p + "expand", p + "expand_BN", p + "expand_relu"]
        names += [p + "pad"] if b in (1, 3, 6, 13) else []  # the stride-2 blocks
        names += [p + s for s in middle]
        names += [p + "add"] if b in (2, 4, 5, 7, 8, 9, 11, 12, 14, 15) else []  # residual
    return (*names, "Conv_1", "Conv_1_bn", "out_relu")


BASES = {
    "vgg16": Base(
        "VGG16",
        layers=tuple(
            f"block{b}_{kind}"
            for b, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
            for kind in [f"conv{i}" for i in range(1, convs + 1)] + ["pool"]
        ),
        blocks=("block1", "block2", "block3", "block4", "block5"),
        features=512,
        weights_file="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
    ),
    "mobilenet_v2": Base(
        "MobileNetV2",
        layers=_mobilenet_v2_layers(),
        blocks=(*(f"block_{b}" for b in range(1, 17)), "Conv_1"),
        features=1280,
        weights_file="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    ),
}
