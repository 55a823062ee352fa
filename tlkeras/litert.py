"""LiteRT (.tflite) and int8 exports: conversion, class names in the metadata, the accuracy gate.

    python -m tlkeras.export --run-dir runs/<run>   # adds them to a finished run (a new version)

tlkeras.export calls `export_extras` while it builds a version; it writes, beside the
SavedModel and the float ONNX model:

    <base>/litert/<name>/<version>/model.tflite       float32, always (export.litert)
    <base>/litert/<name>/<version>/model.int8.tflite  full-integer, if it passes the gate
    <base>/litert/<name>/<version>/labels.txt
    <base>/onnx/<name>/<version>/model.int8.onnx      QDQ per-channel, if it passes the gate

Contract of both .tflite files: one input `images` uint8 [b, S, S, 3] (shape [1, S, S, 3],
batch resizable), one output `probabilities` float32 [b, C]; builtin ops only, so the
stock LiteRT interpreter and MediaPipe Tasks run them. The class names are in the file:
TFLite model metadata (the published `metadata_schema.fbs`, written here with the
`flatbuffers` package) whose output tensor has `labels.txt` as a TENSOR_AXIS_LABELS
associated file, packed as a zip archive appended to the model, as the metadata spec and
its reference writer do.

int8 models are calibrated on training images and published only when their accuracy
on the test split is within `export.int8_max_drop` points of the float model's.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tlkeras.console import native_stderr_filtered
from tlkeras.errors import UserError

FLOAT_FILE = "model.tflite"
INT8_FILE = "model.int8.tflite"
ONNX_INT8_FILE = "model.int8.onnx"
LABELS_FILE = "labels.txt"
METADATA_NAME = "TFLITE_METADATA"  # the key stock clients look the metadata buffer up by
# Both slots from the published schema (tensorflow/tflite-support metadata_schema.fbs).
AXIS_LABELS = 2  # AssociatedFileType.TENSOR_AXIS_LABELS
IMAGE_PROPERTIES, FEATURE_PROPERTIES, RGB = 2, 1, 1  # ContentProperties union types, ColorSpaceType

log = logging.getLogger("tlkeras")


@dataclasses.dataclass(frozen=True)
class Int8Data:
    """What int8 needs: training images to calibrate on, labelled images for the gate."""

    calibration: np.ndarray  # uint8 [n, S, S, 3]
    images: np.ndarray  # uint8 [m, S, S, 3]
    labels: np.ndarray  # int64 [m]
    split: str = "test"


# ---------------------------------------------------------------- conversion


def convert(model, calibration: np.ndarray | None = None) -> bytes:
    """The Keras model as a .tflite: float32, or full-integer when calibration images are given.

    Converted from a tf.function over the model (uint8 images -> probabilities), not with
    Keras 3's `from_keras_model` (broken for many models, keras#19108). Full-integer: int8
    weights and activations, builtin int8 kernels only; input stays uint8 (0-255, what
    camera frames are), the output float32 probabilities (dequantized in the graph).
    """
    import tensorflow as tf

    size = int(model.input.shape[1])

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name="images")])
    def probabilities(images):
        return {"probabilities": tf.cast(model(images, training=False), tf.float32)}

    holder = tf.Module()
    holder.weights = [v.value for v in model.weights]  # Keras 3 variables, as export does
    converter = tf.lite.TFLiteConverter.from_concrete_functions([probabilities.get_concrete_function()], holder)
    if calibration is None:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    else:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[np.newaxis]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
    with native_stderr_filtered():  # the converter prints its quantization summary to fd 2
        return converter.convert()


def op_names(path_or_bytes: Path | bytes) -> set[str]:
    """The operator names the model runs ('FlexConv2D' style names or CUSTOM would be non-builtin)."""
    it = _interpreter(path_or_bytes)
    return {op["op_name"] for op in it._get_ops_details()}


def check_builtin(content: bytes, what: str) -> None:
    from tlkeras.export import ExportError

    foreign = {op for op in op_names(content) if op.startswith("Flex") or op in ("CUSTOM", "DELEGATE")}
    if foreign:
        raise ExportError(f"{what} needs non-builtin ops ({', '.join(sorted(foreign))}); nothing was published")


# ---------------------------------------------------------------- metadata


def _vector(b, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _floats(b, values: list[float]) -> int:
    b.StartVector(4, len(values), 4)
    for v in reversed(values):
        b.PrependFloat32(v)
    return b.EndVector()


def _table(b, fields: dict[int, tuple[str, Any]]) -> int:
    """A table from {slot: (kind, value)}; kind 'offset' (already built), 'byte' or 'uint'."""
    b.StartObject(max(fields, default=-1) + 1)
    for slot, (kind, value) in fields.items():
        {"offset": b.PrependUOffsetTRelativeSlot, "byte": b.PrependInt8Slot, "uint": b.PrependUint32Slot}[kind](
            slot, value, 0
        )
    return b.EndObject()


def metadata_buffer(class_names: tuple[str, ...], size: int, name: str, version: int) -> bytes:
    """A ModelMetadata flatbuffer (file identifier M001): input image S x S RGB uint8,
    output probabilities with labels.txt as their TENSOR_AXIS_LABELS file.
    Slot numbers are the field order of metadata_schema.fbs (unions take two)."""
    import flatbuffers

    b = flatbuffers.Builder(1024)
    s = b.CreateString
    # input: ImageProperties(color_space RGB, default_size S x S), pixel range 0-255
    image_size = _table(b, {0: ("uint", size), 1: ("uint", size)})
    image_props = _table(b, {0: ("byte", RGB), 1: ("offset", image_size)})
    image_content = _table(b, {0: ("byte", IMAGE_PROPERTIES), 1: ("offset", image_props)})
    image_stats = _table(b, {0: ("offset", _floats(b, [255.0])), 1: ("offset", _floats(b, [0.0]))})
    image = _table(
        b,
        {
            0: ("offset", s("images")),
            1: ("offset", s(f"RGB photo as uint8 0-255, centre-cropped and resized to {size}x{size}")),
            3: ("offset", image_content),
            5: ("offset", image_stats),
        },
    )
    # output: probabilities, one per class, named by labels.txt
    labels = _table(
        b,
        {
            0: ("offset", s(LABELS_FILE)),
            1: ("offset", s("class names, one per line, in output order")),
            2: ("byte", AXIS_LABELS),
        },
    )
    feature_content = _table(b, {0: ("byte", FEATURE_PROPERTIES), 1: ("offset", _table(b, {}))})
    prob_stats = _table(b, {0: ("offset", _floats(b, [1.0])), 1: ("offset", _floats(b, [0.0]))})
    probs = _table(
        b,
        {
            0: ("offset", s("probabilities")),
            1: ("offset", s(f"probabilities of the {len(class_names)} classes")),
            3: ("offset", feature_content),
            5: ("offset", prob_stats),
            6: ("offset", _vector(b, [labels])),
        },
    )
    subgraph = _table(b, {2: ("offset", _vector(b, [image])), 3: ("offset", _vector(b, [probs]))})
    root = _table(
        b,
        {
            0: ("offset", s(name)),
            1: ("offset", s(f"Image classifier ({len(class_names)} classes) trained with tlkeras")),
            2: ("offset", s(str(version))),
            3: ("offset", _vector(b, [subgraph])),
            4: ("offset", s("tlkeras")),
            7: ("offset", s("1.0.0")),  # only 1.0.0 fields are used
        },
    )
    b.Finish(root, file_identifier=b"M001")
    return bytes(b.Output())


def add_metadata(content: bytes, class_names: tuple[str, ...], name: str, version: int) -> bytes:
    """The model with its metadata buffer and, appended as a zip, labels.txt."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(content, 0)
    size = int(model.subgraphs[0].tensors[model.subgraphs[0].inputs[0]].shape[1])
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(metadata_buffer(class_names, size, name, version), np.uint8)
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME, len(model.buffers) - 1
    model.metadata = [m for m in (model.metadata or []) if m.name != METADATA_NAME.encode()] + [entry]
    b = flatbuffers.Builder(len(content) + 4096)
    b.Finish(model.Pack(b), file_identifier=b"TFL3")
    stream = io.BytesIO(bytes(b.Output()))
    with zipfile.ZipFile(stream, "a", compression=zipfile.ZIP_STORED) as archive:  # 'a': appended after the model
        archive.writestr(LABELS_FILE, "".join(f"{n}\n" for n in class_names))
    return stream.getvalue()


