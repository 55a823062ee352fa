"""A STAND-IN for TensorFlow Serving, for tests only: it is not TF Serving.

The real tensorflow_model_server cannot be installed here (not on PyPI or Debian, and no
container engine runs), so the clients are tested against this small server on 127.0.0.1.
It speaks the two TF Serving protocols the clients use, answering from the exported
SavedModel's signatures:
  REST  POST /v1/models/<name>[/versions/<n>]:predict  ("instances" or "inputs", {"b64": ...})
        GET  /v1/models/<name>[/versions/<n>]/metadata  (signature_def)
  gRPC  tensorflow.serving.PredictionService/Predict and /GetModelMetadata
"""

from __future__ import annotations

import base64
import json
import re
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)(/versions/\d+)?:predict$")
METADATA = re.compile(r"^/v1/models/(?P<name>[^/:]+)(/versions/\d+)?/metadata$")


def _decode(value):
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _tensor(values, spec: tf.TensorSpec) -> tf.Tensor:
    return tf.constant(values, dtype=spec.dtype)


class StandIn:
    def __init__(self, savedmodel_dir: str, name: str = "tlkeras"):
        self.name = name
        self.signatures = tf.saved_model.load(savedmodel_dir).signatures
        saved = saved_model_pb2.SavedModel()
        with open(f"{savedmodel_dir}/saved_model.pb", "rb") as f:
            saved.ParseFromString(f.read())
        self.signature_defs = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in saved.meta_graphs[0].signature_def.items():
            if not key.startswith("__"):
                self.signature_defs.signature_def[key].CopyFrom(sig)
        self._lock = threading.Lock()

    def run(self, signature: str, inputs: dict) -> dict[str, np.ndarray]:
        fn = self.signatures[signature]
        specs = fn.structured_input_signature[1]
        with self._lock:
            out = fn(**{k: _tensor(v, specs[k]) for k, v in inputs.items()})
        # REST answers strings as JSON strings, as TF Serving does.
        decode = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])
        return {k: decode(v.numpy()) if v.dtype == tf.string else v.numpy() for k, v in out.items()}

    # --- REST -------------------------------------------------------------------------
    def rest_predict(self, name: str, body: dict) -> tuple[int, dict]:
        if name != self.name:
            return 404, {"error": f"Servable not found for request: Latest({name})"}
        signature = body.get("signature_name", "serving_default")
        if signature not in self.signatures:
            return 400, {"error": f'Serving signature name: "{signature}" not found'}
        (input_name,) = self.signatures[signature].structured_input_signature[1]
        if "instances" in body:
            rows = [r[input_name] if isinstance(r, dict) else r for r in body["instances"]]
            out = self.run(signature, {input_name: _decode(rows)})
            n = len(rows)
            return 200, {"predictions": [{k: np.asarray(v[i]).tolist() for k, v in out.items()} for i in range(n)]}
        if "inputs" in body:
            inputs = body["inputs"]
            values = inputs[input_name] if isinstance(inputs, dict) else inputs
            out = self.run(signature, {input_name: _decode(values)})
            return 200, {"outputs": {k: np.asarray(v).tolist() for k, v in out.items()}}
        return 400, {"error": "Missing 'inputs' or 'instances' key"}

    def rest_metadata(self, name: str) -> tuple[int, dict]:
        if name != self.name:
            return 404, {"error": f"Servable not found for request: Latest({name})"}
        sigs = json_format.MessageToDict(self.signature_defs, preserving_proto_field_name=True)
        return 200, {"model_spec": {"name": name}, "metadata": {"signature_def": sigs}}

    def start_rest(self) -> ThreadingHTTPServer:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                match = METADATA.match(self.path)
                code, answer = standin.rest_metadata(match["name"]) if match else (404, {"error": "Malformed request"})
                self._answer(code, answer)

            def do_POST(self):
                match = PATH.match(self.path)
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    code, answer = (
                        standin.rest_predict(match["name"], body) if match else (404, {"error": "Malformed request"})
                    )
                except (ValueError, KeyError, tf.errors.OpError) as e:
                    code, answer = 400, {"error": str(e)[:300]}
                self._answer(code, answer)

            def _answer(self, code, answer):
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    # --- gRPC -------------------------------------------------------------------------
    def start_grpc(self) -> tuple[grpc.Server, int]:
        standin = self

        class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
            def Predict(self, request, context):
                if request.model_spec.name != standin.name:
                    context.abort(
                        grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({request.model_spec.name})"
                    )
                signature = request.model_spec.signature_name or "serving_default"
                inputs = {k: tf.make_ndarray(v).tolist() for k, v in request.inputs.items()}
                try:
                    out = standin.run(signature, inputs)
                except (KeyError, tf.errors.OpError) as e:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:300])
                response = predict_pb2.PredictResponse()
                for k, v in out.items():
                    if v.dtype == object:  # strings: back to UTF-8 bytes for the tensor proto
                        v = np.vectorize(lambda t: t.encode("utf-8"), otypes=[object])(v)
                    response.outputs[k].CopyFrom(tf.make_tensor_proto(v))
                return response

            def GetModelMetadata(self, request, context):
                if request.model_spec.name != standin.name:
                    context.abort(
                        grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({request.model_spec.name})"
                    )
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = standin.name
                response.metadata["signature_def"].Pack(standin.signature_defs)
                return response

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        return server, port
