"""Export is a contract: export, reload the way each consumer does, compare with Keras."""

import subprocess
import sys
from unittest import mock

import numpy as np
import onnx
import pytest
import tensorflow as tf
from conftest import CIFAR_NAMES, tiny_info

from tlkeras import export
from tlkeras.images import decode_in_graph, fit_square

RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def exported(tiny_export):
    return tiny_export


def encode(image: np.ndarray, fmt: str) -> bytes:
    enc = tf.io.encode_png if fmt == "png" else tf.io.encode_jpeg
    return enc(image).numpy()


def test_layout_is_tf_serving_versioned_and_complete(exported):
    _, base, record = exported
    version = base / "tlkeras" / "1"
    assert record["version"] == 1 and record["savedmodel"] == str(version)
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    for root in (base / "tlkeras", base / "onnx" / "tlkeras"):
        assert all(p.name.isdigit() for p in root.iterdir())  # no temporary folder left


def test_weights_are_stored_once(exported):
    model, base, _ = exported
    params = sum(int(np.prod(w.shape)) for w in model.weights)
    variables = sum(p.stat().st_size for p in (base / "tlkeras" / "1" / "variables").iterdir())
    assert variables < 1.05 * 4 * params  # twice would be 2x


def test_signature_contract(exported):
    _, base, _ = exported
    loaded = tf.saved_model.load(str(base / "tlkeras" / "1"))
    sig = loaded.signatures["serving_default"]
    (spec,) = sig.structured_input_signature[1].values()
    assert spec.name == "images" and spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 32, 32, 3]
    outs = sig.structured_outputs
    assert outs["probabilities"].dtype == tf.float32 and outs["probabilities"].shape.as_list() == [None, 10]
    assert outs["classes"].dtype == tf.int64
    assert outs["labels"].dtype == tf.string and outs["labels"].shape.as_list() == [None]
    assert outs["class_names"].dtype == tf.string and outs["class_names"].shape.as_list() == [None, 10]
    (bspec,) = loaded.signatures["predict_bytes"].structured_input_signature[1].values()
    assert bspec.name == "image_bytes" and bspec.dtype == tf.string


@pytest.mark.parametrize("batch", [1, 5])
def test_tf1_session_and_onnx_match_keras_at_any_batch(exported, batch):
    model, base, record = exported
    x = RNG.integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8)
    ref = model.predict(x, verbose=0)
    tf1 = export.run_tf1_session(base / "tlkeras" / "1", x)
    ort = export.run_onnx(base / "onnx" / "tlkeras" / "1" / "model.onnx", x)
    for out in (tf1, ort):
        assert np.abs(out["probabilities"] - ref).max() <= 1e-4
        np.testing.assert_array_equal(out["classes"], ref.argmax(1))
    assert record["parity"]["savedmodel"]["identical_classes"]


def test_onnx_model_is_valid_opset_17_with_dynamic_batch(exported):
    _, base, _ = exported
    m = onnx.load(str(base / "onnx" / "tlkeras" / "1" / "model.onnx"))
    onnx.checker.check_model(m)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = m.graph.input
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert not inp.type.tensor_type.shape.dim[0].HasField("dim_value")  # dynamic batch
    assert sorted(o.name for o in m.graph.output) == ["classes", "probabilities"]


def test_saved_model_cli_runs_it(exported, tmp_path):
    _, base, _ = exported
    np.save(tmp_path / "x.npy", np.full((2, 32, 32, 3), 128, np.uint8))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tensorflow.python.tools.saved_model_cli",
            "run",
            "--dir",
            str(base / "tlkeras" / "1"),
            "--tag_set",
            "serve",
            "--signature_def",
            "serving_default",
            "--inputs",
            f"images={tmp_path / 'x.npy'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "probabilities" in out.stdout and "classes" in out.stdout


def test_warmup_records_are_prediction_logs(exported):
    from tensorflow_serving.apis import prediction_log_pb2

    _, base, _ = exported
    path = base / "tlkeras" / "1" / "assets.extra" / "tf_serving_warmup_requests"
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(str(path))]
    assert len(logs) == 2
    request = logs[1].predict_log.request
    assert request.model_spec.name == "tlkeras"
    assert request.model_spec.signature_name == "serving_default"
    batch = tf.make_ndarray(request.inputs["images"])
    assert batch.dtype == np.uint8 and batch.shape == (8, 32, 32, 3)


def test_bytes_signature_decodes_png_and_jpeg_like_raw_pixels(exported):
    _, base, _ = exported
    loaded = tf.saved_model.load(str(base / "tlkeras" / "1"))
    raw = loaded.signatures["serving_default"](images=tf.constant(IMAGES[:2]))
    png = [encode(IMAGES[0], "png"), encode(IMAGES[1], "png")]
    by_png = loaded.signatures["predict_bytes"](image_bytes=tf.constant(png))
    np.testing.assert_allclose(by_png["probabilities"], raw["probabilities"], atol=1e-6)  # lossless

    big = np.kron(IMAGES[2], np.ones((3, 3, 1), np.uint8))  # a 96x96 JPEG, resized in-graph
    by_jpeg = loaded.signatures["predict_bytes"](image_bytes=tf.constant([encode(big, "jpeg")]))
    expected = decode_in_graph(tf.constant(encode(big, "jpeg")), 32)
    ref = loaded.signatures["serving_default"](images=expected[None])
    np.testing.assert_allclose(by_jpeg["probabilities"], ref["probabilities"], atol=1e-6)


