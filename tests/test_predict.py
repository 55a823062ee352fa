import numpy as np
import pytest
import tensorflow as tf
from conftest import CIFAR_NAMES, free_port, tiny_info

from tlkeras import predict as P


@pytest.fixture
def image_files(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (40, 40, 1), dtype=np.uint8)
    rgba = np.concatenate([rgb, np.full((32, 32, 1), 255, np.uint8)], axis=-1)
    files = {
        "small.png": tf.io.encode_png(rgb),
        "big.jpg": tf.io.encode_jpeg(big),
        "gray.png": tf.io.encode_png(gray),
        "alpha.png": tf.io.encode_png(rgba),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data.numpy())
    return {name: str(tmp_path / name) for name in files}, rgb


@pytest.fixture(scope="module")
def other_export(tmp_path_factory):
    """Another storage size and class count: 48x48, three named classes (one not ASCII)."""
    from tlkeras.config import ModelConfig
    from tlkeras.export import export_model
    from tlkeras.model import build_model

    info = tiny_info(48, ("ant", "bee", "café au lait"))
    model = build_model(ModelConfig(weights=None, resolution=48, head_units=8), info)
    images = np.random.default_rng(3).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    base = tmp_path_factory.mktemp("other")
    return model, base, export_model(model, base, "bugs", images, info.class_names)


def test_savedmodel_and_onnx_backends_agree_with_keras(tiny_export, image_files):
    model, base, record = tiny_export
    files, rgb = image_files
    good, bad = P.read_images(list(files.values()))
    assert not bad and list(good) == list(files.values())
    images = P.fit_batch(list(good.values()), 32)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], rgb)  # a 32x32 PNG arrives untouched
    np.testing.assert_array_equal(images[3], rgb)  # opaque alpha: colour kept
    assert (images[2][..., 0] == images[2][..., 1]).all()  # grayscale replicated to RGB
    ref = model.predict(images, verbose=0)
    for where in (str(base / "tlkeras"), record["onnx"]):
        probs, names = P.predict(where, list(good.values()))
        assert names == CIFAR_NAMES
        assert np.abs(probs - ref).max() <= 1e-4
        np.testing.assert_array_equal(probs.argmax(1), ref.argmax(1))


def test_cli_prints_names_read_from_the_model(other_export, image_files, capsys):
    model, base, record = other_export
    files, _ = image_files
    paths = list(files.values())
    for where in (str(base / "bugs"), record["onnx"]):
        assert P.main([*paths, "--model", where, "--top-k", "5"]) == 0  # at most the 3 classes
        lines = capsys.readouterr().out.strip().splitlines()
        assert len(lines) == 4
        good, _ = P.read_images(paths)
        probs = model.predict(P.fit_batch(list(good.values()), 48), verbose=0)
        for line, path, p in zip(lines, paths, probs):
            name, rest = line.split(": ")
            shown = rest.split(", ")
            assert name == path and len(shown) == 3
            top, probability = shown[0].rsplit(" ", 1)
            assert top == ("ant", "bee", "café au lait")[p.argmax()]
            # printed to 4 places from the export's float32 sums, which may round the other way
            assert float(probability) == pytest.approx(p.max(), abs=1.5e-4)


def test_backend_detection():
    assert P.detect_backend("http://localhost:8501/v1/models/tlkeras") == "rest"
    assert P.detect_backend("export/onnx/tlkeras/1/model.onnx") == "onnx"
    assert P.detect_backend("localhost:8500/tlkeras") == "grpc"
    assert P.detect_backend("runs/x/export/tlkeras") == "savedmodel"


def run_cli_error(capsys, args):
    code = P.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and "{{function_node" not in err[0]
    return err[0]


def test_bad_images_get_one_line_each_and_good_ones_an_answer(tiny_export, image_files, tmp_path, capsys):
    _, base, _ = tiny_export
    files, _ = image_files
    model = str(base / "tlkeras")
    good = tf.io.encode_png(np.zeros((32, 32, 3), np.uint8)).numpy()
    (tmp_path / "cut.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.txt").write_text("not an image")
    args = [
        files["small.png"],
        str(tmp_path / "cut.png"),
        str(tmp_path / "notes.txt"),
        str(tmp_path / "nope.png"),
        files["big.jpg"],
        "--model",
        model,
    ]
    assert P.main(args) == 1
    out, err = capsys.readouterr()
    assert [line.split(": ")[0] for line in out.strip().splitlines()] == [files["small.png"], files["big.jpg"]]
    errors = err.strip().splitlines()
    assert len(errors) == 3 and all(e.startswith("error: '") for e in errors)
    for e, path in zip(errors, ("cut.png", "notes.txt", "nope.png")):
        assert path in e and "Traceback" not in e and "function_node" not in e


