"""An ImageNet base (VGG16 or MobileNetV2) + new dense head; the model owns its preprocessing.

    model = build_model(cfg.model, info)  # uint8 (batch, S, S, 3) -> (batch, classes) probabilities
    set_finetune_trainable(model, "block5")

Because resizing and the base's input transform are layers of the model, a SavedModel or
ONNX export takes raw uint8 pixels and no client has to know about ImageNet means.
A second base is one row of tlkeras.bases.BASES and its input transform in PREPROCESS below.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import keras

from tlkeras.bases import BASES, Base
from tlkeras.config import AUTO, ModelConfig
from tlkeras.errors import UserError
from tlkeras.policies import unfreeze_start

if TYPE_CHECKING:  # only .storage_size and .num_classes are read: no tfds import for config checks
    from tlkeras.data import DatasetInfo

FEATURES = "pool"  # the frozen part ends here: phase 1 computes it once and caches it


class _Preprocess(keras.layers.Layer):
    """uint8 RGB in, the base's expected float32 input out.

    Registered subclasses rather than a Lambda, so the saved model reloads without unsafe
    deserialization. They run in float32 even under mixed precision: pixel values up to
    255 keep full precision through the transform; the base casts to its compute dtype.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, images):
        return self.transform(keras.ops.cast(images, "float32"))


@keras.saving.register_keras_serializable(package="tlkeras")  # the name old model.keras files use
class VGG16Preprocess(_Preprocess):
    """RGB -> BGR with the ImageNet channel means removed ("caffe" mode)."""

    transform = staticmethod(keras.applications.vgg16.preprocess_input)


@keras.saving.register_keras_serializable(package="tlkeras")
class MobileNetV2Preprocess(_Preprocess):
    """x / 127.5 - 1: pixels to [-1, 1] ("tf" mode)."""

    transform = staticmethod(keras.applications.mobilenet_v2.preprocess_input)


# The input transform of each base of tlkeras.bases.BASES (Keras pairs each application
# with its own preprocess_input).
PREPROCESS = {"vgg16": VGG16Preprocess, "mobilenet_v2": MobileNetV2Preprocess}


def resolve_weights(weights: str | None, backbone: Base) -> str | None:
    """'imagenet' and None pass through to Keras; anything else must be a readable file."""
    if weights in (None, "imagenet"):
        return weights
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(
            f"model.weights={weights!r}: no such file; give the path to "
            f"{backbone.weights_file}, 'imagenet' to download, or null for random weights"
        )
    return str(path)


def build_base(name: str, weights: str | None, resolution: int) -> keras.Model:
    """The base BASES[name] without its top, as a layer named `name`."""
    backbone = BASES[name]
    weights = resolve_weights(weights, backbone)
    try:
        # Keras has MobileNetV2 ImageNet files for inputs 96, 128, 160, 192 and 224; at other
        # sizes it warns and loads the 224 one, which works at any size >= 32.
        with warnings.catch_warnings():  # a wrong file: one line below, not a warning per layer
            warnings.filterwarnings("ignore", message="Skipping nested container")
            return getattr(keras.applications, backbone.label)(
                include_top=False, weights=weights, input_shape=(resolution, resolution, 3), name=name
            )
    except Exception as e:  # h5py, Keras and urllib each raise their own kind
        if weights is None:
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        reason = " ".join(lines[:2])[:240] if lines else type(e).__name__
        if weights == "imagenet":
            raise UserError(
                f"model.weights='imagenet': downloading the {backbone.label} weights failed "
                f"({reason}); offline, set model.weights to a local copy of {backbone.weights_file}"
            ) from None
        raise UserError(
            f"model.weights={weights!r} could not be loaded as {backbone.label} include_top=False "
            f"weights ({reason}); the file may be truncated or for another architecture: "
            f"use the Keras {backbone.weights_file}"
        ) from None


