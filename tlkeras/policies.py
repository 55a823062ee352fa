"""Small pure policies: batch split, schedule lengths, strategy and precision choice.

Kept free of TensorFlow so they are trivial to test and to read in one sitting.
"""

from __future__ import annotations

import math

from tlkeras.bases import BASES
from tlkeras.errors import ConfigError


def per_replica_batch(global_batch: int, replicas: int) -> int:
    """tf.distribute splits each global batch evenly; an uneven split is refused."""
    if global_batch % replicas:
        lower = global_batch // replicas * replicas or replicas
        raise ConfigError(
            f"data.batch_size={global_batch} does not split evenly across {replicas} "
            f"replicas; use a multiple of {replicas}, e.g. {lower} or {lower + replicas}"
        )
    return global_batch // replicas


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    return max(1, math.ceil(num_examples / global_batch))


def warmup_steps(warmup_epochs: float, steps: int, total_steps: int) -> int:
    """Warm-up never takes the whole phase: cosine decay keeps at least one step."""
    return min(round(warmup_epochs * steps), max(total_steps - 1, 0))


def choose_strategy(requested: str, tf_config_set: bool, num_gpus: int) -> str:
    """auto: multi_worker under TF_CONFIG, mirrored with a GPU, default otherwise."""
    if requested != "auto":
        return requested
    if tf_config_set:
        return "multi_worker"
    return "mirrored" if num_gpus > 0 else "default"


def is_chief(task_type: str | None, task_id: int | None, cluster_has_chief: bool) -> bool:
    """TF's rule: the 'chief' task, or worker 0 when the cluster names no chief."""
    if task_type is None:  # not a cluster
        return True
    if cluster_has_chief:
        return task_type == "chief"
    return task_type == "worker" and task_id == 0


def tf_config_problem(text: str) -> str | None:
    """What is wrong with a TF_CONFIG value, in words, or None if it describes a cluster
    and this process's place in it (TensorFlow itself raises a JSONDecodeError or a
    ValueError traceback, or waits)."""
    import json

    try:
        tf_config = json.loads(text)
    except ValueError as e:
        return f"is not valid JSON ({e})"
    example = '{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}'
    if not isinstance(tf_config, dict):
        return f"must be a JSON object such as {example}"
    cluster, task = tf_config.get("cluster"), tf_config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        return f"has no 'cluster' of task types and addresses, e.g. {example}"
    for kind, addresses in cluster.items():
        if (
            not isinstance(addresses, list)
            or not addresses
            or not all(isinstance(a, str) and ":" in a for a in addresses)
        ):
            return f"cluster.{kind} must be a list of 'host:port' addresses, not {addresses!r}"
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        return f"has no 'task' with a 'type' and an 'index', e.g. {example}"
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        return f"task type {kind!r} is not in the cluster ({', '.join(cluster)})"
    n = len(cluster[kind])
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < n:
        return f"task index {index!r} is out of range: cluster.{kind} lists {n} address(es), so 0 to {n - 1}"
    return None


def choose_precision(requested: str, num_gpus: int, cpu_flags: set[str] = frozenset()) -> str:
    """auto: float16 on GPUs (Tensor Cores); bfloat16 on CPUs with native bf16 matrix
    units (AMX / AVX512-BF16: 2x images/s measured on this project's CPU); else float32,
    since emulated bf16 is slower than float32."""
    if requested != "auto":
        return requested
    if num_gpus > 0:
        return "mixed_float16"
    return "mixed_bfloat16" if cpu_flags & {"amx_bf16", "avx512_bf16"} else "float32"


def read_cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo) as f:
            return {flag for line in f if line.startswith("flags") for flag in line.split()[2:]}
    except OSError:  # not Linux: no bf16 guess
        return set()


def unfreeze_start(layer_names: list[str], blocks: tuple[str, ...], unfreeze: str, base: str) -> int:
    """Index of the first base layer to train in phase 2: "all", a block or a layer name.

    A block starts at its first layer, `<block>_...` (so MobileNetV2's "block_1" is never
    "block_13"); `base` ("VGG16") only names the base in the error.
    """
    if unfreeze == "all":
        return 0
    prefix = unfreeze + "_" if unfreeze in blocks else None
    for i, name in enumerate(layer_names):
        if name == unfreeze or (prefix and name.startswith(prefix)):
            return i
    # e.g. the first layer of the last block that has its own layer names ('block5_conv1')
    firsts = [next((n for n in layer_names if n == b or n.startswith(b + "_")), b) for b in blocks]
    example = next((n for n in reversed(firsts) if n not in blocks), layer_names[-1])
    raise ConfigError(
        f"finetune.unfreeze={unfreeze!r} names no {base} layer; use 'all', a block "
        f"({', '.join(blocks)}) or a layer name such as {example!r}"
    )


