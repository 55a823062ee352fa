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


VGG16_LAYERS = ["input_layer"] + [
    f"block{b}_{kind}"
    for b, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
    for kind in [f"conv{i}" for i in range(1, convs + 1)] + ["pool"]
]


def unfreeze_start(layer_names: list[str], unfreeze: str) -> int:
    """Index of the first base layer to train in phase 2 ("all", a block or a layer name)."""
    if unfreeze == "all":
        return 0
    for i, name in enumerate(layer_names):
        if name == unfreeze or name.startswith(unfreeze + "_"):
            return i
    blocks = sorted({n.split("_")[0] for n in layer_names if n.startswith("block")})
    raise ConfigError(
        f"finetune.unfreeze={unfreeze!r} names no VGG16 layer; use 'all', a block "
        f"({', '.join(blocks)}) or a layer name such as 'block5_conv1'"
    )