def test_bytes_signature_refuses_oversized_and_non_images(exported):
    _, base, _ = exported
    fn = tf.saved_model.load(str(base / "tlkeras" / "1")).signatures["predict_bytes"]
    png = bytearray(encode(IMAGES[0], "png"))
    png[16:24] = (20000).to_bytes(4, "big") + (20000).to_bytes(4, "big")  # claims 20000x20000
    with pytest.raises(tf.errors.InvalidArgumentError, match="over the 4096x4096 limit"):
        fn(image_bytes=tf.constant([bytes(png)]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, BMP or GIF"):
        fn(image_bytes=tf.constant([b"RIFF\x10\0\0\0WEBPVP8 not really"]))


def test_next_export_takes_the_next_version_and_keeps_the_old(exported):
    from tlkeras.predict import savedmodel_dir

    model, base, _ = exported
    before = (base / "tlkeras" / "1" / "saved_model.pb").read_bytes()
    latest = export.next_version(base / "tlkeras") - 1
    # What a killed export leaves: a hidden, non-numeric folder that no reader takes.
    stale = base / "tlkeras" / f".tmp-{latest + 1}-999999999"
    (stale / "variables").mkdir(parents=True)
    (stale / "saved_model.pb").write_bytes(b"half")
    assert savedmodel_dir(str(base / "tlkeras")) == base / "tlkeras" / str(latest)
    assert export.next_version(base / "tlkeras") == latest + 1

    record = export.export_model(model, base, "tlkeras", IMAGES, CIFAR_NAMES)
    assert record["version"] == latest + 1
    assert (base / "tlkeras" / str(latest + 1) / "saved_model.pb").is_file()
    assert not stale.exists()  # cleaned up by the next export
    assert (base / "tlkeras" / "1" / "saved_model.pb").read_bytes() == before


def test_failed_parity_publishes_nothing(exported):
    model, base, _ = exported
    before = sorted(p.name for p in (base / "tlkeras").iterdir())
    onnx_before = sorted(p.name for p in (base / "onnx" / "tlkeras").iterdir())

    real_run_onnx = export.run_onnx

    def skewed(path, images):
        out = real_run_onnx(path, images)
        out["probabilities"] = out["probabilities"] + 1e-3
        return out

    with mock.patch.object(export, "run_onnx", skewed):
        with pytest.raises(export.ExportError, match="ONNX disagrees .* nothing was published"):
            export.export_model(model, base, "tlkeras", IMAGES, CIFAR_NAMES)
    assert sorted(p.name for p in (base / "tlkeras").iterdir()) == before
    assert sorted(p.name for p in (base / "onnx" / "tlkeras").iterdir()) == onnx_before


def test_labels_and_class_names_come_out_of_every_savedmodel_path(exported):
    model, base, record = exported
    x = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    expected = [CIFAR_NAMES[i] for i in model.predict(x, verbose=0).argmax(1)]
    tf1 = export.run_tf1_session(base / "tlkeras" / "1", x)  # as TF Serving loads it
    assert [b.decode() for b in tf1["labels"]] == expected
    assert [b.decode() for b in tf1["class_names"][1]] == list(CIFAR_NAMES)
    assert "class_names" not in record and record["image_size"] == 32  # the names live in the files


def test_onnx_carries_class_names_and_size(exported):
    import json

    _, base, _ = exported
    folder = base / "onnx" / "tlkeras" / "1"
    meta = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == list(CIFAR_NAMES) and meta["image_size"] == "32"
    assert (folder / "labels.txt").read_text().splitlines() == list(CIFAR_NAMES)


def test_export_contract_at_another_size_and_class_count(tmp_path):
    from tlkeras.config import ModelConfig
    from tlkeras.model import build_model

    names = ("daisy", "dandelion", "rose", "sunflower", "tulip")
    model = build_model(ModelConfig(weights=None, resolution=32, head_units=8), tiny_info(40, names))
    x = RNG.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    record = export.export_model(model, tmp_path, "flowers", x, names)
    assert record["parity"]["onnx"]["identical_classes"] and record["parity"]["savedmodel"]["identical_classes"]
    loaded = tf.saved_model.load(record["savedmodel"])
    (spec,) = loaded.signatures["serving_default"].structured_input_signature[1].values()
    assert spec.shape.as_list() == [None, 40, 40, 3]
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    assert out["probabilities"].shape == (6, 5)
    ref = model.predict(x, verbose=0)
    assert [b.decode() for b in out["labels"].numpy()] == [names[i] for i in ref.argmax(1)]
    onnx_out = export.run_onnx(record["onnx"], x)
    assert np.abs(onnx_out["probabilities"] - ref).max() <= 1e-4
    # Any file through predict_bytes: decoded and fitted to 40x40 in the graph.
    big = np.kron(x[0], np.ones((2, 2, 1), np.uint8))[:, :70]  # 80x70: cropped, then resized
    by_bytes = loaded.signatures["predict_bytes"](image_bytes=tf.constant([encode(big, "png")]))
    fitted = fit_square(tf.constant(big), 40)[None]
    by_pixels = loaded.signatures["serving_default"](images=fitted)
    np.testing.assert_allclose(by_bytes["probabilities"], by_pixels["probabilities"], atol=1e-6)
    assert by_bytes["labels"].numpy().tolist() == by_pixels["labels"].numpy().tolist()
