import re
from pathlib import Path

import pytest

from tlkeras.config import Config, dump_yaml, load_config, to_flat_dict
from tlkeras.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# default.yaml is the GPU recipe with every setting explicit: the "auto" defaults
# (tlkeras.recipe) at the values they had before recipes.
GPU_RECIPE = [
    "data.batch_size=256",
    "model.resolution=224",
    "head.epochs=5",
    "finetune.epochs=10",
    "finetune.learning_rate=1e-5",
    "finetune.unfreeze=all",
]


def test_defaults_match_default_yaml():
    assert load_config(CONFIGS / "default.yaml") == load_config(None, GPU_RECIPE)
    auto = {k for k, v in to_flat_dict(Config()).items() if v == "auto"} - {
        "runtime.strategy",
        "runtime.mixed_precision",
        "data.cache",  # auto from the memory at hand, not part of the recipe
    }
    assert auto == {item.split("=")[0] for item in GPU_RECIPE}


def test_auto_settings_parse_and_explicit_values_stay():
    cfg = load_config(None, ["data.batch_size=auto", "head.epochs=7", "finetune.learning_rate=auto"])
    assert (cfg.data.batch_size, cfg.head.epochs, cfg.finetune.learning_rate) == ("auto", 7, "auto")
    with pytest.raises(ConfigError, match="'data.batch_size' must be int or 'auto', got 'big'"):
        load_config(None, ["data.batch_size=big"])
    with pytest.raises(ConfigError, match="must be greater than 0"):
        load_config(None, ["runtime.time_budget_minutes=0"])


@pytest.mark.parametrize("name", ["smoke.yaml", "cpu.yaml", "cpu_10pct.yaml", "hymenoptera.yaml", "flowers.yaml"])
def test_variant_files_load_and_only_list_differences(name):
    import yaml

    listed = yaml.safe_load((CONFIGS / name).read_text())
    flat_default = to_flat_dict(Config())
    cfg = to_flat_dict(load_config(CONFIGS / name))
    for section, values in listed.items():
        items = values.items() if isinstance(values, dict) else [(None, values)]
        for key, _ in items:
            dotted = f"{section}.{key}" if key else section
            assert cfg[dotted] != flat_default[dotted], f"{name}: {dotted} repeats the default"


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        None,
        [
            "head.epochs=3",
            "model.weights=null",
            "finetune.learning_rate=1e-4",
            "data.download=false",
            "finetune.unfreeze=block4",
        ],
    )
    assert cfg.head.epochs == 3
    assert cfg.model.weights is None
    assert cfg.finetune.learning_rate == pytest.approx(1e-4)
    assert cfg.data.download is False
    assert cfg.finetune.unfreeze == "block4"


