"""Phase 1's frozen-base pass under a strategy equals the single-device pass."""

import keras
import numpy as np
import tensorflow as tf

from tlkeras.features import compute_features


def tiny_extractor():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8, 8, 3), dtype="uint8"),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )


def test_mirrored_feature_pass_equals_the_single_device_pass(caplog):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (13, 8, 8, 3), np.uint8)  # 13: the last batch is partial and odd
    labels = np.arange(13, dtype=np.int64)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    single = tiny_extractor()
    want, want_labels = compute_features(single, data, flip=True)

    strategy = tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    assert strategy.num_replicas_in_sync == 2
    with strategy.scope():
        mirrored = tiny_extractor()
    mirrored.set_weights(single.get_weights())
    got, got_labels = compute_features(mirrored, data, flip=True)
    np.testing.assert_array_equal(got_labels, want_labels)  # the batch order is kept
    assert got.dtype == np.float32 and got.shape == want.shape == (13, 4)
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_two_loopback_workers_each_compute_their_own_share_of_a_folder(tmp_path):
    """MultiWorkerMirroredStrategy on 127.0.0.1: each worker reads its own shard files and
    computes the features of its share; the shares add up to every image exactly once."""
    import json
    import os
    import re
    import subprocess
    import sys

    from conftest import free_port, make_image_folder, tiny_overrides

    root = make_image_folder(tmp_path / "photos", {"a": 20, "b": 20})
    overrides = tiny_overrides(
        **{"data.dataset": str(root), "finetune.epochs": "0", "runtime.mixed_precision": "float32"}
    )
    args = [a for kv in overrides for a in ("--set", kv)]
    cluster = {"worker": [f"127.0.0.1:{free_port()}" for _ in range(2)]}
    procs, logs = [], [tmp_path / f"worker{i}.log" for i in range(2)]
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})}
        with logs[index].open("w") as out:  # files, not pipes: lockstepped workers never block
            cmd = [sys.executable, "-m", "tlkeras.train", "--run-dir", str(tmp_path / "run"), *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    outs = [log.read_text() for log in logs]
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert sum(out.count("data: preparing") for out in outs) == 1  # one worker decodes, the other waits
    shares = [re.findall(r"this worker computed the features of (\d+) images of (\d+)", out) for out in outs]
    assert len(shares[0]) == len(shares[1]) == 3  # train, mirrored train, val
    for (mine, total), (theirs, total_again) in zip(*shares):
        assert total == total_again and int(mine) + int(theirs) == int(total)
        assert 0 < int(mine) < int(total)
