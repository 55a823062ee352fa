"""Clients for TF Serving: REST (instances / inputs, raw pixels or b64 bytes) and gRPC.

    out = predict_rest("http://localhost:8501/v1/models/tlkeras", images=batch)
    out = predict_rest(url, image_bytes=[open("cat.jpg", "rb").read()])  # predict_bytes
    out = predict_grpc("localhost:8500", "tlkeras", images=batch)
    out["probabilities"], out["labels"], out["class_names"][0]
    size = input_size_rest(url)  # S, from TF Serving's model metadata API

Each predict call returns the signature's outputs as NumPy arrays: probabilities float32
[batch, C], classes int64 [batch], labels (predicted names) and class_names [batch, C] as
str. `images` are uint8 [batch, S, S, 3]; encoded files sent as `image_bytes` are turned
upright by their EXIF orientation first (the graph cannot do it). Network failures and
server errors become UserError with the address and a hint, after a bounded timeout.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import numpy as np

from tlkeras.errors import UserError
from tlkeras.export import BYTES_INPUT, BYTES_SIGNATURE, INPUT

TIMEOUT_S = 10.0


def rest_request(images=None, image_bytes=None, form: str = "instances") -> dict:
    """The JSON body of a TF Serving :predict request, row ("instances") or columnar form."""
    if (images is None) == (image_bytes is None):
        raise ValueError("give exactly one of images and image_bytes")
    if images is not None:
        body_key, values, signature = INPUT, np.asarray(images, np.uint8).tolist(), "serving_default"
    else:
        from tlkeras.images import upright_bytes

        body_key, signature = BYTES_INPUT, BYTES_SIGNATURE
        values = [{"b64": base64.b64encode(upright_bytes(b)).decode("ascii")} for b in image_bytes]
    if form == "instances":
        return {"signature_name": signature, "instances": [{body_key: v} for v in values]}
    if form == "inputs":
        return {"signature_name": signature, "inputs": {body_key: values}}
    raise ValueError(f"form must be 'instances' or 'inputs', not {form!r}")


def _as_arrays(columns: dict) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v) for k, v in columns.items()}
    if "probabilities" in out:
        out["probabilities"] = out["probabilities"].astype(np.float32)
    return out


def parse_rest_response(body: dict) -> dict[str, np.ndarray]:
    if "predictions" in body:  # row form: one dict per example
        rows = body["predictions"]
        return _as_arrays({k: [r[k] for r in rows] for k in (rows[0] if rows else {})})
    if "outputs" in body:
        return _as_arrays(body["outputs"])
    raise UserError(f"TF Serving answered without predictions: {str(body)[:200]}")


def _rest_call(url: str, data: bytes | None, timeout: float) -> dict:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    base = url.rsplit("/metadata", 1)[0].rsplit(":predict", 1)[0]
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise UserError(f"TF Serving at {base} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"no TF Serving REST API at {base} ({reason}); start the server (see README, "
            f"port 8501) or check the URL, e.g. http://localhost:8501/v1/models/tlkeras"
        ) from None


def predict_rest(
    url: str, images=None, image_bytes=None, form: str = "instances", timeout: float = TIMEOUT_S
) -> dict[str, np.ndarray]:
    """POSTs to <url>:predict, url being http://host:8501/v1/models/<name>[/versions/<n>]."""
    data = json.dumps(rest_request(images, image_bytes, form)).encode()
    return parse_rest_response(_rest_call(url.rstrip("/") + ":predict", data, timeout))


def _input_size(signatures: dict, where: str) -> int:
    """S of serving_default's `images` input, from a SignatureDefMap in proto-JSON form."""
    try:
        dims = signatures["serving_default"]["inputs"][INPUT]["tensor_shape"]["dim"]
        size = [int(d["size"]) for d in dims]
    except (KeyError, TypeError, ValueError):
        raise UserError(
            f"the model at {where} has no serving_default signature taking '{INPUT}'; "
            f"serve a model exported by python -m tlkeras.export"
        ) from None
    if len(size) != 4 or size[1] != size[2] or size[3] != 3 or size[1] <= 0:
        raise UserError(f"the model at {where} takes images of shape {size}, not [batch, S, S, 3]")
    return size[1]


def input_size_rest(url: str, timeout: float = TIMEOUT_S) -> int:
    """S, read from GET <url>/metadata (TF Serving's model metadata API)."""
    body = _rest_call(url.rstrip("/") + "/metadata", None, timeout)
    signatures = body.get("metadata", {}).get("signature_def", {}).get("signature_def", {})
    return _input_size(signatures, url)


def _grpc_call(target: str, method: str, request, timeout: float):
    import grpc
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            return getattr(stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UserError(
                    f"no TF Serving gRPC API at {target} ({e.code().name}); start the server "
                    f"(see README, port 8500) or check host:port"
                ) from None
            raise UserError(f"TF Serving at {target} refused the request: {e.details()}") from None


def input_size_grpc(target: str, name: str, timeout: float = TIMEOUT_S) -> int:
    """S, read with PredictionService.GetModelMetadata (signature_def)."""
    from google.protobuf import json_format
    from tensorflow_serving.apis import get_model_metadata_pb2

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = name
    response = _grpc_call(target, "GetModelMetadata", request, timeout)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signatures)
    as_json = json_format.MessageToDict(signatures, preserving_proto_field_name=True)
    return _input_size(as_json.get("signature_def", {}), f"{target}/{name}")


def predict_grpc(
    target: str, name: str, images=None, image_bytes=None, timeout: float = TIMEOUT_S
) -> dict[str, np.ndarray]:
    """PredictionService.Predict on host:port (TF Serving's gRPC port is 8500)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if images is not None:
        request.model_spec.signature_name = "serving_default"
        request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.asarray(images, np.uint8)))
    else:
        from tlkeras.images import upright_bytes

        request.model_spec.signature_name = BYTES_SIGNATURE
        request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto([upright_bytes(b) for b in image_bytes]))
    response = _grpc_call(target, "Predict", request, timeout)
    out = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    for k in ("labels", "class_names"):
        if k in out:
            out[k] = np.vectorize(lambda b: b.decode(), otypes=[object])(out[k])
    return _as_arrays(out)