def storage_size(requested: int | None, native: int | None, model_size: int) -> int:
    """The data's storage size S: the setting, else the dataset's own square size, else
    the model's input resolution (so photos are resized once, not twice)."""
    return requested or native or model_size


def carve_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) images carved from one class of n: shares rounded half up (not Python's
    half-to-even: 5 images at 0.1 give 1), at least one image kept for train."""
    n_val, n_test = math.floor(n * val_fraction + 0.5), math.floor(n * test_fraction + 0.5)
    while n_val + n_test >= n and (n_val or n_test):  # a class never vanishes from train
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test


def balanced_class_weights(counts: list[int]) -> dict[int, float]:
    """Keras `class_weight` inversely proportional to class frequency: n / (k * n_c), so
    the weighted classes count equally and the mean weight per example is 1 (scikit-learn's
    'balanced' rule). Classes with no examples get weight 0."""
    total, k = sum(counts), len(counts)
    return {i: (total / (k * c) if c else 0.0) for i, c in enumerate(counts)}


def final_phase(val_accuracy: dict[str, float]) -> str:
    """The phase whose best weights are shipped: the highest validation accuracy, the later
    phase on a tie (fine-tuning that only matches the head is kept). Phases in run order."""
    order = list(val_accuracy)
    score = {p: v if math.isfinite(v) else -math.inf for p, v in val_accuracy.items()}  # NaN never wins
    return max(order, key=lambda phase: (score[phase], order.index(phase)))


def split_names(spec: str) -> set[str]:
    """The split names a tfds split string reads ('train[:10%]+val' -> {'train', 'validation'})."""
    names = {part.split("[")[0].strip() for part in spec.split("+")}
    return {"validation" if n == "val" else n for n in names}


def assign_splits(available: list[str], explicit: dict[str, str | None]) -> dict[str, str | None]:
    """What each role (train, val, test) reads: the explicit split string, else a published
    split's name, else None: carved from 'train' (for train itself: 'train' minus the carves).

    test: 'test', else 'validation' (so the split that picks the best epoch is never the
    one reported: val is then carved); val: 'validation' if it is still free. A published
    split that an explicit string already reads is not free.
    """
    roles = dict(explicit)
    used = set().union(*(split_names(s) for s in explicit.values() if s is not None))
    free = [name for name in ("test", "validation") if name in available and name not in used]
    if roles["test"] is None and free:
        roles["test"] = free.pop(0)
    if roles["val"] is None and "validation" in free:
        roles["val"] = "validation"
    return roles


# ------------------------------------------------------------------ auto recipe
# The policies behind the "auto" settings (tlkeras.recipe applies them; docs/recipes.md).
# Each returns (value, reason): the reason is logged and written to recipe.yaml.

# A 2-core CPU cannot afford the bases' native 224x224 in a few minutes: VGG16 costs
# 15.3 G multiply-adds per image there; 160 costs half, 128 a third.
CPU_RESOLUTION = {"vgg16": 160, "mobilenet_v2": 160}
# Each base's top block (tiny data, or features already close to the data), a middle
# block, and the deepest point fine-tuned on a CPU: a VGG16 training step from block4 costs
# about 1.8x its frozen forward pass, from block3 2.4x, from block1 3x (multiply-adds per
# block at 224: 1.9, 2.8, 4.6, 4.6, 1.4 G), so a few thousand photos fine-tune for 3
# epochs in about 10 minutes on 2 cores from block4.
TOP_BLOCK = {"vgg16": "block5", "mobilenet_v2": "block_13"}
MIDDLE_BLOCK = {"vgg16": "block4", "mobilenet_v2": "block_6"}
DEEP = {"vgg16": "block4", "mobilenet_v2": "all"}
TINY_DEEP = {"vgg16": "block3", "mobilenet_v2": "all"}  # few images: a deep step is cheap


def auto_batch_size(num_train: int, replicas: int = 1, accelerator: bool = False) -> tuple[int, str]:
    """Global batch: a power of two at most 1/8 of the training images (at least 8
    updates per epoch), at least 8 (and one per replica), at most 64 per replica on a CPU
    (small batches: more updates for the same images/s) or 128 on an accelerator;
    always a multiple of `replicas`."""
    cap = (128 if accelerator else 64) * replicas
    batch = 8
    while batch * 2 <= min(num_train / 8, cap):
        batch *= 2
    batch = max(batch, replicas)
    batch -= batch % replicas
    return batch, f"{num_train} train images / 8, power of two in [8, {cap}]"


def auto_resolution(short_side: int | None, backbone: str, accelerator: bool) -> tuple[int, str]:
    """The model's input resolution: the base's native size on an accelerator, a CPU size
    (CPU_RESOLUTION) on a CPU, but never far past the images' own median short side
    (`short_side`; None: unknown, taken as large): photos are not upscaled beyond their
    size (rounded to a multiple of 32), except tiny images (under 64 pixels), which are
    upscaled 2x (CIFAR-10 at 64x64 beats 32x32 by 10+ points with VGG16, README)."""
    target = BASES[backbone].native_resolution if accelerator else CPU_RESOLUTION[backbone]
    where = f"{'native size on an accelerator' if accelerator else 'CPU size'} {target}"
    if short_side is None:
        return target, f"{where}; image size unknown"
    tiny = short_side < 64
    ceiling = 2 * short_side if tiny else short_side
    ceiling = max(32, (ceiling + 16) // 32 * 32)  # a multiple of 32: both bases halve the size 5 times
    if ceiling < target:
        how = "2x for tiny images" if tiny else "no upscaling"
        return ceiling, f"images' median short side {short_side}px ({how}; {where})"
    return target, f"{where}; images' median short side {short_side}px"


# BiT HyperRule (Kolesnikov et al. 2020, "Big Transfer (BiT): General Visual Representation
# Learning", section 3.3 and bit_hyperrule.py): fine-tune for 500 steps below 20k examples,
# 10k steps below 500k, else 20k, at batch 512. Here the buckets are kept and counted in
# images seen (steps x 512), divided by CPU_SCALE on a CPU, where one VGG16 image costs
# 13-20 ms to train at 128-160 px: a few thousand photos fine-tune in minutes, not hours.
# 8 (about 9 epochs of 3,457 flowers) was measured: VGG16 block4 at 1e-4 on flowers_128px
# gained on validation for all of 8 epochs (0.67 -> 0.82), where 2 never beat the head.
BIT_BUCKETS = ((20_000, 500), (500_000, 10_000), (math.inf, 20_000))  # (examples below, steps at batch 512)
BIT_BATCH = 512
CPU_SCALE = 8
HEAD_EPOCHS = (5, 20)  # phase 1 on cached features costs seconds an epoch: the bounds only keep it sane
FINETUNE_EPOCHS = {False: (1, 10), True: (1, 30)}  # (min, max), by accelerator


def bit_steps(num_train: int) -> int:
    """BiT's fine-tuning steps at batch 512 for a dataset of `num_train` examples."""
    return next(steps for below, steps in BIT_BUCKETS if num_train < below)


