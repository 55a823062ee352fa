import pytest

from tlkeras.errors import ConfigError
from tlkeras.policies import (
    choose_precision,
    choose_strategy,
    per_replica_batch,
    read_cpu_flags,
    steps_per_epoch,
    unfreeze_start,
    warmup_steps,
)

VGG_LAYERS = [
    "input_layer",
    "block1_conv1",
    "block1_conv2",
    "block1_pool",
    "block2_conv1",
    "block2_conv2",
    "block2_pool",
    "block5_conv1",
    "block5_conv2",
    "block5_pool",
]


def test_per_replica_batch_splits_evenly_or_says_how_to_fix():
    assert per_replica_batch(256, 8) == 32
    assert per_replica_batch(64, 1) == 64
    with pytest.raises(ConfigError, match=r"batch_size=100 .* 3 replicas; use a multiple of 3, e.g. 99 or 102"):
        per_replica_batch(100, 3)


def test_steps_per_epoch_counts_the_partial_batch():
    assert steps_per_epoch(45000, 256) == 176
    assert steps_per_epoch(512, 64) == 8
    assert steps_per_epoch(3, 64) == 1


def test_warmup_is_bounded_by_the_phase():
    assert warmup_steps(1.0, 100, 1000) == 100
    assert warmup_steps(0.5, 100, 1000) == 50
    assert warmup_steps(0.0, 100, 1000) == 0
    assert warmup_steps(5.0, 100, 200) == 199  # cosine still gets a step


@pytest.mark.parametrize(
    "requested, tf_config, gpus, expected",
    [
        ("auto", False, 0, "default"),
        ("auto", False, 2, "mirrored"),
        ("auto", True, 0, "multi_worker"),
        ("auto", True, 4, "multi_worker"),
        ("default", True, 4, "default"),
        ("mirrored", False, 0, "mirrored"),
    ],
)
def test_choose_strategy(requested, tf_config, gpus, expected):
    assert choose_strategy(requested, tf_config, gpus) == expected


def test_choose_precision():
    assert choose_precision("auto", 0, {"avx2", "fma"}) == "float32"
    assert choose_precision("auto", 0, {"avx512f", "amx_bf16"}) == "mixed_bfloat16"
    assert choose_precision("auto", 1, {"amx_bf16"}) == "mixed_float16"
    assert choose_precision("float32", 0, {"amx_bf16"}) == "float32"


def test_read_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 amx_tile\n")
    assert read_cpu_flags(str(info)) == {"fpu", "avx512_bf16", "amx_tile"}
    assert read_cpu_flags(str(tmp_path / "missing")) == set()


VGG_BLOCKS = ("block1", "block2", "block5")
MOBILENET_LAYERS = [
    "input_layer",
    "Conv1",
    "bn_Conv1",
    "block_1_expand",
    "block_1_project",
    "block_13_expand",
    "block_13_project",
    "block_16_expand",
    "Conv_1",
    "Conv_1_bn",
    "out_relu",
]
MOBILENET_BLOCKS = ("block_1", "block_13", "block_16", "Conv_1")


def test_unfreeze_start():
    assert unfreeze_start(VGG_LAYERS, VGG_BLOCKS, "all", "VGG16") == 0
    assert unfreeze_start(VGG_LAYERS, VGG_BLOCKS, "block5", "VGG16") == 7
    assert unfreeze_start(VGG_LAYERS, VGG_BLOCKS, "block2_conv2", "VGG16") == 5
    with pytest.raises(
        ConfigError,
        match=r"'block9' names no VGG16 layer; .*\(block1, block2, block5\) "
        r"or a layer name such as 'block5_conv1'",
    ):
        unfreeze_start(VGG_LAYERS, VGG_BLOCKS, "block9", "VGG16")


def test_unfreeze_start_mobilenet_v2_blocks_are_whole_names():
    assert unfreeze_start(MOBILENET_LAYERS, MOBILENET_BLOCKS, "block_1", "MobileNetV2") == 3
    assert unfreeze_start(MOBILENET_LAYERS, MOBILENET_BLOCKS, "block_13", "MobileNetV2") == 5
    assert unfreeze_start(MOBILENET_LAYERS, MOBILENET_BLOCKS, "block_16_expand", "MobileNetV2") == 7
    assert unfreeze_start(MOBILENET_LAYERS, MOBILENET_BLOCKS, "Conv_1", "MobileNetV2") == 8
    assert unfreeze_start(MOBILENET_LAYERS, MOBILENET_BLOCKS, "Conv1", "MobileNetV2") == 1
    # "block_1" is not a prefix of "block_13_...", whichever comes first.
    reordered = ["block_13_expand", "block_1_expand"]
    assert unfreeze_start(reordered, ("block_1", "block_13"), "block_1", "MobileNetV2") == 1
    # Only listed blocks match as prefixes: "block" and "Conv" are no unfreeze points.
    for bad in ("block", "Conv", "block_2", "block_1_exp"):
        with pytest.raises(
            ConfigError,
            match=rf"'{bad}' names no MobileNetV2 layer; .*"
            r"\(block_1, block_13, block_16, Conv_1\) .*'block_16_expand'",
        ):
            unfreeze_start(MOBILENET_LAYERS, MOBILENET_BLOCKS, bad, "MobileNetV2")


def test_final_phase_is_the_best_by_validation_accuracy_later_on_ties():
    from tlkeras.policies import final_phase

    assert final_phase({"head": 0.95, "finetune": 0.97}) == "finetune"
    assert final_phase({"head": 0.96, "finetune": 0.94}) == "head"  # fine-tuning made it worse
    assert final_phase({"head": 1.0, "finetune": 1.0}) == "finetune"
    assert final_phase({"head": 0.5}) == "head"


@pytest.mark.parametrize(
    "available, explicit, expected",
    [
        (["train", "test"], {}, {"train": None, "val": None, "test": "test"}),
        (["train"], {}, {"train": None, "val": None, "test": None}),
        (["train", "validation", "test"], {}, {"train": None, "val": "validation", "test": "test"}),
        (["train", "validation"], {}, {"train": None, "val": None, "test": "validation"}),  # never both
        (["train", "validation"], {"test": "train[:10]"}, {"train": None, "val": "validation", "test": "train[:10]"}),
        (["train", "validation", "test"], {"test": "validation"}, {"train": None, "val": None, "test": "validation"}),
        (["train", "validation"], {"val": "val[:50%]"}, {"train": None, "val": "val[:50%]", "test": None}),
    ],
)
def test_assign_splits_never_reports_on_the_split_that_picks_the_epoch(available, explicit, expected):
    from tlkeras.policies import assign_splits

    explicit = {"train": None, "val": None, "test": None, **explicit}
    assert assign_splits(available, explicit) == expected


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"cluster": {"worker": ["a:1", "b:1"]}, "task": {"type": "worker", "index": 1}}', None),
        ("{oops", "is not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"task": {"type": "worker", "index": 0}}', "has no 'cluster'"),
        (
            '{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}',
            "cluster.worker must be a list of 'host:port'",
        ),
        ('{"cluster": {"worker": ["a:1"]}}', "has no 'task'"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}',
            "task type 'chief' is not in the cluster (worker)",
        ),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}', "task index 1 is out of range"),
        (
            '{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": "0"}}',
            "task index '0' is out of range",
        ),
    ],
)
def test_tf_config_problem(text, problem):
    from tlkeras.policies import tf_config_problem

    found = tf_config_problem(text)
    assert found == problem if problem is None else problem in found
