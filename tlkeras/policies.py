"""Small pure policies: batch split, schedule lengths, strategy and precision choice.

Kept free of TensorFlow so they are trivial to test and to read in one sitting.
"""

from __future__ import annotations

import math

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
