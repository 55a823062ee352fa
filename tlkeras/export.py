"""Export a trained run as a TF Serving SavedModel and an ONNX model, verified first.

    python -m tlkeras.export --run-dir runs/<run> [--base DIR] [--name tlkeras]

Layout (TF Serving polls <base>/<name> and loads the highest integer version):

    <base>/<name>/<version>/saved_model.pb, variables/, assets.extra/tf_serving_warmup_requests
    <base>/onnx/<name>/<version>/model.onnx, labels.txt (and model.int8.onnx)
    <base>/litert/<name>/<version>/model.tflite, labels.txt (and model.int8.tflite)

LiteRT and int8: tlkeras.litert (docs/litert.md); their settings are export.*, which
--set changes for this export (e.g. --set export.int8_max_drop=2).

Both are built in hidden temporary siblings, checked against the Keras model (parity
gate), and only then renamed into place; a failed export publishes nothing.

Contract (stable names; S is the run's storage size, C its class count):
  serving_default  images: uint8 [batch, S, S, 3]  ->  probabilities: float32 [batch, C],
                   classes: int64 [batch], labels: string [batch] (the predicted class name),
                   class_names: string [batch, C] (every name, in class-index order)
  predict_bytes    image_bytes: string [batch] (JPEG, PNG, BMP or GIF; TF Serving's b64)
                   -> the same; decoded, alpha composited on white, centre-cropped and
                   resized to S in the graph (EXIF orientation and ICC profiles are not
                   applied there, and HEIC/AVIF cannot be decoded: clients send upright
                   sRGB JPEG/PNG, as tlkeras.serving does with images.upright_bytes, or
                   uint8 pixels to serving_default, as tlkeras.predict does)
  ONNX             images: uint8 [batch, S, S, 3]  ->  probabilities, classes; metadata
                   `class_names` (JSON list) and `image_size`; labels.txt beside it
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.console import Progress, quiet_libraries
from tlkeras.errors import ArgumentParser, UserError, run_cli, writing

INPUT = "images"
BYTES_INPUT = "image_bytes"
BYTES_SIGNATURE = "predict_bytes"
OPSET = 17
LABELS_FILE = "labels.txt"  # beside model.onnx: one class name per line, in class-index order
TOLERANCE = 1e-4
WARMUP_FILE = "tf_serving_warmup_requests"


class ExportError(UserError):
    pass


def make_serving_module(model, class_names: tuple[str, ...]):
    """A tf.Module with the two signatures and the ONNX graph; each weight saved once.

    The input size S is the model's. `labels` and `class_names` carry the class names in
    the graph (tf.estimator's ClassificationOutput convention tiles the names per example
    the same way), so a TF Serving client prints names without a list of its own.

    Keras 3 variables wrap tf.Variables that tf.Module does not find by itself, so a TF1
    session (TF Serving) could not restore them; tracking the underlying tf.Variables
    fixes that. The Keras model is only closed over, not tracked: tracking it as well
    stores every weight a second time (113 MB instead of 57 MB for VGG16).
    """
    import tensorflow as tf

    from tlkeras.images import decode_in_graph

    size = int(model.input.shape[1])
    names = tf.constant(list(class_names))
    if len(class_names) != model.output.shape[-1]:
        raise ExportError(f"{len(class_names)} class names for a model with {model.output.shape[-1]} outputs")

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)])
    def numeric(images):  # what ONNX holds: no strings
        probabilities = tf.cast(model(images, training=False), tf.float32)
        return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=1)}

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT)])
    def serve(images):
        out = numeric(images)
        batch = tf.shape(images)[0]
        return {
            **out,
            "labels": tf.gather(names, out["classes"]),
            "class_names": tf.tile(names[tf.newaxis], [batch, 1]),
        }

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)])
    def serve_bytes(image_bytes):
        images = tf.map_fn(
            lambda data: decode_in_graph(data, size),
            image_bytes,
            fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8),
        )
        return serve(images)

    module = tf.Module()
    module.weights = [v.value for v in model.weights]
    module.numeric, module.serve, module.serve_bytes = numeric, serve, serve_bytes
    return module


def write_warmup(path: Path, name: str, images: np.ndarray) -> None:
    """PredictionLog records that TF Serving replays at load, before real traffic."""
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for batch in (images[:1], images):
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=name, signature_name="serving_default")
            )
            request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(batch))
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())


def save_savedmodel(module, path: Path, name: str, warmup: np.ndarray) -> None:
    import tensorflow as tf

    signatures = {
        "serving_default": module.serve.get_concrete_function(),
        BYTES_SIGNATURE: module.serve_bytes.get_concrete_function(),
    }
    tf.saved_model.save(module, str(path), signatures=signatures)
    write_warmup(path / "assets.extra" / WARMUP_FILE, name, warmup)


def save_onnx(module, path: Path, class_names: tuple[str, ...]) -> None:
    """ONNX of the numeric graph; class names and input size in its metadata and labels.txt."""
    import onnx
    import tf2onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    proto, _ = tf2onnx.convert.from_function(
        module.numeric,
        input_signature=module.numeric.input_signature,
        opset=OPSET,
    )
    size = module.numeric.input_signature[0].shape[1]
    for key, value in (("class_names", json.dumps(list(class_names))), ("image_size", str(size))):
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    (path.parent / LABELS_FILE).write_text("".join(f"{name}\n" for name in class_names), encoding="utf-8")


def run_tf1_session(path: Path, images: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
    """Loads the SavedModel as TF Serving does: a TF1 session, `serve` tag, tensor names."""
    import tensorflow as tf

    with tf.Graph().as_default(), tf.compat.v1.Session() as sess:
        meta = tf.compat.v1.saved_model.loader.load(sess, ["serve"], str(path))
        sig = meta.signature_def["serving_default"]
        fetches = {k: v.name for k, v in sig.outputs.items()}
        feed = sig.inputs[INPUT].name
        return _concat([sess.run(fetches, {feed: images[i : i + chunk]}) for i in range(0, len(images), chunk)])


def onnx_session(path: Path | str):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_onnx(path: Path, images: np.ndarray, chunk: int = 256) -> dict[str, np.ndarray]:
    session = onnx_session(path)
    names = [o.name for o in session.get_outputs()]
    return _concat(
        [dict(zip(names, session.run(None, {INPUT: images[i : i + chunk]}))) for i in range(0, len(images), chunk)]
    )


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def parity(
    reference: np.ndarray, outputs: dict[str, np.ndarray], what: str, class_names: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """Max |probability difference| and identical classes (and labels, when the export
    has them) against the Keras model's probabilities; ExportError past TOLERANCE."""
    probs = outputs["probabilities"]
    if probs.shape != reference.shape:
        raise ExportError(f"{what}: probabilities shape {probs.shape} != Keras {reference.shape}")
    diff = float(np.abs(probs - reference).max())
    same = bool((outputs["classes"] == reference.argmax(axis=1)).all())
    if class_names is not None and "labels" in outputs:
        expected = np.array([class_names[i] for i in reference.argmax(axis=1)], dtype=object)
        same = same and [b.decode() for b in outputs["labels"]] == expected.tolist()
    if diff > TOLERANCE or not same:
        raise ExportError(
            f"{what} disagrees with the Keras model (max |diff| {diff:.2e}, tolerance "
            f"{TOLERANCE:.0e}, identical classes: {same}); nothing was published"
        )
    return {"max_abs_diff": diff, "identical_classes": same, "images": int(reference.shape[0])}


