"""Shared fixtures: two logical CPUs (for MirroredStrategy), mocked and real data."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Folder scans are cached per user; tests (and the processes they start) use their own cache.
os.environ["TLKERAS_CACHE_DIR"] = tempfile.mkdtemp(prefix="tlkeras-test-cache-")

import tensorflow as tf  # noqa: E402

# Must happen before TensorFlow initialises its devices, hence at import time of conftest.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

ASSETS = Path(os.environ.get("TLKERAS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
WEIGHTS = ASSETS / "vgg16" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
TFDS_DIR = ASSETS / "tensorflow_datasets"
HYMENOPTERA = ASSETS / "hymenoptera_data"
MOBILENET_V2_WEIGHTS = ASSETS / "mobilenet_v2" / "mobilenet_v2_1.0_224_notop.weights.h5"


def _require(paths: list[Path]) -> None:
    missing = [p for p in paths if not p.exists()]
    if missing:
        reason = f"real assets not found: {', '.join(map(str, missing))} (set TLKERAS_ASSETS)"
        if os.environ.get("TLKERAS_REQUIRE_ASSETS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def assets() -> SimpleNamespace:
    """The real VGG16 weights and CIFAR-10; CI sets TLKERAS_REQUIRE_ASSETS=1 so absence fails."""
    _require([WEIGHTS, TFDS_DIR / "cifar10"])
    return SimpleNamespace(weights=WEIGHTS, tfds_dir=TFDS_DIR)


@pytest.fixture
def hymenoptera() -> SimpleNamespace:
    """The real VGG16 weights and the ants-vs-bees photo folder."""
    _require([WEIGHTS, HYMENOPTERA / "train", HYMENOPTERA / "val"])
    return SimpleNamespace(weights=WEIGHTS, folder=HYMENOPTERA)


@pytest.fixture
def mobilenet_assets() -> SimpleNamespace:
    """The real MobileNetV2 weights (Keras 3 .weights.h5, loaded by path) and CIFAR-10."""
    _require([MOBILENET_V2_WEIGHTS, TFDS_DIR / "cifar10"])
    return SimpleNamespace(weights=MOBILENET_V2_WEIGHTS, tfds_dir=TFDS_DIR)


@pytest.fixture
def mock_cifar():
    """tfds.load returns random CIFAR-shaped examples: 24 per split."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=24):
        yield


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_overrides(**extra: str) -> list[str]:
    """A config that runs both phases in seconds: random weights, 32x32, 1 epoch each."""
    base = {
        "model.weights": "null",
        "model.resolution": "32",
        "model.head_units": "16",
        "data.batch_size": "8",
        "data.shuffle_buffer": "32",
        "head.epochs": "1",
        "finetune.epochs": "1",
        "finetune.unfreeze": "block5",
        "export.enabled": "false",
        "export.litert": "false",  # when a test turns export on: the LiteRT and int8 exports
        "export.int8_onnx": "false",  # have their own tests (test_litert.py) and cost a minute
        "evaluate.enabled": "false",  # the trust report has its own tests (test_evaluate.py)
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


CIFAR_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def tiny_info(size: int = 32, names: tuple[str, ...] = CIFAR_NAMES):
    from tlkeras.data import DatasetInfo

    return DatasetInfo(name="test", source="tfds", class_names=tuple(names), storage_size=size)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A random-weight model exported once: (keras model, export base, export record)."""
    import numpy as np

    from tlkeras.config import ModelConfig
    from tlkeras.export import export_model
    from tlkeras.model import build_model

    base = tmp_path_factory.mktemp("export")
    info = tiny_info()
    model = build_model(ModelConfig(weights=None, resolution=32, head_units=16), info)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return model, base, export_model(model, base, "tlkeras", images, info.class_names)


def make_image_folder(root: Path, layout: dict[str, int], size=(40, 30), fmt: str = "PNG", seed: int = 0) -> Path:
    """Writes <root>/<class path>/<i>.<fmt> images; layout maps 'cats' or 'train/cats' to a count.

    Each class has its own mean colour, so a model can learn the classes from pixels.
    """
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ext = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "GIF": "gif"}[fmt]
    names = sorted({Path(cls).name for cls in layout})
    for cls, count in sorted(layout.items()):
        k = names.index(Path(cls).name)
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array([(k * 97) % 256, (k * 53 + 80) % 256, (k * 31 + 160) % 256])
        for i in range(count):
            pixels = np.clip(colour + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.{ext}", format=fmt)
    return root
