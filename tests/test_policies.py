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


# ------------------------------------------------------------------ auto recipe

from tlkeras.policies import (  # noqa: E402
    auto_batch_size,
    auto_epochs,
    auto_finetune_rate,
    auto_resolution,
    auto_unfreeze,
    bit_steps,
    plan_budget,
)


@pytest.mark.parametrize(
    "num_train, replicas, accelerator, expected",
    [
        (30, 1, False, 8),  # the floor: never below 8
        (220, 1, False, 16),  # hymenoptera: 220 / 8 = 27 -> 16
        (3020, 1, False, 64),  # flowers: capped at 64 on a CPU
        (45000, 1, False, 64),
        (45000, 1, True, 128),  # 128 per accelerator
        (45000, 2, True, 256),
        (220, 2, True, 16),
        (30, 3, False, 6),  # a multiple of the replicas
        (100, 16, True, 16),  # at least one image per replica
    ],
)
def test_auto_batch_size(num_train, replicas, accelerator, expected):
    batch, reason = auto_batch_size(num_train, replicas, accelerator)
    assert batch == expected and batch % replicas == 0 and reason


@pytest.mark.parametrize(
    "short_side, backbone, accelerator, expected",
    [
        (375, "vgg16", False, 160),  # photos on a CPU: the CPU size
        (375, "vgg16", True, 224),  # on a GPU: the native size
        (375, "mobilenet_v2", False, 160),
        (None, "vgg16", False, 160),  # unknown: as large photos
        (128, "vgg16", False, 128),  # flowers_128px: no upscaling
        (128, "vgg16", True, 128),
        (100, "vgg16", False, 96),  # a multiple of 32, not past the photos
        (150, "vgg16", True, 160),
        (32, "vgg16", False, 64),  # CIFAR-10: tiny images upscaled 2x
        (32, "vgg16", True, 64),
        (10, "vgg16", False, 32),  # never below 32
    ],
)
def test_auto_resolution_never_upscales_far_past_the_images(short_side, backbone, accelerator, expected):
    assert auto_resolution(short_side, backbone, accelerator)[0] == expected


@pytest.mark.parametrize(
    "num_train, expected", [(100, 500), (19_999, 500), (20_000, 10_000), (499_999, 10_000), (500_000, 20_000)]
)
def test_bit_buckets(num_train, expected):
    assert bit_steps(num_train) == expected


@pytest.mark.parametrize(
    "num_train, batch, accelerator, head, finetune",
    [
        (220, 16, False, 20, 10),  # tiny: both at their caps
        (3020, 64, False, 20, 10),  # 256,000 / 8 images seen -> 10.6 epochs, capped
        (5000, 64, False, 20, 6),
        (45000, 64, False, 20, 10),  # the 10k-step bucket
        (600_000, 64, False, 18, 2),
        (3020, 128, True, 20, 30),  # accelerator: BiT's images seen, capped at 30 epochs
        (600_000, 256, True, 18, 17),
    ],
)
def test_auto_epochs_from_bit_buckets(num_train, batch, accelerator, head, finetune):
    (h, _), (f, _) = auto_epochs(num_train, batch, accelerator)
    assert (h, f) == (head, finetune)


@pytest.mark.parametrize(
    "num_train, probe, backbone, accelerator, unfreeze, rate",
    [
        (220, 0.8, "vgg16", False, "block5", 1e-4),  # tiny data, fair probe: top block; rate by the probe
        (220, 0.5, "vgg16", False, "block3", 1e-4),  # tiny and far from ImageNet: deep is cheap on few images
        (220, None, "vgg16", False, "block5", 1e-4),  # before phase 1 (a budget's plan): the top block
        (220, 0.95, "mobilenet_v2", False, "block_13", 1e-5),
        (3000, 0.95, "vgg16", False, "block5", 1e-5),  # close to ImageNet: shallow and slow
        (3000, 0.8, "vgg16", False, "block4", 1e-4),  # fair: a middle block, at the hand-tuned rate
        (3000, 0.8, "mobilenet_v2", False, "block_6", 1e-4),
        (3000, 0.6, "vgg16", False, "block4", 1e-4),  # far from ImageNet: deep (for a CPU), faster
        (3000, 0.6, "vgg16", True, "all", 1e-4),
        (3000, 0.6, "mobilenet_v2", False, "all", 1e-4),
        (3000, None, "vgg16", False, "block4", 1e-4),  # before phase 1: from the size alone
    ],
)
def test_auto_unfreeze_and_rate(num_train, probe, backbone, accelerator, unfreeze, rate):
    assert auto_unfreeze(num_train, probe, backbone, accelerator)[0] == unfreeze
    assert auto_finetune_rate(num_train, probe)[0] == rate


PLAN = dict(
    counts=(1000, 100),
    reference=160,
    resolutions=[160, 128, 96],
    head_epochs=10,
    finetune_epochs=5,
    after_images=1000,
    fixed_s=50,
    mirrored=False,
    margin=1.0,
)


@pytest.mark.parametrize(
    "budget_s, feature_ips, finetune_ips, expected",
    [
        # head 1100/100 + 5 = 16 s, after 1000/100 + 50 = 60 s; an epoch 1000/20 + 1 = 51 s
        (1000, 100, {"block3": 20, "block5": 50}, (160, "block3", 5)),
        # 300 s: 4 deep epochs at 160 (220 s left / 51 s); deep stays first
        (300, 100, {"block3": 20, "block5": 50}, (160, "block3", 4)),
        # 150 s: 1 deep epoch at 160, 2 at 128 (32 s each): two epochs win over resolution
        (150, 100, {"block3": 20}, (128, "block3", 2)),
        # 150 s with a cheap top block: 2 deep epochs fit nowhere at 160, but do at 128
        (150, 100, {"block3": 20, "block5": 80}, (128, "block3", 2)),
        # 100 s: 96 pixels cost 0.36x: two deep epochs (18.4 s each) still fit there
        (100, 100, {"block3": 20, "block5": 80}, (96, "block3", 2)),
        # 80 s: no deep epoch fits anywhere; the top block does, three times at 96
        (80, 100, {"block3": 20, "block5": 80}, (96, "block5", 3)),
        # 70 s: phase 1 and the test do not fit at 160; at 128 they do, with no fine-tuning
        (70, 100, {"block3": 20}, (128, "block3", 0)),
    ],
)
def test_plan_budget_picks_the_largest_recipe_that_fits(budget_s, feature_ips, finetune_ips, expected):
    plan = plan_budget(budget_s, feature_ips=feature_ips, finetune_ips=finetune_ips, **PLAN)
    assert plan["fits"] and (plan["resolution"], plan["unfreeze"], plan["finetune_epochs"]) == expected
    assert plan["estimate_s"] <= budget_s


def test_plan_budget_says_what_phase_1_needs_when_nothing_fits():
    plan = plan_budget(30, feature_ips=100, finetune_ips={"block5": 50}, **PLAN)
    # at 96: head 1100 / 277.8 + 5 = 9 s, after 1000 / 277.8 + 50 = 53.6 s
    assert not plan["fits"] and plan["need_s"] == pytest.approx(62.56, abs=0.05)
