"""Clients for TF Serving: REST (instances / inputs, raw pixels or b64 bytes) and gRPC.

    probs = predict_rest("http://localhost:8501/v1/models/tlkeras", images=batch)
    probs = predict_rest(url, image_bytes=[open("cat.jpg", "rb").read()])  # predict_bytes
    probs = predict_grpc("localhost:8500", "tlkeras", images=batch)

Each returns float32 probabilities [batch, 10]. Network failures and server errors
become UserError with the address and a hint, after a bounded timeout.
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
        body_key, signature = BYTES_INPUT, BYTES_SIGNATURE
        values = [{"b64": base64.b64encode(b).decode("ascii")} for b in image_bytes]
    if form == "instances":
        return {"signature_name": signature, "instances": [{body_key: v} for v in values]}
    if form == "inputs":
        return {"signature_name": signature, "inputs": {body_key: values}}
    raise ValueError(f"form must be 'instances' or 'inputs', not {form!r}")


def parse_rest_response(body: dict) -> np.ndarray:
    if "predictions" in body:  # row form: one dict per example
        return np.array([p["probabilities"] for p in body["predictions"]], np.float32)
    if "outputs" in body:
        return np.array(body["outputs"]["probabilities"], np.float32)
    raise UserError(f"TF Serving answered without predictions: {str(body)[:200]}")


def predict_rest(url: str, images=None, image_bytes=None, form: str = "instances",
                 timeout: float = TIMEOUT_S) -> np.ndarray:  # fmt: skip
    """POSTs to <url>:predict, url being http://host:8501/v1/models/<name>[/versions/<n>]."""
    data = json.dumps(rest_request(images, image_bytes, form)).encode()
    request = urllib.request.Request(
        url.rstrip("/") + ":predict", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return parse_rest_response(json.loads(response.read()))
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise UserError(f"TF Serving at {url} answered HTTP {e.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(
            f"no TF Serving REST API at {url} ({reason}); start the server (see README, "
            f"port 8501) or check the URL, e.g. http://localhost:8501/v1/models/tlkeras"
        ) from None


def predict_grpc(target: str, name: str, images=None, image_bytes=None,
                 timeout: float = TIMEOUT_S) -> np.ndarray:  # fmt: skip
    """PredictionService.Predict on host:port (TF Serving's gRPC port is 8500)."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if images is not None:
        request.model_spec.signature_name = "serving_default"
        request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(np.asarray(images, np.uint8)))
    else:
        request.model_spec.signature_name = BYTES_SIGNATURE
        request.inputs[BYTES_INPUT].CopyFrom(tf.make_tensor_proto(list(image_bytes)))
    with grpc.insecure_channel(target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout=timeout)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise UserError(
                    f"no TF Serving gRPC API at {target} ({e.code().name}); start the server "
                    f"(see README, port 8500) or check host:port"
                ) from None
            raise UserError(f"TF Serving at {target} refused the request: {e.details()}") from None
    return tf.make_ndarray(response.outputs["probabilities"]).astype(np.float32)
