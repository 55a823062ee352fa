import keras
import numpy as np
import pytest

from tlkeras.config import ModelConfig
from tlkeras.errors import UserError
from tlkeras.model import VGG16Preprocess, build_model, set_finetune_trainable, split_at_features

TINY = ModelConfig(weights=None, image_size=32, head_units=16)


def n_trainable(model):
    return sum(int(np.prod(v.shape)) for v in model.trainable_weights)


def test_takes_uint8_and_returns_float32_probabilities():
    model = build_model(TINY)
    x = np.random.randint(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    p = model.predict(x, verbose=0)
    assert model.input.dtype == "uint8"
    assert p.shape == (3, 10) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_preprocess_matches_keras_vgg16_transform():
    x = np.random.randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ours = VGG16Preprocess()(x)
    ref = keras.applications.vgg16.preprocess_input(x.astype("float32"))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), ref, atol=1e-4)
    assert ours.dtype == "float32"


def test_resize_inside_model():
    model = build_model(ModelConfig(weights=None, image_size=48, head_units=16))
    assert model.get_layer("resize").output.shape[1:3] == (48, 48)
    assert model.get_layer("vgg16").input.shape[1:3] == (48, 48)


def test_phase1_trains_only_the_head():
    model = build_model(TINY)
    head = 2 * 512 + 512 * 16 + 16 + 16 * 10 + 10  # LayerNorm, Dense, Dense
    assert n_trainable(model) == head


@pytest.mark.parametrize(
    "unfreeze, base_params",
    [("all", 14_714_688), ("block5", 3 * (3 * 3 * 512 * 512 + 512)),
     ("block5_conv3", 3 * 3 * 512 * 512 + 512)],
)
def test_finetune_unfreezes_from_the_named_layer(unfreeze, base_params):
    model = build_model(TINY)
    head = n_trainable(model)
    set_finetune_trainable(model, unfreeze)
    assert n_trainable(model) == head + base_params


def test_recompile_after_unfreeze_trains_the_base():
    model = build_model(TINY)
    model.compile("adam", "sparse_categorical_crossentropy")
    x = np.random.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    y = np.arange(4)
    conv = model.get_layer("vgg16").get_layer("block5_conv3").kernel
    before = keras.ops.convert_to_numpy(conv).copy()
    model.train_on_batch(x, y)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(conv), before)  # frozen
    set_finetune_trainable(model, "block5")
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.train_on_batch(x, y)
    assert not np.array_equal(keras.ops.convert_to_numpy(conv), before)


def test_saved_model_reloads_with_registered_layer(tmp_path):
    model = build_model(TINY)
    x = np.random.randint(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    model.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras")  # safe_mode stays on
    np.testing.assert_allclose(again.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_missing_weights_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"model.weights=.*nope.h5.*no such file"):
        build_model(ModelConfig(weights=str(tmp_path / "nope.h5"), image_size=32))


def test_truncated_or_wrong_weights_file_is_a_user_error(tmp_path):
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(UserError, match="could not be loaded as VGG16"):
        build_model(ModelConfig(weights=str(bad), image_size=32))
    other = tmp_path / "other.weights.h5"
    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]).save_weights(other)
    with pytest.raises(UserError, match="could not be loaded as VGG16"):
        build_model(ModelConfig(weights=str(other), image_size=32))


def test_real_imagenet_weights_load_from_a_path(assets):
    model = build_model(ModelConfig(weights=str(assets.weights), image_size=32))
    kernel = keras.ops.convert_to_numpy(model.get_layer("vgg16").get_layer("block1_conv1").kernel)
    assert kernel.shape == (3, 3, 3, 64)
    assert 0.1 < np.abs(kernel).max() < 2.0 and np.abs(kernel).std() > 0.05


def test_split_at_features_composes_to_the_model_and_trains_its_head():
    model = build_model(TINY)
    extractor, head = split_at_features(model)
    x = np.random.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    features = extractor.predict(x, verbose=0)
    assert features.shape == (4, 512)
    np.testing.assert_allclose(head.predict(features, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    base_before = [w.copy() for w in model.get_layer("vgg16").get_weights()]
    dense_before = model.get_layer("head_dense").get_weights()[0].copy()
    head.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    head.fit(features, np.arange(4), epochs=2, verbose=0)
    # The head's layers are the model's: training one trains the other; the base is untouched.
    assert not np.allclose(model.get_layer("head_dense").get_weights()[0], dense_before)
    for a, b in zip(model.get_layer("vgg16").get_weights(), base_before):
        np.testing.assert_array_equal(a, b)
