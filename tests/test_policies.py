import pytest

from tlkeras.errors import ConfigError
from tlkeras.policies import (
    choose_precision, choose_strategy, per_replica_batch, read_cpu_flags, steps_per_epoch,
    unfreeze_start,
    warmup_steps,
)  # fmt: skip

VGG_LAYERS = ["input_layer", "block1_conv1", "block1_conv2", "block1_pool", "block2_conv1",
              "block2_conv2", "block2_pool", "block5_conv1", "block5_conv2", "block5_pool"]


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
    [("auto", False, 0, "default"), ("auto", False, 2, "mirrored"), ("auto", True, 0, "multi_worker"),
     ("auto", True, 4, "multi_worker"), ("default", True, 4, "default"), ("mirrored", False, 0, "mirrored")],
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


def test_unfreeze_start():
    assert unfreeze_start(VGG_LAYERS, "all") == 0
    assert unfreeze_start(VGG_LAYERS, "block5") == 7
    assert unfreeze_start(VGG_LAYERS, "block2_conv2") == 5
    with pytest.raises(ConfigError, match=r"'block9' names no VGG16 layer; .*\(block1, block2, block5\)"):
        unfreeze_start(VGG_LAYERS, "block9")