def remove_stale_temps(root: Path) -> None:
    """Deletes `.tmp-<version>-<pid>` folders left on this machine by killed exports."""
    for tmp in root.glob(".tmp-*-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0 only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


def next_version(model_dir: Path) -> int:
    versions = [int(p.name) for p in model_dir.glob("*") if p.name.isdigit()]
    return max(versions, default=0) + 1


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_model(
    model,
    base: Path,
    name: str,
    images: np.ndarray,
    class_names: tuple[str, ...],
    temperature: float = 1.0,
    options=None,
    int8=None,
) -> dict[str, Any]:
    """Builds, verifies and publishes version N+1 of both formats; returns their record.

    `images`: uint8 [n, S, S, 3] for the parity gate; `class_names` in class-index order.
    `temperature` T != 1: both formats output softmax(logits / T) (model.fold_temperature;
    same classes, calibrated probabilities), and the gate compares them with the Keras
    model calibrated the same way. Raises ExportError (nothing published) when an export
    disagrees with the Keras model.
    `options` (an ExportConfig; None: SavedModel and ONNX only) and `int8` (litert.Int8Data):
    the LiteRT and int8 exports of tlkeras.litert, in <base>/litert/<name>/<version>/.
    """
    from tlkeras import litert

    if temperature != 1.0:
        from tlkeras.model import fold_temperature

        model = fold_temperature(model, temperature)
    base = Path(base)
    sm_root, onnx_root, litert_root = base / name, base / "onnx" / name, base / "litert" / name
    for root in (sm_root, onnx_root, litert_root):
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
    version = max(next_version(sm_root), next_version(onnx_root), next_version(litert_root))
    # Hidden, non-numeric names: TF Serving never takes them for a version.
    sm_tmp = sm_root / f".tmp-{version}-{os.getpid()}"
    onnx_tmp = onnx_root / f".tmp-{version}-{os.getpid()}"
    litert_tmp = litert_root / f".tmp-{version}-{os.getpid()}"
    with_litert = options is not None and options.litert
    try:
        progress = Progress(f"export version {version}", 3 if options is None else 4, "stages", rate=False)
        module = make_serving_module(model, class_names)
        save_savedmodel(module, sm_tmp, name, images[:8])
        progress.add(note="SavedModel written")
        save_onnx(module, onnx_tmp / "model.onnx", class_names)
        progress.add(note="ONNX converted")
        reference = np.asarray(model.predict(images, verbose=0), dtype=np.float32)
        checks = {
            "savedmodel": parity(reference, run_tf1_session(sm_tmp, images), "SavedModel", class_names),
            "onnx": parity(reference, run_onnx(onnx_tmp / "model.onnx", images), "ONNX"),
        }
        progress.add(note=f"parity checked on {len(images)} images")
        extras = {}
        if options is not None:
            tmp = litert_tmp if with_litert else None
            extras = litert.export_extras(
                model, options, onnx_tmp, tmp, reference, images, class_names, name, version, int8
            )
            if "litert_parity" in extras:
                checks["litert"] = extras.pop("litert_parity")
            progress.add(note="extra formats written")
        progress.done()
        sm_final, onnx_final = sm_root / str(version), onnx_root / str(version)
        litert_final = litert_root / str(version)
        if with_litert:
            os.rename(litert_tmp, litert_final)
        os.rename(onnx_tmp, onnx_final)
        try:
            os.rename(sm_tmp, sm_final)  # last: TF Serving sees the version only when complete
        except OSError:  # e.g. a concurrent export took this version: publish neither
            shutil.rmtree(onnx_final, ignore_errors=True)
            shutil.rmtree(litert_final, ignore_errors=True)
            raise
    finally:
        for tmp in (sm_tmp, onnx_tmp, litert_tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return {
        "version": version,
        "savedmodel": str(sm_final.resolve()),
        "savedmodel_bytes": _dir_size(sm_final),
        "onnx": str((onnx_final / "model.onnx").resolve()),
        "onnx_bytes": (onnx_final / "model.onnx").stat().st_size,
        "opset": OPSET,
        "image_size": int(images.shape[1]),
        "temperature": temperature,
        "parity": checks,
        **litert.record(options, litert_final if with_litert else None, onnx_final, extras),
    }


def parity_images(cfg, info, count: int = 64) -> np.ndarray:
    """The run's first test images when its data is at hand, else a fixed random batch."""
    import dataclasses

    from tlkeras.data import first_test_images

    try:  # never download here: offline, tfds would retry for minutes
        data = dataclasses.replace(cfg.data, download=False)
        images = first_test_images(data, cfg.seed, cfg.model.resolution, count)
        if images.shape[1:] == (info.storage_size, info.storage_size, 3):
            return images
    except UserError:  # no data: generated images still exercise every op
        pass
    size = info.storage_size
    return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def run_temperature(run_dir: Path, cfg, summary: dict | None) -> float:
    """The temperature to fold into a run's exports: 1 with evaluate.fold_temperature off;
    else summary.json's (fitted at the end of training), else report.json's (a later
    `python -m tlkeras.evaluate`), else 1 (never fitted: said in the log)."""
    from tlkeras import rundir

    if not cfg.evaluate.fold_temperature:
        return 1.0
    if summary and summary.get("temperature"):
        return float(summary["temperature"])
    report = rundir.read_json(run_dir / rundir.REPORT)
    if report:
        return float(report["calibration"]["temperature"])
    import logging

    logging.getLogger("tlkeras").warning(
        "no fitted temperature in %s: exporting uncalibrated probabilities; run python -m "
        "tlkeras.evaluate --run-dir %s first to calibrate them",
        run_dir,
        run_dir,
    )
    return 1.0


def run_int8_data(cfg):
    """litert.int8_data of the run's data (never downloaded), None when it is not at hand."""
    import dataclasses

    from tlkeras.data import make_datasets
    from tlkeras.litert import int8_data

    if not (cfg.export.int8_onnx or (cfg.export.litert and cfg.export.int8_litert)):
        return None
    try:
        data = dataclasses.replace(cfg.data, download=False, cache=False)
        return int8_data(make_datasets(data, cfg.seed, cfg.model.resolution), cfg)
    except UserError:  # export_model says in one line that int8 was skipped
        return None


def export_run(
    run_dir: Path,
    base: Path | None = None,
    name: str | None = None,
    parity_count: int = 64,
    overrides: list[str] = (),
) -> dict[str, Any]:
    """Exports run_dir/model.keras and records the result in summary.json.

    `overrides`: export.* settings over the run's own (e.g. export.int8_max_drop=2)."""
    from tlkeras import rundir

    rundir.check_run(run_dir, finished=False)  # model.keras is enough (load_run checks it)
    bad = [item for item in overrides if not item.startswith("export.")]
    if bad:
        raise UserError(f"--set {bad[0]}: only export.* settings can be changed here (the run is trained)")
    cfg = rundir.load_run_config(run_dir, list(overrides))
    base = base or Path(cfg.export.base or run_dir / "export")  # where training exports
    with rundir.locked(base, "export base"):  # one writer: versions are numbered by what is there
        _, info, model = rundir.load_run(run_dir)
        images = parity_images(cfg, info, parity_count)
        summary = rundir.read_json(run_dir / rundir.SUMMARY)
        int8 = run_int8_data(cfg)
        with writing(base, "the export", 3 * sum(w.nbytes for w in model.get_weights())):
            record = export_model(
                model,
                base,
                name or cfg.export.name,
                images,
                info.class_names,
                run_temperature(run_dir, cfg, summary),
                cfg.export,
                int8,
            )
    if summary is not None:
        summary.setdefault("exports", []).append(record)
        rundir.write_json(run_dir / rundir.SUMMARY, summary)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m tlkeras.export", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished training run")
    parser.add_argument("--base", type=Path, help="export base folder (default: the run's export.base)")
    parser.add_argument("--name", help="model name, TF Serving's MODEL_NAME (default: the run's export.name)")
    parser.add_argument(
        "--parity-images",
        type=int,
        default=64,
        metavar="N",
        help="test images of the run's data for the parity gate (e.g. 10000: all of CIFAR-10's)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an export setting over the run's, e.g. export.int8_max_drop=2 or export.litert=false (repeatable)",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    args = parser.parse_args(argv)
    quiet_libraries(args.debug)  # before TensorFlow is imported

    def run() -> None:
        record = export_run(args.run_dir, args.base, args.name, args.parity_images, args.set)
        print("\n".join(describe(record)))

    return run_cli(run, args.debug)


def describe(record: dict[str, Any]) -> list[str]:
    """An export record (export_model's) as the lines a user reads: each file, each int8
    gate's measured accuracy and verdict, each parity check."""
    lines = [f"SavedModel: {record['savedmodel']}", f"ONNX: {record['onnx']}"]
    for key, label in (("litert", "LiteRT"), ("litert_int8", "LiteRT int8"), ("onnx_int8", "ONNX int8")):
        if record.get(key):
            lines.append(f"{label}: {record[key]}")
    for kind, g in record.get("int8", {}).items():
        if isinstance(g, dict):
            lines.append(
                f"int8 {kind}: {record['int8']['split']} accuracy {g['int8_accuracy']:.4f} (float "
                f"{g['float_accuracy']:.4f}, drop {g['drop_points']:+.2f} points, top-1 agreement "
                f"{g['top1_agreement']:.4f}): {'published' if g['published'] else 'not published'}"
            )
    for kind, c in record["parity"].items():
        lines.append(
            f"parity {kind}: {c['images']} images, max |diff| {c['max_abs_diff']:.1e}, "
            f"identical classes: {c['identical_classes']}"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