def test_override_wins_over_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("head:\n  epochs: 7\n")
    assert load_config(f).head.epochs == 7
    assert load_config(f, ["head.epochs=2"]).head.epochs == 2


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["seed=5", "model.weights=/x/w.h5"])
    f = tmp_path / "resolved.yaml"
    f.write_text(dump_yaml(cfg))
    assert load_config(f) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.batchsize=64", "unknown config key 'data.batchsize'; did you mean 'data.batch_size'?"),
        ("modle.weights=null", "unknown config key 'modle'"),
        ("head.epochs=three", "config key 'head.epochs' must be int or 'auto', got 'three'"),
        ("head.epochs=true", "config key 'head.epochs' must be int or 'auto', got True"),
        ("data.download=maybe", "config key 'data.download' must be bool"),
        ("head.epochs=0", "head.epochs=0 must be greater than 0"),
        ("data.batch_size=-8", "data.batch_size=-8 must be greater than 0"),
        ("finetune.epochs=-1", "finetune.epochs=-1 must be 0 or more"),
        ("runtime.strategy=tpu", "runtime.strategy='tpu' is not one of auto, default, mirrored"),
        ("head=3", "'head' is a section"),
        ("noequals", "is not KEY=VALUE"),
        ("head.learning_rate=.nan", "head.learning_rate=nan must be a finite number"),
        ("finetune.unfreeze=block2_conv3", "finetune.unfreeze='block2_conv3' names no VGG16 layer"),
        ("finetune.unfreeze=block_13", "finetune.unfreeze='block_13' names no VGG16 layer"),
        ("model.backbone=resnet50", "model.backbone='resnet50' is not one of vgg16, mobilenet_v2"),
        ("export.name=../x", "export.name='../x' must be a plain folder name"),
        ("export.name=onnx", "other than 'onnx'"),
        ("export.name=litert", "other than 'onnx' and 'litert'"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_backbone_choices_are_the_model_table():
    from tlkeras.bases import BASES
    from tlkeras.config import CHOICES

    assert CHOICES["model.backbone"] == tuple(BASES)
    assert Config().model.backbone == "vgg16"


def test_unfreeze_is_checked_against_the_chosen_backbone():
    cfg = load_config(None, ["model.backbone=mobilenet_v2", "finetune.unfreeze=block_13"])
    assert (cfg.model.backbone, cfg.finetune.unfreeze) == ("mobilenet_v2", "block_13")
    load_config(None, ["model.backbone=mobilenet_v2", "finetune.unfreeze=Conv_1"])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.backbone=mobilenet_v2", "finetune.unfreeze=block5"])
    assert str(e.value).startswith(
        "finetune.unfreeze='block5' names no MobileNetV2 layer; use 'all', a block (block_1, "
    )
    assert "block_16, Conv_1) or a layer name such as 'block_16_expand'" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("head: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_empty_section_means_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\nhead:\n  epochs: 2\n")
    assert load_config(f).data == Config().data


@pytest.mark.parametrize(
    "setting, message",
    [
        ("model.weights=/nonexistent/vgg.h5", "model.weights='/nonexistent/vgg.h5': no such readable file"),
        ("data.dataset=./no/such/photos", "data.dataset='./no/such/photos': no such folder"),
        ("data.train_split=train[90%:90%]", "data.train_split='train[90%:90%]' selects no examples"),
        ("data.val_split=train[:10%", "data.val_split='train[:10%' is not a valid tfds split"),
        ("data.dataset=cifar_10", "data.dataset='cifar_10' is neither a folder nor a tfds dataset name; did you mean"),
    ],
)
def test_preflight_fails_in_seconds_without_tensorflow(tmp_path, setting, message):
    """`python -m tlkeras.train` with a bad path or split: no TensorFlow import, one line."""
    import subprocess
    import sys
    import time

    code = (
        "import sys; from tlkeras.train import main; rc = main(sys.argv[1:]); "
        "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'; sys.exit(rc)"
    )
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code, "--run-dir", str(tmp_path / "r"), "--set", setting],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode in (1, 2), out.stderr
    assert out.stderr.strip().splitlines() == [f"error: {out.stderr.strip().split('error: ', 1)[1]}"]
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists()  # nothing written
    assert time.monotonic() - start < 20


@pytest.mark.parametrize(
    "setting, message",
    [
        ("seed=-1", "seed=-1 must be between 0 and 2**32 - 1"),
        ("seed=99999999999", "seed=99999999999 must be between"),
        ("name=a/b", "name='a/b' must be a plain folder name"),
    ],
)
def test_seed_and_run_name_are_checked_with_the_config(setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [setting])


def test_a_time_budget_is_refused_for_multi_worker_training(tmp_path, monkeypatch):
    from tlkeras.config import preflight
    from tlkeras.errors import UserError

    cfg = load_config(None, ["runtime.time_budget_minutes=10", "data.download=true"])
    preflight(cfg, tmp_path / "run")  # one machine: planned
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["localhost:1", "localhost:2"]}}')
    with pytest.raises(UserError, match="plans for one machine, not for the workers of TF_CONFIG"):
        preflight(cfg, tmp_path / "run")
