"""Shared fixtures: two logical CPUs (for MirroredStrategy), mocked and real data."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Must happen before TensorFlow initialises its devices, hence at import time of conftest.
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

ASSETS = Path(os.environ.get("TLKERAS_ASSETS", Path(__file__).resolve().parents[2] / "shared" / "assets"))
WEIGHTS = ASSETS / "vgg16" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
TFDS_DIR = ASSETS / "tensorflow_datasets"


@pytest.fixture
def assets() -> SimpleNamespace:
    """The real VGG16 weights and CIFAR-10; CI sets TLKERAS_REQUIRE_ASSETS=1 so absence fails."""
    missing = [p for p in (WEIGHTS, TFDS_DIR / "cifar10") if not p.exists()]
    if missing:
        reason = f"real assets not found: {', '.join(map(str, missing))} (set TLKERAS_ASSETS)"
        if os.environ.get("TLKERAS_REQUIRE_ASSETS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return SimpleNamespace(weights=WEIGHTS, tfds_dir=TFDS_DIR)


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
        "model.weights": "null", "model.image_size": "32", "model.head_units": "16",
        "data.batch_size": "8", "data.shuffle_buffer": "32", "head.epochs": "1",
        "finetune.epochs": "1", "finetune.unfreeze": "block5", "export.enabled": "false",
    }  # fmt: skip
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """A random-weight model exported once: (keras model, export base, export record)."""
    import numpy as np

    from tlkeras.config import ModelConfig
    from tlkeras.export import export_model
    from tlkeras.model import build_model

    base = tmp_path_factory.mktemp("export")
    model = build_model(ModelConfig(weights=None, image_size=32, head_units=16))
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    return model, base, export_model(model, base, "tlkeras", images)
