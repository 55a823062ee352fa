"""REST and gRPC clients against a local STAND-IN for TF Serving (see tf_serving_standin.py:
the real tensorflow_model_server cannot be installed on this machine)."""

import numpy as np
import pytest
import tensorflow as tf
from conftest import CIFAR_NAMES
from tf_serving_standin import StandIn

from tlkeras import predict as P
from tlkeras.errors import UserError
from tlkeras.serving import input_size_grpc, input_size_rest, predict_grpc, predict_rest, rest_request

RNG = np.random.default_rng(2)
IMAGES = RNG.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def servers(tiny_export):
    model, base, record = tiny_export
    standin = StandIn(record["savedmodel"], "tlkeras")
    rest = standin.start_rest()
    grpc_server, grpc_port = standin.start_grpc()
    yield {
        "rest": f"http://127.0.0.1:{rest.server_address[1]}/v1/models/tlkeras",
        "grpc": f"127.0.0.1:{grpc_port}",
        "reference": model.predict(IMAGES, verbose=0),
    }
    rest.shutdown()
    grpc_server.stop(None)


@pytest.mark.parametrize("form", ["instances", "inputs"])
def test_rest_raw_pixels(servers, form):
    out = predict_rest(servers["rest"], images=IMAGES, form=form)
    probs = out["probabilities"]
    assert probs.shape == (3, 10)
    assert np.abs(probs - servers["reference"]).max() <= 1e-4
    names = servers["reference"].argmax(1)
    assert out["labels"].tolist() == [CIFAR_NAMES[i] for i in names]  # names from the model
    assert tuple(out["class_names"][0]) == CIFAR_NAMES


def test_input_size_comes_from_the_model_metadata(servers):
    assert input_size_rest(servers["rest"]) == 32
    assert input_size_grpc(servers["grpc"], "tlkeras") == 32


def test_rest_b64_bytes_use_the_bytes_signature(servers):
    pngs = [tf.io.encode_png(x).numpy() for x in IMAGES]
    body = rest_request(image_bytes=pngs)
    assert body["signature_name"] == "predict_bytes" and "b64" in body["instances"][0]["image_bytes"]
    probs = predict_rest(servers["rest"], image_bytes=pngs)["probabilities"]
    assert np.abs(probs - servers["reference"]).max() <= 1e-4


def test_grpc_raw_and_bytes(servers):
    out = predict_grpc(servers["grpc"], "tlkeras", images=IMAGES)
    assert np.abs(out["probabilities"] - servers["reference"]).max() <= 1e-4
    assert out["labels"].tolist() == [CIFAR_NAMES[i] for i in servers["reference"].argmax(1)]
    pngs = [tf.io.encode_png(x).numpy() for x in IMAGES]
    probs = predict_grpc(servers["grpc"], "tlkeras", image_bytes=pngs)["probabilities"]
    assert np.abs(probs - servers["reference"]).max() <= 1e-4


def test_server_errors_are_user_errors(servers):
    with pytest.raises(UserError, match="answered HTTP 404"):
        predict_rest(servers["rest"].replace("tlkeras", "other"), images=IMAGES)
    with pytest.raises(UserError, match="refused the request: Servable not found"):
        predict_grpc(servers["grpc"], "other", images=IMAGES)


def test_every_cli_backend_gives_the_same_answer(servers, tiny_export, tmp_path, capsys):
    _, base, record = tiny_export
    path = tmp_path / "x.png"
    path.write_bytes(tf.io.encode_png(IMAGES[0]).numpy())
    outputs = []
    for model, backend in [
        (str(base / "tlkeras"), "savedmodel"),
        (record["onnx"], "onnx"),
        (servers["rest"], "rest"),
        (servers["grpc"] + "/tlkeras", "grpc"),
    ]:
        assert P.main([str(path), "--model", model, "--backend", backend]) == 0
        outputs.append(capsys.readouterr().out)
    assert len(set(outputs)) == 1, outputs
