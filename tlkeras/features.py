"""Phase 1's frozen-base pass, split over the strategy's replicas and workers.

    features, labels = compute_features(extractor, splits.train_plain)  # extractor built in strategy.scope()

Under MirroredStrategy each replica computes a slice of every batch; under
MultiWorkerMirroredStrategy tf.data shards the input (by file for prepared folders and
tfds records, else by example), each worker computes the features of its own share and the
batches are assembled by a collective all-gather, so every image's features are computed
once in the whole cluster and every worker ends with the same arrays. The order is the
gather's (worker by worker within each step), the labels travel with their features.
"""

from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

log = logging.getLogger("tlkeras")


def compute_features(
    extractor,
    images: tf.data.Dataset,
    flip: bool = False,
    progress=None,
    strategy: tf.distribute.Strategy | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features as float32, labels) of every (image, label) batch of `images`.

    `progress` (console.Progress) is told each batch's image count; `strategy`: the one the
    extractor was built under (default: its own).
    """
    strategy = strategy or getattr(extractor, "distribute_strategy", None) or tf.distribute.get_strategy()

    width = int(extractor.compute_output_shape((None, *images.element_spec[0].shape[1:]))[-1])

    def forward(x, y):
        x = tf.image.flip_left_right(x) if flip else x
        # The reshape: a replica left without images by a short last batch gets an empty
        # result of another width (measured: [0, 3]), which the gather would refuse.
        f = tf.reshape(tf.cast(extractor(x, training=False), tf.float32), [-1, width])
        return f, y, tf.shape(y)[0]

    feats, labels, local = [], [], 0

    def tick(images_in_step: int) -> None:
        if progress is not None:
            progress.add(images_in_step)

    if strategy.num_replicas_in_sync == 1:
        step = tf.function(forward)
        for x, y in images:
            f, y, _ = step(x, y)
            feats.append(f.numpy())
            labels.append(y.numpy())
            local += len(labels[-1])
            tick(len(labels[-1]))
    else:
        multi_worker = strategy.extended._in_multi_worker_mode()  # noqa: SLF001 - no public test
        run = tf.function(lambda batch: strategy.run(forward, args=batch))

        @tf.function
        def gathered(batch):
            # One collective per step (features and labels packed; class indices are exact
            # in float32): two gathers in flight could start in different orders per device.
            f, y, n = strategy.run(forward, args=batch)
            packed = strategy.run(lambda f, y: tf.concat([f, tf.cast(y, tf.float32)[:, None]], 1), args=(f, y))
            count = tf.add_n([tf.cast(v, tf.int64) for v in strategy.experimental_local_results(n)])
            return strategy.gather(packed, axis=0), count

        for batch in strategy.experimental_distribute_dataset(images):
            if multi_worker:
                both, n = gathered(batch)
                both = both.numpy()
                feats.append(both[:, :-1])
                labels.append(both[:, -1].astype(np.int64))
                local += int(n)
                tick(len(both))
            else:  # one host: the replicas' results in replica order are the batch
                f, y, _ = run(batch)
                for part, part_labels in zip(*(strategy.experimental_local_results(v) for v in (f, y))):
                    if len(part_labels):  # a replica left without images by a short last batch
                        feats.append(part.numpy())
                        labels.append(part_labels.numpy())
                        local += len(part_labels)
                        tick(len(part_labels))
    if progress is not None:
        progress.done()
    features, labels = np.concatenate(feats), np.concatenate(labels)
    if local != len(labels):  # workers: each says how much of the pass was its own
        log.info("head: this worker computed the features of %d images of %d", local, len(labels))
    return features, labels