def test_bad_models_are_one_line_errors(image_files, tmp_path, capsys):
    files, _ = image_files
    img = files["small.png"]
    assert "no SavedModel there" in run_cli_error(capsys, [img, "--model", str(tmp_path)])
    assert "no such ONNX file" in run_cli_error(capsys, [img, "--model", str(tmp_path / "m.onnx")])

    # A SavedModel with another input contract (float features) is refused by name.
    module = tf.Module()
    module.f = tf.function(
        lambda x: {"probabilities": x * 2.0}, input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")]
    )
    tf.saved_model.save(module, str(tmp_path / "other"), signatures={"serving_default": module.f})
    msg = run_cli_error(capsys, [img, "--model", str(tmp_path / "other")])
    assert "does not take uint8 images [batch, S, S, 3] named 'images'" in msg and "x: float32" in msg


def test_onnx_without_class_names_is_refused(tiny_export, image_files, tmp_path, capsys):
    import onnx

    _, _, record = tiny_export
    proto = onnx.load(record["onnx"])
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    msg = run_cli_error(capsys, [image_files[0]["small.png"], "--model", str(tmp_path / "bare.onnx")])
    assert "with class names" in msg


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
        P.main([files["small.png"], "--model", "x", "--top-k", "0"])
    assert e.value.code == 2


