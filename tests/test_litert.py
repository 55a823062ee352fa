"""LiteRT and int8 exports are a contract: export, reload the way a phone client does, compare."""

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import MOBILENET_V2_WEIGHTS, _require, tiny_info, tiny_overrides

from tlkeras import litert
from tlkeras.config import ExportConfig, ModelConfig
from tlkeras.export import TOLERANCE, export_model

NAMES = ("ant", "bee", "wasp")
RNG = np.random.default_rng(0)
IMAGES = RNG.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
# The stock client's venv (mediapipe pins clash with TensorFlow's; docs/litert.md says how to make it).
MEDIAPIPE_PYTHON = Path(os.environ.get("TLKERAS_MEDIAPIPE_PYTHON", "/tmp/litert-mp/bin/python"))


def tiny_model(size: int = 32, resolution: int = 48):
    """VGG16 with random weights, resized in the graph (S=32 -> 48). Not MobileNetV2: with
    random weights and ImageNet-less BatchNorm statistics its features vanish (1e-12) and
    every image gets the same uniform probabilities, which would make every comparison pass."""
    from tlkeras.model import build_model

    cfg = ModelConfig(backbone="vgg16", weights=None, resolution=resolution, head_units=16)
    return build_model(cfg, tiny_info(size, NAMES))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, record): float and int8 exports of one model, int8 published (gate wide open)."""
    model = tiny_model()
    labels = model.predict(IMAGES, verbose=0).argmax(1)  # float accuracy 1: int8's is its agreement
    labels[:4] = (labels[:4] + 1) % len(NAMES)
    int8 = litert.Int8Data(IMAGES[:16], IMAGES, labels)
    base = tmp_path_factory.mktemp("export")
    return model, export_model(model, base, "bugs", IMAGES[:8], NAMES, 1.0, ExportConfig(int8_max_drop=100.0), int8)


def test_layout_and_record(exported):
    _, record = exported
    folder = Path(record["litert"]).parent
    assert folder.name == "1" and folder.parent == Path(record["savedmodel"]).parent.parent / "litert" / "bugs"
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "model.int8.tflite", "model.tflite"]
    assert record["litert_int8"] == str(folder / "model.int8.tflite")
    assert record["onnx_int8"] == str(Path(record["onnx"]).parent / "model.int8.onnx")
    assert record["litert_bytes"] == Path(record["litert"]).stat().st_size
    assert not list(folder.parent.glob(".tmp-*"))


@pytest.mark.parametrize("key", ["litert", "litert_int8"])
def test_builtin_ops_only_and_uint8_input(exported, key):
    from ai_edge_litert.interpreter import Interpreter

    path = exported[1][key]
    ops = litert.op_names(Path(path))
    assert not [op for op in ops if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")], ops
    assert {"CONV_2D", "RESIZE_BILINEAR", "SOFTMAX"} <= ops  # the resize stays in the graph
    it = Interpreter(model_path=path)
    (inp,), (out,) = it.get_input_details(), it.get_output_details()
    assert inp["dtype"] == np.uint8 and list(inp["shape_signature"]) == [-1, 32, 32, 3]
    assert list(inp["shape"]) == [1, 32, 32, 3]  # what single-image clients (MediaPipe) allocate
    assert out["dtype"] == np.float32 and list(out["shape_signature"]) == [-1, 3]
    assert it.get_signature_list() == {"serving_default": {"inputs": ["images"], "outputs": ["probabilities"]}}


@pytest.mark.parametrize("key", ["litert", "litert_int8"])
def test_labels_are_in_the_file_metadata(exported, key):
    meta = litert.read_metadata(Path(exported[1][key]).read_bytes())
    assert meta["identifier"] == "M001" and meta["name"] == "bugs" and meta["image_size"] == 32
    assert meta["labels_file"] == "labels.txt" and meta["labels_type"] == litert.AXIS_LABELS
    assert meta["class_names"] == NAMES == litert.read_labels(exported[1][key])


def test_float_litert_matches_keras_at_any_batch(exported):
    model, record = exported
    assert record["parity"]["litert"]["max_abs_diff"] <= TOLERANCE
    expected = model.predict(IMAGES, verbose=0)
    probs = litert.run_litert(Path(record["litert"]), IMAGES, chunk=5)  # batches of 5 and a last of 3
    assert probs.shape == (48, 3) and np.abs(probs - expected).max() <= TOLERANCE
    assert expected.std(0).mean() > 0.01  # the outputs differ from image to image


def test_int8_is_published_with_its_measured_accuracy(exported):
    model, record = exported
    gate = record["int8"]
    assert gate["split"] == "test" and gate["images"] == 48 and gate["calibration_images"] == 16
    for kind in ("litert", "onnx"):
        g = gate[kind]
        assert g["published"] and g["float_accuracy"] == pytest.approx(44 / 48, abs=1e-4)
        assert 0 <= g["top1_agreement"] <= 1 and g["drop_points"] == pytest.approx(
            100 * (g["float_accuracy"] - g["int8_accuracy"]), abs=0.01
        )
    assert gate["litert"]["bytes"] < record["litert_bytes"] / 3  # int8 weights


def test_gate_arithmetic_on_a_crafted_case():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    float_classes = labels.copy()
    int8 = np.eye(3)[labels]
    int8[0] = [0, 1, 0]  # one image of ten turns wrong: a 10-point drop
    g = litert.gate(float_classes, int8, labels, max_drop=1.0)
    assert g == {
        "float_accuracy": 1.0,
        "int8_accuracy": 0.9,
        "drop_points": 10.0,
        "top1_agreement": 0.9,
        "max_drop_points": 1.0,
        "published": False,
    }
    assert litert.gate(float_classes, int8, labels, max_drop=10.0)["published"]


def test_the_gate_refuses_int8_past_the_setting(tmp_path, caplog):
    model = tiny_model(resolution=32)
    labels = model.predict(IMAGES, verbose=0).argmax(1)
    options = ExportConfig(int8_max_drop=-101.0)  # no drop can be that negative: both refused
    with caplog.at_level(logging.WARNING, logger="tlkeras"):
        record = export_model(
            model, tmp_path, "bugs", IMAGES[:8], NAMES, 1.0, options, litert.Int8Data(IMAGES[:8], IMAGES, labels)
        )
    assert record["litert_int8"] is None and record["onnx_int8"] is None
    assert not record["int8"]["litert"]["published"] and not record["int8"]["onnx"]["published"]
    assert sorted(p.name for p in Path(record["litert"]).parent.iterdir()) == ["labels.txt", "model.tflite"]
    assert not (Path(record["onnx"]).parent / "model.int8.onnx").exists()
    (line,) = [r.getMessage() for r in caplog.records if "int8 not published" in r.getMessage()]
    assert "litert +" in line and "onnx +" in line and "48 test images" in line and "-101.0" in line


def test_options_turn_each_export_off(tmp_path):
    model = tiny_model(resolution=32)
    int8 = litert.Int8Data(IMAGES[:8], IMAGES[:8], np.zeros(8, np.int64))
    record = export_model(
        model, tmp_path, "bugs", IMAGES[:8], NAMES, 1.0, ExportConfig(litert=False, int8_onnx=False), int8
    )
    assert "litert" not in record and record["onnx_int8"] is None and "int8" not in record
    assert not (tmp_path / "litert" / "bugs" / "1").exists()


def test_predict_on_a_tflite(exported):
    from tlkeras import predict

    model, record = exported
    for given in (record["litert"], str(Path(record["litert"]).parent.parent)):  # the file, or the model folder
        assert predict.detect_backend(given) == "litert"
        probs, names = predict.predict(given, list(IMAGES[:3]))
        assert names == NAMES and np.abs(probs - model.predict(IMAGES[:3], verbose=0)).max() <= TOLERANCE
    probs, _ = predict.predict(record["litert_int8"], list(IMAGES[:3]))
    assert probs.shape == (3, 3)


def test_predict_cli_names_the_classes(exported, tmp_path, capsys):
    import tensorflow as tf

    from tlkeras import predict

    model, record = exported
    path = tmp_path / "a.png"
    path.write_bytes(tf.io.encode_png(IMAGES[0]).numpy())
    assert predict.main([str(path), "--model", record["litert"], "--top-k", "1"]) == 0
    best = NAMES[int(model.predict(IMAGES[:1], verbose=0).argmax())]
    assert capsys.readouterr().out.startswith(f"{path}: {best} ")


def test_predict_refuses_a_tflite_without_labels(tmp_path):
    from tlkeras.errors import UserError
    from tlkeras.predict import predict

    bare = tmp_path / "bare.tflite"
    bare.write_bytes(litert.convert(tiny_model()))
    with pytest.raises(UserError, match="carries no class names"):
        predict(str(bare), list(IMAGES[:1]))


def test_export_cli_adds_litert_to_a_finished_run(mock_cifar, tmp_path, capsys):
    from tlkeras import export
    from tlkeras.config import load_config
    from tlkeras.training import train_and_evaluate

    overrides = {"model.backbone": "mobilenet_v2", "finetune.epochs": "0", "finetune.unfreeze": "all"}
    train_and_evaluate(load_config(None, tiny_overrides(**overrides)), tmp_path)  # export off: no LiteRT yet
    assert not load_config(tmp_path / "config.yaml").export.litert  # the run's own setting: off
    assert json.loads((tmp_path / "summary.json").read_text())["exports"] == []
    argv = ["--run-dir", str(tmp_path), "--parity-images", "8", "--set", "export.litert=true"]
    assert export.main(argv) == 0
    out = capsys.readouterr().out
    (record,) = json.loads((tmp_path / "summary.json").read_text())["exports"]
    assert f"LiteRT: {record['litert']}" in out and "int8 litert: test accuracy" in out
    names = tuple(json.loads((tmp_path / "dataset.json").read_text())["class_names"])
    assert litert.read_metadata(Path(record["litert"]).read_bytes())["class_names"] == names
    assert record["int8"]["images"] == 24 and record["onnx_int8"] is None and "onnx" not in record["int8"]
    assert export.main(["--run-dir", str(tmp_path), "--set", "model.resolution=64"]) == 1
    assert "only export.* settings" in capsys.readouterr().err


def _mediapipe_venv() -> None:
    """The stock client's own venv (mediapipe's pins clash with TensorFlow's), made on first
    use from the package registry (about a minute, 650 MB); skips with pip's reason when
    it cannot be made (no network)."""
    if MEDIAPIPE_PYTHON.is_file():
        return
    venv = MEDIAPIPE_PYTHON.parent.parent
    try:
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        subprocess.run(
            [str(MEDIAPIPE_PYTHON), "-m", "pip", "install", "-q", "mediapipe==1.2.3"],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        reason = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1:]
        MEDIAPIPE_PYTHON.unlink(missing_ok=True)  # a half-made venv is not a client
        pytest.skip(f"could not make the MediaPipe venv at {venv} ({' '.join(reason)}); see docs/litert.md")


@pytest.mark.real
def test_stock_client_names_the_classes_of_real_photos(hymenoptera, tmp_path):
    """MediaPipe Tasks ImageClassifier, no tlkeras code, on real photos: names and Keras's top-1."""
    import tensorflow as tf

    from tlkeras.images import decode_file, fit_square
    from tlkeras.model import build_model

    _require([MOBILENET_V2_WEIGHTS])
    _mediapipe_venv()
    names = ("ants", "bees")
    model = build_model(
        ModelConfig(backbone="mobilenet_v2", weights=str(MOBILENET_V2_WEIGHTS), resolution=96, head_units=16),
        tiny_info(96, names),
    )
    files = (
        sorted((hymenoptera.folder / "val" / "bees").glob("*.jpg"))[:6]
        + sorted((hymenoptera.folder / "val" / "ants").glob("*.jpg"))[:6]
    )
    images = np.stack([fit_square(tf.constant(decode_file(f)), 96).numpy() for f in files])
    pngs = []
    for i, image in enumerate(images):  # the pixels Keras sees, losslessly: the client's resize is then identity
        pngs.append(tmp_path / f"{i}.png")
        pngs[-1].write_bytes(tf.io.encode_png(image).numpy())
    record = export_model(
        model,
        tmp_path / "export",
        "bugs",
        images,
        names,
        1.0,
        ExportConfig(int8_onnx=False),
        litert.Int8Data(images, images, model.predict(images, verbose=0).argmax(1)),
    )
    expected = [names[i] for i in model.predict(images, verbose=0).argmax(1)]
    for key in ("litert", "litert_int8"):
        if record[key] is None:  # int8 refused by the gate: the float file is still checked
            continue
        run = subprocess.run(
            [str(MEDIAPIPE_PYTHON), str(Path(__file__).with_name("stock_client.py")), record[key], *map(str, pngs)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-2000:]
        answers = [json.loads(line) for line in run.stdout.splitlines()]
        got = [a["name"] for a in answers]
        if key == "litert":
            assert got == expected
        else:  # int8 may flip a borderline image; the gate recorded how many
            assert set(got) <= set(names) and sum(g == e for g, e in zip(got, expected)) >= len(expected) - 2