def build_model(cfg: ModelConfig, info: DatasetInfo, load_weights: bool = True) -> keras.Model:
    """The phase-1 model, base frozen; load_weights=False when a checkpoint follows.

    Input: uint8 RGB [batch, S, S, 3], S = info.storage_size (the data's storage size);
    output: float32 softmax probabilities [batch, info.num_classes].
    """
    if cfg.resolution == AUTO:  # outside a training run (which resolves it first): the base's own size
        cfg = dataclasses.replace(cfg, resolution=BASES[cfg.backbone].native_resolution)
    base = build_base(cfg.backbone, cfg.weights if load_weights else None, cfg.resolution)
    base.trainable = False
    size = info.storage_size
    inputs = keras.Input((size, size, 3), dtype="uint8", name="images")
    x = PREPROCESS[cfg.backbone](name="preprocess")(inputs)
    if cfg.resolution != size:
        # Bilinear weights sum to 1, so resizing commutes with either per-channel affine
        # transform: the order is free.
        x = keras.layers.Resizing(cfg.resolution, cfg.resolution, dtype="float32", name="resize")(x)
    # training=False: the base runs in inference mode (the Keras guide's rule), so its
    # BatchNorm layers normalise with their ImageNet statistics. Under fit, Keras 3.15
    # overrides it (see set_finetune_trainable), which is why BatchNorm also stays frozen.
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D(name=FEATURES)(x)
    # VGG16's pooled features reach the hundreds; normalising them lets the head train at
    # 1e-3 without a huge first loss (0.63 vs 0.53 test accuracy on 5k images, 3 epochs).
    # LayerNorm, not BatchNorm: per example, so replicas and batch sizes agree.
    x = keras.layers.LayerNormalization(name="head_norm")(x)
    x = keras.layers.Dense(cfg.head_units, activation="relu", name="head_dense")(x)
    x = keras.layers.Dropout(cfg.dropout, name="head_dropout")(x)
    # float32 output even under mixed precision: a stable softmax and a stable export.
    outputs = keras.layers.Dense(info.num_classes, activation="softmax", dtype="float32", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=f"tlkeras_{cfg.backbone}")


def find_base(model: keras.Model) -> tuple[str, keras.Model]:
    """(backbone name, base layer) of a model from build_model: the layer named after its key."""
    names = {layer.name for layer in model.layers}
    for name in BASES:
        if name in names:
            return name, model.get_layer(name)
    raise ValueError(f"model {model.name!r} has no base layer named one of {', '.join(BASES)}")


def set_finetune_trainable(model: keras.Model, unfreeze: str) -> None:
    """Phase 2: train the base from `unfreeze` ("all", a block or a layer) upwards.

    BatchNorm layers stay frozen (their scale and offset too): a frozen BatchNormalization
    normalises with its moving statistics and never updates them. Calling the base with
    training=False is not enough: Keras 3.15's Functional.call passes fit's training=True
    down over a layer's explicit training=False (keras/src/models/functional.py,
    operation_fn), and small fine-tuning batches would overwrite the ImageNet statistics.
    """
    name, base = find_base(model)
    backbone = BASES[name]
    names = [layer.name for layer in base.layers]
    start = unfreeze_start(names, backbone.blocks, unfreeze, backbone.label)
    base.trainable = True
    for i, layer in enumerate(base.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def split_at_features(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """(images -> pooled features, features -> probabilities), sharing `model`'s layers.

    Training the second trains `model`'s head: phase 1 runs the frozen base once per
    image instead of once per image per epoch.
    """
    pool = model.get_layer(FEATURES)
    extractor = keras.Model(model.input, pool.output, name="features")
    features = keras.Input(pool.output.shape[1:], name="features")
    x = features
    for layer in model.layers[model.layers.index(pool) + 1 :]:
        x = layer(x)
    return extractor, keras.Model(features, x, name="head")


def fold_temperature(model, temperature: float):
    """A copy of `model` (from build_model) whose outputs are softmax(logits / T): the last
    Dense's kernel and bias divided by T, since softmax((x W + b) / T) = softmax(x (W / T) +
    b / T). The graph is unchanged, so its exports keep their contract; `model` is untouched."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    head = copy.layers[-1]
    head.kernel.assign(head.kernel / temperature)
    head.bias.assign(head.bias / temperature)
    return copy
