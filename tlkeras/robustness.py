"""Inputs that are not clean test images: common corruptions, adversarial attacks, and
adversarial fine-tuning.

    corrupted = corrupt(images, "gaussian_blur", severity=3, seed=0)     # uint8 -> uint8
    adversarial = attack(model, images, labels, epsilon=8, steps=10)     # PGD, pixel units
    accuracy = robust_accuracy(model, images, labels, epsilon=2)

Pixel units throughout: images are the model's own input, RGB in [0, 255]; an L-infinity
budget `epsilon` of 8 means 8/255 of the range. Gradients are taken from the pixels
through the model's own preprocessing layer (see pixel_logits), so an attack is what a
client sending pixels to the exported model could do (short of rounding to uint8).
"""

from __future__ import annotations

import logging
import math

import keras
import numpy as np
import tensorflow as tf

# Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions
# and Perturbations", ICLR 2019: the CIFAR-10-C parameters of severities 1-5 (their
# make_cifar_c.py), on pixels in [0, 1]. Row 0 is ours: the identity (or as near as the
# operation allows), so severity 0 checks the code path itself.
SEVERITIES = {
    "gaussian_noise": (0.0, 0.04, 0.06, 0.08, 0.09, 0.10),  # std of added N(0, c)
    "shot_noise": (1e6, 500, 250, 100, 75, 50),  # photons per unit intensity: Poisson(x c) / c
    "gaussian_blur": (0.0, 0.4, 0.6, 0.7, 0.8, 1.0),  # sigma in pixels at 32x32 (scaled with S)
    "jpeg_compression": (100, 80, 65, 58, 50, 40),  # JPEG quality
    "pixelate": (1.0, 0.95, 0.9, 0.85, 0.75, 0.65),  # box-downsample to c * S, upsample back
    "brightness": (0.0, 0.05, 0.1, 0.15, 0.2, 0.3),  # added to the HSV value channel
    "contrast": (1.0, 0.75, 0.5, 0.4, 0.3, 0.15),  # (x - per-channel mean) * c + mean
}
CORRUPTIONS = tuple(SEVERITIES)  # also the config names of tfds's cifar10_corrupted
EPSILONS = (1, 2, 4, 8)  # L-infinity budgets of the report, /255
PGD_STEPS = 10
# PGD step = 2.5 * epsilon / steps (Madry et al. 2018): from a random start, the far side
# of the ball stays reachable.
PGD_STEP_FACTOR = 2.5
FGSM_RS_STEP_FACTOR = 1.25  # FGSM-RS training step = 1.25 * epsilon (Wong et al. 2020)


# ----------------------------------------------------------------------------- corruptions


def corrupt(images: tf.Tensor | np.ndarray, name: str, severity: int, seed: int = 0) -> tf.Tensor:
    """One CIFAR-10-C-style corruption of a batch, computed in the graph.

    images: uint8 [batch, S, S, 3]; returns uint8 [batch, S, S, 3] (rounded, clipped), what
    the published set stores. severity 1-5 are Hendrycks & Dietterich's; 0 is the identity
    (JPEG at quality 100 and shot noise at 1e6 photons: within a pixel level or two).
    The noise is seeded (stateless): the same images, name, severity and seed give the same
    result. Blur sigma scales with S/32, so a 224-pixel photo is blurred as much as CIFAR.
    Raises KeyError for an unknown name, IndexError for a severity outside 0-5.
    """
    c = SEVERITIES[name][severity]
    x = tf.cast(images, tf.float32) / 255.0
    size = int(x.shape[1])
    seed = tf.stack([tf.cast(seed, tf.int64), tf.constant(CORRUPTIONS.index(name) * 10 + severity, tf.int64)])
    if name == "gaussian_noise":
        x = x + tf.random.stateless_normal(tf.shape(x), seed, stddev=c)
    elif name == "shot_noise":
        x = tf.random.stateless_poisson(tf.shape(x), seed, lam=x * c, dtype=tf.float32) / c
    elif name == "gaussian_blur":
        x = _gaussian_blur(x, c * size / 32)
    elif name == "jpeg_compression":
        as_uint8 = tf.cast(tf.round(x * 255), tf.uint8)
        x = tf.map_fn(lambda im: tf.image.adjust_jpeg_quality(im, c), as_uint8)
        x = tf.cast(x, tf.float32) / 255.0
    elif name == "pixelate":
        small = max(1, int(size * c))
        x = tf.image.resize(tf.image.resize(x, (small, small), method="area"), (size, size), method="nearest")
    elif name == "brightness":
        hsv = tf.image.rgb_to_hsv(tf.clip_by_value(x, 0, 1))
        hsv = tf.concat([hsv[..., :2], tf.clip_by_value(hsv[..., 2:] + c, 0, 1)], axis=-1)
        x = tf.image.hsv_to_rgb(hsv)
    elif name == "contrast":
        mean = tf.reduce_mean(x, axis=(1, 2), keepdims=True)
        x = (x - mean) * c + mean
    return tf.cast(tf.round(tf.clip_by_value(x, 0, 1) * 255), tf.uint8)