def auto_epochs(num_train: int, batch: int, accelerator: bool) -> tuple[tuple[int, str], tuple[int, str]]:
    """((head epochs, reason), (fine-tuning epochs, reason)) from the BiT bucket of the
    dataset size, converted from images seen to epochs of `num_train` at `batch`.

    Phase 1 takes BiT's whole bucket (its features are computed once, an epoch costs a
    fraction of a second per thousand images), bounded by HEAD_EPOCHS; phase 2 takes it
    divided by CPU_SCALE on a CPU, bounded by FINETUNE_EPOCHS."""
    num_train = max(num_train, 1)
    steps = bit_steps(num_train)
    seen = steps * BIT_BATCH
    bucket = f"BiT bucket {steps} steps x {BIT_BATCH} for {num_train} images"
    head_lo, head_hi = HEAD_EPOCHS
    head = min(max(math.ceil(seen / num_train), head_lo), head_hi)
    ft_seen = seen if accelerator else seen / CPU_SCALE
    ft_lo, ft_hi = FINETUNE_EPOCHS[accelerator]
    finetune = min(max(round(ft_seen / num_train), ft_lo), ft_hi)
    scale = "" if accelerator else f" / {CPU_SCALE} (CPU)"
    steps_each = steps_per_epoch(num_train, batch)
    return (
        (head, f"{bucket}, within {head_lo}-{head_hi} epochs ({steps_each} steps each)"),
        (finetune, f"{bucket}{scale}, within {ft_lo}-{ft_hi} epochs"),
    )


