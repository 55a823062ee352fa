"""Classify image files with an exported model, locally or through TF Serving.

    python -m tlkeras.predict cat.jpg dog.png --model runs/<run>/export/tlkeras
    python -m tlkeras.predict cat.jpg --model runs/<run>/export/onnx/tlkeras/1/model.onnx
    python -m tlkeras.predict cat.jpg --model runs/<run>/export/litert/tlkeras/1/model.tflite
    python -m tlkeras.predict cat.jpg --model http://localhost:8501/v1/models/tlkeras
    python -m tlkeras.predict cat.jpg --model localhost:8500/tlkeras --backend grpc

Files (JPEG, PNG, BMP, GIF, HEIC/HEIF, AVIF, known by their content whatever their name;
any size) are decoded as a viewer shows them (EXIF orientation applied, colour profiles
converted to sRGB, transparency on white) by the same function as training, then
centre-cropped and resized to the model's input size S as training and the SavedModel's
predict_bytes signature do, so every backend sees the same pixels. Class names and S are
read from the model itself.

Any number of files: they are decoded and classified BATCH at a time, each line printed as
soon as its batch is answered, so memory does not grow with the file count and an
interruption keeps every line already printed. One line per argument, in order (a file
given twice is answered twice); an unreadable file gets its error line and the rest go on.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tlkeras.errors import ArgumentParser, UserError, run_cli
from tlkeras.images import FILE_LIMITS, FORMAT_NAMES, IMAGE_EXTENSIONS, ImageError, decode_file, shown

BACKENDS = ("savedmodel", "onnx", "litert", "rest", "grpc")
BATCH = 32  # files decoded and classified at once: bounds memory whatever the file count
# A model: its input size S and a function from uint8 [n, S, S, 3] to (probabilities, names).
Runner = tuple[int, Callable[[np.ndarray], tuple[np.ndarray, tuple[str, ...]]]]


def read_images(paths: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({path: uint8 [H, W, 3]} for the readable files, {path: reason} for the others).

    Local files may be up to 64 MiB and 100 megapixels (images.FILE_LIMITS); what is sent
    to a server is already cropped and resized to the model's input size."""
    good, bad = {}, {}
    for path in paths:
        try:
            good[path] = decode_file(path, **FILE_LIMITS)  # local files: a 48 MP photo is fine
        except ImageError as e:
            bad[path] = str(e)
    return good, bad