def _gaussian_blur(x: tf.Tensor, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur, truncated at 4 sigma (scikit-image's default, which
    CIFAR-10-C used), edges mirrored; sigma 0 is the identity. x: float [b, H, W, 3]."""
    radius = math.ceil(4 * sigma)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / max(sigma, 1e-9)) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    channels = int(x.shape[-1])
    x = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="SYMMETRIC")
    for kernel in (taps.reshape(-1, 1, 1, 1), taps.reshape(1, -1, 1, 1)):  # rows, then columns
        x = tf.nn.depthwise_conv2d(x, np.tile(kernel, (1, 1, channels, 1)), [1, 1, 1, 1], "VALID")
    return x


# ----------------------------------------------------------------------------- attacks


def pixel_logits(model: keras.Model, pixels: tf.Tensor, training: bool = False) -> tf.Tensor:
    """Logits, float32 [batch, C], of a build_model model for float pixels [batch, S, S, 3]
    in [0, 255]: its layers called in order from the preprocessing on, the last softmax
    Dense without the softmax.

    Why not `model(pixels)`: its uint8 input layer casts floats to uint8, which has no
    gradient. Why logits: a saturated float32 softmax (p = 1.0) gives a zero gradient and a
    false sense of robustness. Shares `model`'s weights; works under any dtype policy.
    """
    x = pixels
    for layer in model.layers[1:-1]:  # a chain: preprocess, [resize], base, pool, head
        x = layer(x, training=training)
    head = model.layers[-1]
    return tf.matmul(tf.cast(x, head.kernel.dtype), head.kernel) + head.bias


def attack(
    model: keras.Model,
    images,
    labels,
    epsilon: float,
    steps: int = PGD_STEPS,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    training: bool = False,
) -> tf.Tensor:
    """L-infinity attack in pixel space: PGD by default (10 steps of 2.5 epsilon / 10 from
    a uniform random start; Madry et al. 2018); steps=1, step_size=epsilon, no random start
    is FGSM (Goodfellow et al. 2015); steps=1 with a random start and step 1.25 epsilon is
    Wong et al.'s FGSM-RS training attack.

    images: uint8 or float [batch, S, S, 3] in [0, 255]; labels: int [batch]; epsilon in
    pixel levels (8 = 8/255). Returns float32 adversarial pixels with
    |adv - images| <= epsilon and 0 <= adv <= 255 everywhere (projected after every step).
    """
    x0 = tf.cast(images, tf.float32)
    labels = tf.cast(labels, tf.int64)
    step = PGD_STEP_FACTOR * epsilon / steps if step_size is None else step_size
    if random_start:
        seeds = tf.stack([tf.cast(seed, tf.int64), tf.constant(1, tf.int64)])
        delta = tf.random.stateless_uniform(tf.shape(x0), seeds, -epsilon, epsilon)
    else:
        delta = tf.zeros_like(x0)
    delta = tf.clip_by_value(x0 + delta, 0.0, 255.0) - x0
    for _ in range(steps):
        with tf.GradientTape() as tape:
            tape.watch(delta)
            logits = pixel_logits(model, x0 + delta, training)
            loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, tf.cast(logits, tf.float32)))
        grad = tape.gradient(loss, delta)
        delta = tf.clip_by_value(delta + step * tf.sign(grad), -epsilon, epsilon)
        delta = tf.clip_by_value(x0 + delta, 0.0, 255.0) - x0
    return x0 + delta


class RobustAccuracy:
    """Accuracy of `model` under PGD (or FGSM) at any budget, its graph traced once (budget
    and seed are tensors): `RobustAccuracy(model)(images, labels, epsilon=8)`. images: uint8
    [n, S, S, 3], labels: int [n]; epsilon 0 gives the clean accuracy."""

    def __init__(self, model: keras.Model, steps: int = PGD_STEPS, fgsm: bool = False, batch_size: int = 64):
        self.batch_size = batch_size

        @tf.function(reduce_retracing=True)
        def predict(x, y, epsilon, seed):
            if fgsm:
                adv = attack(model, x, y, epsilon, steps=1, step_size=epsilon, random_start=False)
            else:
                adv = attack(model, x, y, epsilon, steps=steps, seed=seed)
            return tf.argmax(pixel_logits(model, adv), axis=1)

        self._predict = predict
        self._classify = tf.function(
            lambda x: tf.argmax(pixel_logits(model, tf.cast(x, tf.float32)), axis=1), reduce_retracing=True
        )  # epsilon 0: no attack, no gradients

    def __call__(self, images: np.ndarray, labels: np.ndarray, epsilon: float, seed: int = 0) -> float:
        return float(self.correct(images, labels, epsilon, seed).mean()) if len(images) else 0.0

    def correct(self, images: np.ndarray, labels: np.ndarray, epsilon: float, seed: int = 0) -> np.ndarray:
        """bool [n]: whether each image is still classified right after the attack."""
        out = []
        for i in range(0, len(images), self.batch_size):
            x, y = images[i : i + self.batch_size], labels[i : i + self.batch_size]
            if epsilon == 0:
                pred = self._classify(tf.constant(x))
            else:
                pred = self._predict(
                    tf.constant(x),
                    tf.constant(y, tf.int64),
                    tf.constant(float(epsilon)),
                    tf.constant(seed + i, tf.int64),
                )
            out.append(pred.numpy() == y)
        return np.concatenate(out) if out else np.zeros(0, bool)

    def cascade(
        self, images: np.ndarray, labels: np.ndarray, epsilons, seed: int = 0, clean: np.ndarray | None = None
    ) -> dict[float, float]:
        """Robust accuracy at each budget of `epsilons` (ascending), attacking at each only
        the images that survived every smaller one (and the clean pass): an adversarial
        image found inside a smaller ball lies inside the larger, so an image broken at 2/255
        is broken at 8/255 and need not be attacked again. The result is the accuracy under
        the union of the attacks up to that budget, never above the single-budget one for FGSM; as
        AutoAttack does (Croce & Hein 2020, attacks run only on points not yet broken). On a
        standard model most images fall at the first budget: about a third of the work.
        For PGD the figure is the single-budget one up to random-start noise (an image's
        start depends on its batch). clean: bool [n], the clean pass if already made."""
        alive = (self.correct(images, labels, 0.0, seed) if clean is None else clean).copy()
        out = {}
        for e in epsilons:
            idx = np.flatnonzero(alive)
            if len(idx):
                alive[idx] = self.correct(images[idx], labels[idx], e, seed)
            out[e] = float(alive.mean()) if len(alive) else 0.0
        return out


def robust_accuracy(
    model: keras.Model,
    images: np.ndarray,
    labels: np.ndarray,
    epsilon: float,
    steps: int = PGD_STEPS,
    fgsm: bool = False,
    seed: int = 0,
) -> float:
    """RobustAccuracy for one budget (traces its graph on every call)."""
    return RobustAccuracy(model, steps, fgsm)(images, labels, epsilon, seed)


# ----------------------------------------------------------------------------- fine-tuning


class AdversarialFinetune(keras.Model):
    """Trains `classifier` (a build_model model) on FGSM-RS examples: "Fast is better than
    free" (Wong, Rice & Kolter, ICLR 2020): per batch, one signed-gradient step of
    `step_size` from a uniform random start in the `epsilon` ball, then an ordinary step of
    the compiled loss on those images.

    Only `train_step` differs from Keras's: it replaces the batch's images and hands the
    batch to Keras's own step, so fit, callbacks, BackupAndRestore and tf.distribute work
    as they do for any model. Its weights are `classifier`'s, which is what is saved and
    exported (contract unchanged). Images: uint8 [batch, S, S, 3]; epsilon, step_size in
    pixel levels.
    """

    def __init__(self, classifier: keras.Model, epsilon: float, step_size: float, **kwargs):
        super().__init__(name=f"adversarial_{classifier.name}", **kwargs)
        self.classifier = classifier
        self.epsilon, self.step_size = float(epsilon), float(step_size)
        self.built = True  # all its variables are the (built) classifier's; BackupAndRestore checks

    def call(self, images, training=False):
        # Float pixels reach the layers (the classifier's uint8 input would round them).
        return tf.nn.softmax(pixel_logits(self.classifier, tf.cast(images, tf.float32), training))

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        seed = tf.cast(self.optimizer.iterations, tf.int64)  # a new start every step, reproducible
        adv = attack(self.classifier, x, y, self.epsilon, steps=1, step_size=self.step_size, seed=seed, training=True)
        adv = tf.stop_gradient(adv)
        return super().train_step((adv, y) if sample_weight is None else (adv, y, sample_weight))


class RobustAccuracyCheck(keras.callbacks.Callback):
    """The guard against catastrophic overfitting of FGSM training (Wong et al. 2020,
    section 5.3: PGD accuracy falls to 0 within an epoch while FGSM accuracy rises): after
    every epoch, PGD-10 accuracy at `epsilon` on a fixed validation slice, put in the
    epoch's logs as `val_robust_accuracy` for the checkpoint that keeps the best robust
    epoch, and into `history` ({epoch index: accuracy}) so a resumed run keeps it.

    Place it after CSVLogger (metrics.csv keeps the columns of both phases) and before
    the checkpoint callback.
    """

    KEY = "val_robust_accuracy"

    def __init__(
        self,
        classifier: keras.Model,
        images: np.ndarray,
        labels: np.ndarray,
        epsilon: float,
        history: dict[int, float],
        on_record=None,
        seed: int = 0,
    ):
        super().__init__()
        self.measure, self.images, self.labels = RobustAccuracy(classifier), images, labels
        self.epsilon, self.history, self.on_record, self.seed = epsilon, history, on_record, seed

    def on_epoch_end(self, epoch, logs=None):
        # cascade: the clean pass first, then PGD on the images it got right only
        accuracy = self.measure.cascade(self.images, self.labels, [self.epsilon], self.seed)[self.epsilon]
        best = max(self.history.values(), default=0.0)
        log = logging.getLogger("tlkeras")
        log.info(
            "finetune: epoch %d PGD-%d accuracy at %g/255 on %d val images: %.4f",
            epoch + 1,
            PGD_STEPS,
            self.epsilon,
            len(self.labels),
            accuracy,
        )
        if accuracy < best / 2:
            log.warning(
                "finetune: robust accuracy fell from %.4f to %.4f: catastrophic overfitting "
                "(Wong et al. 2020); the best robust epoch is kept",
                best,
                accuracy,
            )
        self.history[epoch] = accuracy
        if logs is not None:
            logs[self.KEY] = accuracy
        if self.on_record:
            self.on_record(self.history)
