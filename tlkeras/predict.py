"""Classify JPEG/PNG images with an exported model, locally or through TF Serving.

    python -m tlkeras.predict cat.jpg dog.png --model runs/<run>/export/tlkeras
    python -m tlkeras.predict cat.jpg --model runs/<run>/export/onnx/tlkeras/1/model.onnx
    python -m tlkeras.predict cat.jpg --model http://localhost:8501/v1/models/tlkeras
    python -m tlkeras.predict cat.jpg --model localhost:8500/tlkeras --backend grpc

Images of any size are decoded and resized to 32x32 exactly as the SavedModel's
predict_bytes signature does, so every backend sees the same pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from tlkeras import CLASS_NAMES
from tlkeras.errors import UserError, run_cli

BACKENDS = ("savedmodel", "onnx", "rest", "grpc")


def read_images(paths: list[str]) -> np.ndarray:
    import tensorflow as tf

    from tlkeras.export import decode_image

    images = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise UserError(f"cannot read image '{path}': {e.strerror}") from None
        try:
            images.append(decode_image(tf.constant(data)).numpy())
        except tf.errors.InvalidArgumentError as e:
            reason = e.message.splitlines()[0][:120]
            raise UserError(
                f"'{path}' is not a readable JPEG or PNG image ({reason}); pass .jpg or .png files"
            ) from None
    return np.stack(images)


def detect_backend(model: str) -> str:
    if model.startswith(("http://", "https://")):
        return "rest"
    if model.endswith(".onnx"):
        return "onnx"
    if model.startswith("grpc://") or (":" in model and not Path(model).exists()):
        return "grpc"
    return "savedmodel"


def savedmodel_dir(model: str) -> Path:
    """A version folder, or a TF Serving model folder whose highest version is used."""
    path = Path(model)
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
        f"--model {model} does not take uint8 images [batch, 32, 32, 3] named 'images' "
        f"(it takes {found}); export it with python -m tlkeras.export"
    )


def run_savedmodel(model: str, images: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    path = savedmodel_dir(model)
    fn = tf.saved_model.load(str(path)).signatures.get("serving_default")
    specs = fn.structured_input_signature[1] if fn is not None else {}
    spec = specs.get("images")
    if spec is None or spec.dtype != tf.uint8 or spec.shape.as_list()[1:] != [32, 32, 3]:
        raise wrong_contract(model, ", ".join(f"{k}: {v.dtype.name} {v.shape}" for k, v in specs.items()))
    return fn(images=tf.constant(images))["probabilities"].numpy()


def run_onnx(model: str, images: np.ndarray) -> np.ndarray:
    from tlkeras.export import onnx_session

    if not Path(model).is_file():
        raise UserError(f"--model {model}: no such ONNX file")
    try:
        session = onnx_session(model)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf kinds
        raise UserError(f"--model {model} is not a loadable ONNX model ({str(e)[:150]})") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)":
        raise wrong_contract(model, ", ".join(f"{i.name}: {i.type} {i.shape}" for i in inputs))
    return session.run(["probabilities"], {"images": images})[0]


def run_grpc(model: str, images: np.ndarray) -> np.ndarray:
    from tlkeras.serving import predict_grpc

    target, _, name = model.removeprefix("grpc://").partition("/")
    return predict_grpc(target, name or "tlkeras", images=images)


def predict(model: str, images: np.ndarray, backend: str | None = None) -> np.ndarray:
    backend = backend or detect_backend(model)
    if backend == "rest":
        from tlkeras.serving import predict_rest

        return predict_rest(model, images=images)
    run = {"savedmodel": run_savedmodel, "onnx": run_onnx, "grpc": run_grpc}[backend]
    return run(model, images)


def top_k(probabilities: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(CLASS_NAMES[i], float(p[i])) for i in row] for row, p in zip(order, probabilities)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tlkeras.predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="JPEG or PNG files, any size")
    parser.add_argument("--model", required=True,
                        help="SavedModel folder, .onnx file, REST URL or grpc host:port/name")  # fmt: skip
    parser.add_argument("--backend", choices=BACKENDS, help="default: guessed from --model")
    parser.add_argument("--top-k", type=int, default=3, help="classes to show per image")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    if not 1 <= args.top_k <= len(CLASS_NAMES):
        parser.error(f"--top-k {args.top_k} must be between 1 and {len(CLASS_NAMES)}")

    def run() -> None:
        probabilities = predict(args.model, read_images(args.images), args.backend)
        for path, best in zip(args.images, top_k(probabilities, args.top_k)):
            print(f"{path}: " + ", ".join(f"{name} {p:.4f}" for name, p in best))

    return run_cli(run, args.debug)


if __name__ == "__main__":
    sys.exit(main())