def auto_unfreeze(num_train: int, probe_accuracy: float | None, backbone: str, accelerator: bool) -> tuple[str, str]:
    """How deep phase 2 trains: the top block for tiny data (under 500 images: more
    trainable weights than it can fit) whose probe is fair, or when the frozen features
    already separate the classes (val accuracy after phase 1 >= 0.9: the data is close to
    ImageNet); a middle block when the probe is fair (>= 0.75); otherwise deep (VGG16 from
    block4 on a CPU, from block3 for tiny data, all layers on an accelerator; MobileNetV2
    all layers). Measured on 450 CIFAR-10 images (probe 0.66, 1,000 test images): block5
    0.690, block4 0.675, block3 0.713 (1e-4, 10 epochs; hand-tuned best 0.721)."""
    probe = "unknown" if probe_accuracy is None else f"{probe_accuracy:.3f}"
    if num_train < 500 and (probe_accuracy is None or probe_accuracy >= 0.75):
        return TOP_BLOCK[backbone], f"tiny data ({num_train} train images): top block only"
    if num_train < 500:
        why = (
            f"tiny data ({num_train} train images) far from ImageNet (probe {probe} < 0.75): deep, cheap on few images"
        )
        return TINY_DEEP[backbone], why
    if probe_accuracy is not None and probe_accuracy >= 0.9:
        return TOP_BLOCK[backbone], f"frozen-feature val accuracy {probe} >= 0.9: close to ImageNet"
    if probe_accuracy is not None and probe_accuracy >= 0.75:
        return MIDDLE_BLOCK[backbone], f"frozen-feature val accuracy {probe} in [0.75, 0.9)"
    deep = "all" if accelerator else DEEP[backbone]
    return deep, f"frozen-feature val accuracy {probe} < 0.75: far from ImageNet"


def auto_finetune_rate(num_train: int, probe_accuracy: float | None) -> tuple[float, str]:
    """Adam's peak rate in phase 2, 10-100x below the head's 1e-3 (keras-io guide): 1e-5
    when the features are already good (probe >= 0.9); else 1e-4, the rate hand-tuned for
    flowers_128px and CIFAR-10 at 64x64 (README), which also beat 3e-5 for flowers' fair
    probe (0.76: val 0.82 after 8 epochs against the head's 0.76, where 3e-5 stayed below
    the head) and 1e-5 for 450 CIFAR-10 images (probe 0.66: test 0.690 against 0.663).
    `num_train` only words the reason: tiny data sets the depth, not the rate."""
    probe = "unknown" if probe_accuracy is None else f"{probe_accuracy:.3f}"
    if probe_accuracy is not None and probe_accuracy >= 0.9:
        return 1e-5, f"probe {probe} >= 0.9, {num_train} images: keep the features"
    return 1e-4, f"probe {probe} < 0.9: the features must move"


HEAD_EPOCH_S = 0.5  # a phase-1 epoch on cached features: Keras's per-epoch work dominates (2 busy cores)
PLAN_MARGIN = 0.9  # of a time budget, planned; the rest absorbs the estimates' error


def plan_budget(
    budget_s: float,
    counts: tuple[int, int],
    feature_ips: float,
    finetune_ips: dict[str, float],
    reference: int,
    resolutions: list[int],
    head_epochs: int,
    finetune_epochs: int,
    after_images: int = 0,
    fixed_s: float = 0.0,
    mirrored: bool = True,
    margin: float = PLAN_MARGIN,
) -> dict:
    """The largest recipe that fits `budget_s` seconds: a resolution, a fine-tuning depth
    and a number of fine-tuning epochs. Pure: the throughputs are measured by the caller.

    `counts`: (train, val) images; `feature_ips`: images/s of the frozen base at
    `reference` pixels; `finetune_ips`: images/s of a fine-tuning step at `reference` for
    each candidate depth, deepest first; `resolutions`: candidates, largest first (cost
    scales with the pixel count); `fixed_s`: what does not scale (start-up, export), and
    `finetune_epochs` the most worth running; `after_images`: the forward passes after
    training (test split, quick report), charged at the frozen speed. Only `margin` of the
    budget is planned, for the estimate's error.

    Prefers, in order: fine-tuning epochs up to min(2, finetune_epochs) (one epoch of
    fine-tuning beats a larger resolution without), the deeper depth, the larger
    resolution, then more epochs. Returns {"fits": False, "need_s": ...}
    when even phase 1 at the smallest resolution does not fit.
    """
    n_train, n_val = counts
    plan_s = budget_s * margin
    wanted = min(2, finetune_epochs)
    best, need = None, math.inf
    for depth_rank, (depth, ips) in enumerate(finetune_ips.items()):
        for res_rank, res in enumerate(resolutions):
            scale = (res / reference) ** 2
            feat = feature_ips / scale
            head_s = (n_train * (2 if mirrored else 1) + n_val) / feat + head_epochs * HEAD_EPOCH_S
            after_s = after_images / feat + fixed_s
            need = min(need, head_s + after_s)
            left = plan_s - head_s - after_s
            if left < 0:
                continue
            epoch_s = n_train / (ips / scale) + n_val / feat
            epochs = min(finetune_epochs, int(left // epoch_s))
            key = (min(epochs, wanted), -depth_rank, -res_rank, epochs)
            if best is None or key > best[0]:
                estimate = head_s + after_s + epochs * epoch_s
                best = (key, {"resolution": res, "unfreeze": depth, "finetune_epochs": epochs, "estimate_s": estimate})
    if best is None:
        return {"fits": False, "need_s": need / margin}
    return {"fits": True, **best[1]}