def test_a_batch_of_odd_images_gets_the_same_answers_from_savedmodel_and_onnx(tiny_export, tmp_path, capsys):
    """Phone photo turned by EXIF, transparency, GIF, BMP, 16-bit, CMYK: one answer each;
    truncated, WebP, text, empty: one clean line each. Both backends print the same."""
    import io

    from PIL import Image

    _, base, record = tiny_export
    rng = np.random.default_rng(5)
    photo = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)

    def save(name, image, fmt, **kw):
        buf = io.BytesIO()
        image.save(buf, fmt, **kw)
        (tmp_path / name).write_bytes(buf.getvalue())
        return str(tmp_path / name)

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    rgba = np.dstack([photo, np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None].repeat(48, 0)])
    good = [
        save("sideways.jpg", Image.fromarray(np.rot90(photo, 1)), "JPEG", exif=exif, quality=95),
        save("upright.jpg", Image.fromarray(photo), "JPEG", quality=95),
        save("alpha.png", Image.fromarray(rgba, "RGBA"), "PNG"),
        save("first.gif", Image.fromarray(photo).convert("P"), "GIF"),
        save("plain.bmp", Image.fromarray(photo), "BMP"),
        save("deep.png", Image.fromarray(photo[..., 0].astype(np.uint16) * 257), "PNG"),
        save("print.jpg", Image.fromarray(photo).convert("CMYK"), "JPEG"),
    ]
    bad = [save("web.webp", Image.fromarray(photo), "WEBP")]
    cut = (tmp_path / "upright.jpg").read_bytes()
    for name, data in (("cut.jpg", cut[: len(cut) // 2]), ("empty.png", b""), ("notes.txt", b"hello")):
        (tmp_path / name).write_bytes(data)
        bad.append(str(tmp_path / name))

    outputs = []
    for model in (str(base / "tlkeras"), record["onnx"]):
        assert P.main([*good, *bad, "--model", model, "--top-k", "2"]) == 1
        out, err = capsys.readouterr()
        assert [line.split(": ")[0] for line in out.strip().splitlines()] == good
        errors = err.strip().splitlines()
        assert len(errors) == len(bad) and all(e.startswith("error: '") for e in errors)
        assert not any("Traceback" in e or "function_node" in e for e in errors)
        outputs.append((out, err))
    assert outputs[0][1] == outputs[1][1]  # the same error lines
    parsed = [
        [
            [(n.rsplit(" ", 1)[0], float(n.rsplit(" ", 1)[1])) for n in line.split(": ")[1].split(", ")]
            for line in out.strip().splitlines()
        ]
        for out, _ in outputs
    ]
    for a, b in zip(*parsed):  # the same names, probabilities equal to print precision
        assert [n for n, _ in a] == [n for n, _ in b]
        assert max(abs(p - q) for (_, p), (_, q) in zip(a, b)) <= 2e-4
    # The sideways phone photo is read upright: the same pixels as the upright copy (JPEG aside).
    images, _ = P.read_images(good[:2])
    assert np.abs(images[good[0]].astype(int) - images[good[1]].astype(int)).mean() < 3


def test_an_onnx_folder_is_taken_like_a_savedmodel_folder(tiny_export, image_files, tmp_path, capsys):
    from pathlib import Path

    _, base, record = tiny_export
    files, _ = image_files
    folder = Path(record["onnx"]).parent.parent  # export/onnx/tlkeras: versions inside
    assert P.detect_backend(str(folder)) == "onnx"
    assert P.main([files["small.png"], "--model", str(folder)]) == 0
    by_folder = capsys.readouterr().out
    assert P.main([files["small.png"], "--model", record["onnx"]]) == 0
    assert capsys.readouterr().out == by_folder
    assert "no such folder" in run_cli_error(capsys, [files["small.png"], "--model", str(tmp_path / "tlkerass")])


# --- many files: streamed in bounded batches ---------------------------------------------


def many_files(folder, count):
    from PIL import Image

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(5)
    paths = []
    for i in range(count):
        path = folder / f"{i:04d}.png"
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def test_classify_files_decodes_and_answers_one_bounded_batch_at_a_time(tmp_path, monkeypatch):
    paths = many_files(tmp_path, 75)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    asked = [*paths[:40], str(tmp_path / "bad.png"), paths[3], *paths[40:]]  # a bad file, a path twice
    decoded, batches = [], []
    real = P.decode_file
    monkeypatch.setattr(P, "decode_file", lambda p, **kw: decoded.append(p) or real(p, **kw))

    def run(images):
        batches.append((len(images), len(decoded)))
        assert images.shape[1:] == (16, 16, 3)
        return np.tile(np.eye(2, dtype=np.float32)[:1], (len(images), 1)), ("a", "b")

    answers = []
    for path, probabilities, names, reason in P.classify_files(asked, (16, run), batch_size=32):
        answers.append(path)
        assert (reason is None) == (path != str(tmp_path / "bad.png"))
        if reason is None:
            assert names == ("a", "b") and probabilities.shape == (2,)
        else:
            assert probabilities is None and "bad.png" in reason
        assert len(answers) <= 32 * len(batches)  # answered as soon as its batch is known
    assert answers == asked  # one answer per argument, in order
    # 77 arguments, 32 at a time: the model saw 32, 31 (the bad one is out) and 13 images,
    # and no file of a batch was decoded before the previous batch was answered.
    assert batches == [(32, 32), (31, 64), (13, 77)]


def test_the_cli_prints_every_line_of_a_batch_before_decoding_the_next(tiny_export, tmp_path, monkeypatch, capsys):
    _, base, _ = tiny_export
    paths = many_files(tmp_path, 20)
    asked = [*paths, paths[0]]
    monkeypatch.setattr(P, "BATCH", 8)
    printed, seen = [], []
    real = P.decode_file

    def decode(path, **kw):
        printed.extend(capsys.readouterr().out.splitlines())
        seen.append(len(printed))
        return real(path, **kw)

    monkeypatch.setattr(P, "decode_file", decode)
    assert P.main([*asked, "--model", str(base / "tlkeras"), "--top-k", "2"]) == 0
    printed.extend(capsys.readouterr().out.splitlines())
    assert [line.split(": ")[0] for line in printed] == asked  # 21 lines: the repeated path twice
    assert seen[8] == 8 and seen[16] == 16  # a batch's lines were out before the next was decoded


def test_top_k_over_the_class_count_shows_all_with_a_note(other_export, image_files, capsys):
    _, base, _ = other_export
    files, _ = image_files
    assert P.main([files["small.png"], files["big.jpg"], "--model", str(base / "bugs"), "--top-k", "5"]) == 0
    out, err = capsys.readouterr()
    assert [len(line.split(": ")[1].split(", ")) for line in out.splitlines()] == [3, 3]
    assert err.strip() == "note: --top-k 5 is more than the model's 3 classes; showing all 3"  # once


def test_phone_photos_and_names_that_are_not_utf8(tiny_export, tmp_path, capsys):
    import os

    from PIL import Image

    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    _, base, _ = tiny_export
    pixels = np.random.default_rng(2).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    heic = tmp_path / "IMG_0001.HEIC"
    Image.fromarray(pixels).save(heic, "HEIF")
    latin = os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jfif")
    Image.fromarray(pixels).save(latin, "JPEG")
    assert P.main([str(heic), latin, "--model", str(base / "tlkeras")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{heic}: ") and out[1].startswith(f"{tmp_path}/caf\\xe9.jfif: ")