def fit_batch(images: list[np.ndarray], size: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: each image through images.fit_square (crop, resize)."""
    import tensorflow as tf

    from tlkeras.images import fit_square

    return np.stack([fit_square(tf.constant(x), size).numpy() for x in images])


def onnx_file(model: str) -> Path | None:
    """An .onnx file, or the model.onnx of an ONNX version folder or of its highest version."""
    path = Path(model)
    if path.suffix == ".onnx" or not path.is_dir():
        return path
    from tlkeras.export import next_version

    for folder in (path, path / str(next_version(path) - 1)):  # a version, or its highest
        if (folder / "model.onnx").is_file():
            return folder / "model.onnx"
    return None


def detect_backend(model: str) -> str:
    if model.startswith(("http://", "https://")):
        return "rest"
    if model.endswith(".onnx") or (Path(model).is_dir() and onnx_file(model) is not None):
        return "onnx"
    from tlkeras.litert import litert_file

    if model.endswith(".tflite") or (Path(model).is_dir() and litert_file(model) is not None):
        return "litert"
    if model.startswith("grpc://") or (":" in model and not Path(model).exists()):
        return "grpc"
    return "savedmodel"


def savedmodel_dir(model: str) -> Path:
    """A version folder, or a TF Serving model folder whose highest version is used."""
    path = Path(model)
    if not path.exists():
        raise UserError(f"--model {model}: no such folder; pass an export folder such as runs/<run>/export/tlkeras")
    if (path / "saved_model.pb").is_file():
        return path
    from tlkeras.export import next_version

    latest = path / str(next_version(path) - 1)
    if (latest / "saved_model.pb").is_file():
        return latest
    raise UserError(
        f"--model {model}: no SavedModel there (no saved_model.pb, no numbered version "
        f"folder); pass an export folder such as runs/<run>/export/tlkeras"
    )


def wrong_contract(model: str, found: str) -> UserError:
    return UserError(
        f"--model {model} does not take uint8 images [batch, S, S, 3] named 'images' with "
        f"class names (it takes {found}); export it with python -m tlkeras.export"
    )


def _names(out: dict, model: str = "") -> tuple[str, ...]:
    if "class_names" not in out:
        raise wrong_contract(model, "outputs " + ", ".join(out))
    names = out["class_names"][0]
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def open_savedmodel(model: str) -> Runner:
    import tensorflow as tf

    fn = tf.saved_model.load(str(savedmodel_dir(model))).signatures.get("serving_default")
    specs = fn.structured_input_signature[1] if fn is not None else {}
    spec = specs.get("images")
    shape = spec.shape.as_list() if spec is not None else []
    if (
        spec is None
        or spec.dtype != tf.uint8
        or len(shape) != 4
        or shape[1] != shape[2]
        or shape[3] != 3
        or "class_names" not in fn.structured_outputs
    ):
        raise wrong_contract(model, ", ".join(f"{k}: {v.dtype.name} {v.shape}" for k, v in specs.items()))

    def run(images):
        out = {k: v.numpy() for k, v in fn(images=tf.constant(images)).items()}
        return out["probabilities"], _names(out)

    return shape[1], run


def open_onnx(model: str) -> Runner:
    from tlkeras.export import onnx_session

    path = onnx_file(model)
    if path is None or not path.is_file():
        raise UserError(
            f"--model {model}: no such ONNX file (pass a model.onnx, or its folder "
            f"such as runs/<run>/export/onnx/tlkeras)"
        )
    try:
        session = onnx_session(path)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf kinds
        raise UserError(f"--model {model} is not a loadable ONNX model ({str(e)[:150]})") from None
    inputs = session.get_inputs()
    meta = session.get_modelmeta().custom_metadata_map
    shape = inputs[0].shape if len(inputs) == 1 else []
    if (
        len(inputs) != 1
        or inputs[0].name != "images"
        or inputs[0].type != "tensor(uint8)"
        or len(shape) != 4
        or not isinstance(shape[1], int)
        or "class_names" not in meta
    ):
        raise wrong_contract(model, ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs))
    names = tuple(json.loads(meta["class_names"]))
    width = session.get_outputs()[0].shape[-1]
    if isinstance(width, int) and width != len(names):
        raise UserError(f"--model {model} has {width} outputs but {len(names)} class names in its metadata")

    def run(images):
        return session.run(["probabilities"], {"images": images})[0], names

    return shape[1], run


def open_rest(model: str) -> Runner:
    from tlkeras.serving import input_size_rest, predict_rest

    def run(images):
        out = predict_rest(model, images=images)
        return out["probabilities"], _names(out, model)

    return input_size_rest(model), run


def open_grpc(model: str) -> Runner:
    from tlkeras.serving import input_size_grpc, predict_grpc

    target, _, name = model.removeprefix("grpc://").partition("/")
    name = name or "tlkeras"

    def run(images):
        out = predict_grpc(target, name, images=images)
        return out["probabilities"], _names(out, model)

    return input_size_grpc(target, name), run


def open_model(model: str, backend: str | None = None) -> Runner:
    """(S, run) for a SavedModel folder, an .onnx file, a REST URL or grpc host:port/name."""
    from tlkeras.litert import open_litert

    opener = {
        "savedmodel": open_savedmodel,
        "onnx": open_onnx,
        "litert": open_litert,
        "rest": open_rest,
        "grpc": open_grpc,
    }
    return opener[backend or detect_backend(model)](model)


def predict(model: str, images: list[np.ndarray], backend: str | None = None) -> tuple[np.ndarray, tuple[str, ...]]:
    """(probabilities float32 [n, C], class names) for decoded uint8 [H, W, 3] images."""
    size, run = open_model(model, backend)
    return run(fit_batch(images, size))


def classify_files(
    paths: list[str], runner: Runner, batch_size: int = BATCH
) -> Iterator[tuple[str, np.ndarray | None, tuple[str, ...], str | None]]:
    """(path, probabilities [C] or None, class names, error or None) for each path, in order,
    `batch_size` files at a time.

    Each file is decoded (images.decode_file, 64 MiB / 100 megapixels at most) and at once
    cropped and resized to S, so at most one full-size image and `batch_size` S x S images
    are held whatever the number of files; a batch's answers are yielded as soon as the
    model has answered it. A file that cannot be read yields its reason and the rest go on.
    """
    import tensorflow as tf

    from tlkeras.images import fit_square

    size, run = runner
    names: tuple[str, ...] = ()
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        squares, reasons = [], []
        for path in chunk:
            try:
                squares.append(fit_square(tf.constant(decode_file(path, **FILE_LIMITS)), size).numpy())
                reasons.append(None)
            except ImageError as e:
                reasons.append(str(e))
        rows = iter(())
        if squares:
            probabilities, names = run(np.stack(squares))
            rows = iter(probabilities)
        for path, reason in zip(chunk, reasons):
            yield path, (None if reason else next(rows)), names, reason


def top_k(probabilities: np.ndarray, names: tuple[str, ...], k: int) -> list[list[tuple[str, float]]]:
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(names[i], float(p[i])) for i in row] for row, p in zip(order, probabilities)]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.predict", description=__doc__.split("\n")[0])
    parser.add_argument(
        "images",
        nargs="+",
        help=f"image files, any size and number ({FORMAT_NAMES}: {' '.join(IMAGE_EXTENSIONS)} or any name)",
    )
    parser.add_argument(
        "--model", required=True, help="SavedModel folder, .onnx or .tflite file, REST URL or grpc host:port/name"
    )
    parser.add_argument("--backend", choices=BACKENDS, help="default: guessed from --model")
    parser.add_argument(
        "--top-k",
        type=int,
        help="classes to show per image (default 3, or all if fewer; more than the model has: all, with a note)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors and library logs")
    args = parser.parse_args(argv)
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"--top-k {args.top_k} must be 1 or more")
    from tlkeras.console import quiet_libraries

    quiet_libraries(args.debug)

    def run() -> int:
        failed, noted = False, False
        runner = open_model(args.model, args.backend)
        for path, probabilities, names, reason in classify_files(args.images, runner, BATCH):
            if reason is not None:  # one line per unreadable file; the others are answered
                print(f"error: {reason}", file=sys.stderr, flush=True)
                failed = True
                continue
            if args.top_k is not None and args.top_k > len(names) and not noted:
                print(
                    f"note: --top-k {args.top_k} is more than the model's {len(names)} classes; "
                    f"showing all {len(names)}",
                    file=sys.stderr,
                    flush=True,
                )
                noted = True
            (best,) = top_k(probabilities[np.newaxis], names, args.top_k or 3)
            print(f"{shown(path)}: " + ", ".join(f"{name} {p:.4f}" for name, p in best), flush=True)
        return 1 if failed else 0

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
