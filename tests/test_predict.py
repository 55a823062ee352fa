
import numpy as np
import pytest
import tensorflow as tf

from conftest import free_port
from tlkeras import predict as P


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 100, np.uint8)], axis=-1)
    files = {
        "small.png": tf.io.encode_png(rgb), "big.jpg": tf.io.encode_jpeg(big),
        "gray.png": tf.io.encode_png(gray), "alpha.png": tf.io.encode_png(rgba),
    }  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data.numpy())
    return {name: str(tmp_path / name) for name in files}, rgb


def test_savedmodel_and_onnx_backends_agree_with_keras(tiny_export, image_files):
    model, base, record = tiny_export
    files, rgb = image_files
    images = P.read_images(list(files.values()))
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], rgb)  # a 32x32 PNG arrives untouched
    np.testing.assert_array_equal(images[3], rgb)  # alpha dropped, colour kept
    assert (images[2][..., 0] == images[2][..., 1]).all()  # grayscale replicated to RGB
    ref = model.predict(images, verbose=0)
    by_sm = P.predict(str(base / "tlkeras"), images)
    by_onnx = P.predict(record["onnx"], images)
    for probs in (by_sm, by_onnx):
        assert np.abs(probs - ref).max() <= 1e-4
        np.testing.assert_array_equal(probs.argmax(1), ref.argmax(1))


def test_cli_prints_top_k_per_image(tiny_export, image_files, capsys):
    model, base, record = tiny_export
    files, _ = image_files
    paths = list(files.values())
    assert P.main([*paths, "--model", str(base / "tlkeras"), "--top-k", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    probs = P.predict(record["onnx"], P.read_images(paths))
    for line, path, p in zip(lines, paths, probs):
        name, rest = line.split(": ")
        assert name == path and len(rest.split(", ")) == 2
        assert rest.split(", ")[0] == f"{P.CLASS_NAMES[p.argmax()]} {p.max():.4f}"


def test_backend_detection():
    assert P.detect_backend("http://localhost:8501/v1/models/tlkeras") == "rest"
    assert P.detect_backend("export/onnx/tlkeras/1/model.onnx") == "onnx"
    assert P.detect_backend("localhost:8500/tlkeras") == "grpc"
    assert P.detect_backend("runs/x/export/tlkeras") == "savedmodel"


def run_cli_error(capsys, args):
    code = P.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_images_are_one_line_errors(tiny_export, tmp_path, capsys):
    _, base, _ = tiny_export
    model = str(base / "tlkeras")
    good = tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    assert "'" + str(tmp_path / "cut.png") + "' is not a readable JPEG or PNG" in run_cli_error(
        capsys, [str(tmp_path / "cut.png"), "--model", model])
    assert "notes.txt' is not a readable JPEG or PNG image (image is not a JPEG or PNG file)" in run_cli_error(
        capsys, [str(tmp_path / "notes.txt"), "--model", model])
    assert "cannot read image" in run_cli_error(capsys, [str(tmp_path / "nope.png"), "--model", model])


def test_bad_models_are_one_line_errors(image_files, tmp_path, capsys):
    files, _ = image_files
    img = files["small.png"]
    assert "no SavedModel there" in run_cli_error(capsys, [img, "--model", str(tmp_path)])
    assert "no such ONNX file" in run_cli_error(capsys, [img, "--model", str(tmp_path / "m.onnx")])

    # A SavedModel with another input contract (float features) is refused by name.
    module = tf.Module()
    module.f = tf.function(lambda x: {"probabilities": x * 2.0},
                           input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])  # fmt: skip
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"serving_default": module.f})
    msg = run_cli_error(capsys, [img, "--model", str(tmp_path / "other")])
    assert "does not take uint8 images [batch, 32, 32, 3] named 'images'" in msg and "x: float32" in msg


def test_unreachable_servers_fail_fast_with_a_hint(image_files, capsys):
    files, _ = image_files
    port = free_port()  # nothing listens there
    msg = run_cli_error(capsys, [files["small.png"], "--model", f"http://127.0.0.1:{port}/v1/models/tlkeras"])
    assert f"no TF Serving REST API at http://127.0.0.1:{port}" in msg
    msg = run_cli_error(capsys, [files["small.png"], "--model", f"127.0.0.1:{port}/tlkeras", "--backend", "grpc"])
    assert f"no TF Serving gRPC API at 127.0.0.1:{port}" in msg


def test_wrong_top_k_is_refused(image_files):
    files, _ = image_files
    with pytest.raises(SystemExit) as e:
        P.main([files["small.png"], "--model", "x", "--top-k", "11"])
    assert e.value.code == 2