def _field(table, slot: int) -> int:
    return table.Offset(4 + 2 * slot)


def _sub(table, slot: int, index: int | None = None):
    """The table at `slot` (or element `index` of the table vector there), or None."""
    import flatbuffers

    o = _field(table, slot)
    if not o:
        return None
    pos = table.Vector(o) + 4 * index if index is not None else o + table.Pos
    return flatbuffers.table.Table(table.Bytes, table.Indirect(pos))


def read_metadata(content: bytes) -> dict[str, Any]:
    """What a stock client reads: the metadata's name, input size, label file name and type,
    and the class names from the zip. KeyError when the model carries no metadata."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(content, 0)
    entries = [model.Metadata(i) for i in range(model.MetadataLength())]
    entry = next(e for e in entries if e.Name() == METADATA_NAME.encode())
    data = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    root = flatbuffers.table.Table(data, flatbuffers.encode.Get(flatbuffers.packer.uoffset, data, 0))
    subgraph = _sub(root, 3, 0)
    image_size = _sub(_sub(_sub(_sub(subgraph, 2, 0), 3), 1), 1)
    labels = _sub(_sub(subgraph, 3, 0), 6, 0)
    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        names = tuple(archive.read(LABELS_FILE).decode("utf-8").splitlines())
    return {
        "identifier": data[4:8].decode(),
        "name": root.String(_field(root, 0) + root.Pos).decode(),
        "image_size": root.Get(flatbuffers.number_types.Uint32Flags, image_size.Pos + _field(image_size, 0)),
        "labels_file": labels.String(_field(labels, 0) + labels.Pos).decode(),
        "labels_type": labels.Get(flatbuffers.number_types.Int8Flags, labels.Pos + _field(labels, 2)),
        "class_names": names,
    }


def read_labels(path: Path | str) -> tuple[str, ...]:
    """The class names packed in a .tflite (UserError when it has none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return tuple(archive.read(LABELS_FILE).decode("utf-8").splitlines())
    except (zipfile.BadZipFile, KeyError):
        raise UserError(
            f"--model {path} carries no class names ({LABELS_FILE} in its metadata); "
            f"export it with python -m tlkeras.export"
        ) from None


# ---------------------------------------------------------------- running


def _interpreter(model: Path | str | bytes, threads: int | None = None):
    from ai_edge_litert.interpreter import Interpreter

    threads = threads or os.cpu_count() or 1
    source = {"model_content": model} if isinstance(model, bytes) else {"model_path": str(model)}
    with native_stderr_filtered():  # the XNNPACK delegate's note, printed to fd 2
        return Interpreter(**source, num_threads=threads)


def runner(model: Path | str | bytes, threads: int | None = None):
    """A function uint8 [n, S, S, 3] -> float32 [n, C] over one interpreter (batch resized as needed)."""
    it = _interpreter(model, threads)
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    batch = [None]

    def run(images: np.ndarray) -> np.ndarray:
        if batch[0] != len(images):
            it.resize_tensor_input(inp["index"], list(images.shape), strict=True)
            with native_stderr_filtered():  # the XNNPACK delegate's note, printed to fd 2
                it.allocate_tensors()
            batch[0] = len(images)
        it.set_tensor(inp["index"], np.ascontiguousarray(images, dtype=np.uint8))
        it.invoke()
        return it.get_tensor(out["index"]).copy()

    return run


def run_litert(model: Path | str | bytes, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    run = runner(model)
    return np.concatenate([run(images[i : i + chunk]) for i in range(0, len(images), chunk)])


def input_size(path: Path | str) -> int:
    """S of a tlkeras .tflite; UserError when its input is not uint8 [b, S, S, 3]."""
    try:
        detail = _interpreter(path, 1).get_input_details()
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--model {path} is not a loadable LiteRT model ({str(e)[:150]})") from None
    shape = list(detail[0]["shape"]) if len(detail) == 1 else []
    if len(shape) != 4 or detail[0]["dtype"] != np.uint8 or shape[1] != shape[2] or shape[3] != 3:
        found = ", ".join(f"{d['name']}: {np.dtype(d['dtype']).name} {list(d['shape'])}" for d in detail)
        raise UserError(
            f"--model {path} does not take uint8 images [batch, S, S, 3] (it takes {found}); "
            f"export it with python -m tlkeras.export"
        )
    return int(shape[1])


def litert_file(model: str) -> Path | None:
    """A .tflite file, or the model.tflite of a LiteRT version folder or of its highest version."""
    path = Path(model)
    if path.suffix == ".tflite" or not path.is_dir():
        return path
    from tlkeras.export import next_version

    for folder in (path, path / str(next_version(path) - 1)):
        if (folder / FLOAT_FILE).is_file():
            return folder / FLOAT_FILE
    return None


def open_litert(model: str):
    """predict's Runner for a .tflite (or its folder): (S, images -> (probabilities, names))."""
    path = litert_file(model)
    if path is None or not path.is_file():
        raise UserError(
            f"--model {model}: no such LiteRT file (pass a model.tflite, or its folder such as "
            f"runs/<run>/export/litert/tlkeras)"
        )
    size, names = input_size(path), read_labels(path)
    run = runner(path)
    return size, lambda images: (run(images), names)


# ---------------------------------------------------------------- int8 ONNX


def quantize_onnx(onnx_path: Path, out: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 with per-channel weights, after onnxruntime's quantization
    pre-processing (graph optimisation: fusions and constant folding, so the ranges are
    calibrated on the graph that runs). Without it MobileNetV2 lost 5.9 points here
    (0.891 -> 0.832 on 1,000 CIFAR-10 test images), with it none (0.892)."""
    from onnxruntime import quantization as q
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out.with_name(f"{out.stem}.prepared.onnx")
    quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)  # symbolic: needs sympy

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    try:
        q.quantize_static(
            str(prepared),
            str(out),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            activation_type=q.QuantType.QUInt8,
            weight_type=q.QuantType.QInt8,
            per_channel=True,
        )
    finally:
        prepared.unlink(missing_ok=True)


# ---------------------------------------------------------------- the gate


def gate(float_classes: np.ndarray, int8_probabilities: np.ndarray, labels: np.ndarray, max_drop: float) -> dict:
    """The int8 model's accuracy against the float model's on the same labelled images."""
    int8_classes = int8_probabilities.argmax(axis=1)
    float_accuracy = float((float_classes == labels).mean())
    int8_accuracy = float((int8_classes == labels).mean())
    drop = 100 * (float_accuracy - int8_accuracy)
    return {
        "float_accuracy": round(float_accuracy, 4),
        "int8_accuracy": round(int8_accuracy, 4),
        "drop_points": round(drop, 2),
        "top1_agreement": round(float((int8_classes == float_classes).mean()), 4),
        "max_drop_points": max_drop,
        "published": bool(drop <= max_drop),
    }


def export_extras(
    model,
    options,
    onnx_dir: Path,
    litert_dir: Path | None,
    reference: np.ndarray,
    images: np.ndarray,
    class_names: tuple[str, ...],
    name: str,
    version: int,
    int8: Int8Data | None,
) -> dict[str, Any]:
    """Writes the LiteRT and int8 files into the (temporary) version folders; their record.

    `options`: an ExportConfig; `reference`: the Keras probabilities on `images` (the
    float .tflite is held to export.TOLERANCE like the other formats). int8 files that
    fail the gate are deleted again and logged in one warning line.
    """
    from tlkeras.export import TOLERANCE, parity, run_onnx

    record: dict[str, Any] = {}
    if litert_dir is not None:
        litert_dir.mkdir(parents=True, exist_ok=True)
        content = add_metadata(convert(model), class_names, name, version)
        check_builtin(content, "LiteRT")
        (litert_dir / FLOAT_FILE).write_bytes(content)
        (litert_dir / LABELS_FILE).write_text("".join(f"{n}\n" for n in class_names), encoding="utf-8")
        probs = run_litert(content, images)
        record["litert_parity"] = parity(reference, {"probabilities": probs, "classes": probs.argmax(1)}, "LiteRT")
        record["litert_tolerance"] = TOLERANCE
    want = {"litert": litert_dir is not None and options.int8_litert, "onnx": options.int8_onnx}
    if int8 is None or not any(want.values()):
        if int8 is None and any(want.values()):
            log.warning("int8 exports skipped: no training and test images at hand (float exports only)")
        return record
    calibration = int8.calibration
    float_classes = run_onnx(onnx_dir / "model.onnx", int8.images)["classes"]
    results, refused = {}, []
    if want["litert"]:
        path = litert_dir / INT8_FILE
        content = add_metadata(convert(model, calibration), class_names, name, version)
        check_builtin(content, "int8 LiteRT")
        path.write_bytes(content)
        results["litert"] = gate(float_classes, run_litert(content, int8.images), int8.labels, options.int8_max_drop)
    if want["onnx"]:
        path = onnx_dir / ONNX_INT8_FILE
        quantize_onnx(onnx_dir / "model.onnx", path, calibration)
        probs = run_onnx(path, int8.images)["probabilities"]
        results["onnx"] = gate(float_classes, probs, int8.labels, options.int8_max_drop)
    for kind, result in results.items():
        path = litert_dir / INT8_FILE if kind == "litert" else onnx_dir / ONNX_INT8_FILE
        result.update(file=path.name, bytes=path.stat().st_size)
        if not result["published"]:
            path.unlink()
            refused.append(f"{kind} {result['drop_points']:+.2f}")
    if refused:
        log.warning(
            "int8 not published (accuracy drop in points on %d %s images: %s > export.int8_max_drop=%s); "
            "float exports only for those",
            len(int8.labels),
            int8.split,
            ", ".join(refused),
            options.int8_max_drop,
        )
    record["int8"] = {
        "split": int8.split,
        "images": int(len(int8.labels)),
        "calibration_images": int(len(calibration)),
        **results,
    }
    return record


def int8_data(splits, cfg) -> Int8Data | None:
    """Calibration images (a seeded sample of the plain training split) and the test split
    (up to export.int8_test_images), or None when int8 is off."""
    ecfg = cfg.export
    if not (ecfg.int8_onnx or (ecfg.litert and ecfg.int8_litert)):
        return None
    from tlkeras.evaluate import to_arrays

    train = splits.train_plain.unbatch().shuffle(min(splits.info.num_train or 10000, 10000), seed=cfg.seed)
    calibration = np.stack([x for x, _ in train.take(ecfg.calibration_images).as_numpy_iterator()])
    images, labels = to_arrays(splits.test, ecfg.int8_test_images)
    return Int8Data(calibration, images, labels, "test")


def record(options, litert_dir: Path | None, onnx_dir: Path, extras: dict[str, Any]) -> dict[str, Any]:
    """The export record's LiteRT and int8 entries (published files only; None for the others)."""
    if options is None:
        return {}

    def published(path: Path) -> str | None:
        return str(path.resolve()) if path.is_file() else None

    out: dict[str, Any] = {}
    if litert_dir is not None:
        out["litert"] = published(litert_dir / FLOAT_FILE)
        out["litert_bytes"] = (litert_dir / FLOAT_FILE).stat().st_size
        out["litert_int8"] = published(litert_dir / INT8_FILE)
    out["onnx_int8"] = published(onnx_dir / ONNX_INT8_FILE)
    return {**out, **extras}
