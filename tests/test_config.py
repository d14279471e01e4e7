"""Checks of config.py: defaults, the shipped recipes, dotted overrides, clear errors, save/load."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from config import CHOICES, Config, ConfigError, load_config, save_config  # noqa: E402

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


# ---------------------------------------------------------------- defaults and shipped recipes

def test_defaults_load_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.upstream.name == "wavlm_base_plus"
    assert cfg.loss.name == "amsoftmax"
    assert cfg.train.total_steps == 200000
    assert isinstance(cfg.optim.lr, float)


def test_the_shipped_configs_are_the_documented_ones():
    assert {p.name for p in CONFIGS} >= {"base.yaml", "fbank.yaml", "demo.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert cfg.data.min_secs <= cfg.data.max_secs
    for key, allowed in CHOICES.items():
        if allowed:
            section, name = key.split(".")
            assert getattr(getattr(cfg, section), name) in allowed, key


def test_base_recipe_is_superb_asv():
    cfg = load_config(str(REPO / "configs/base.yaml"))
    assert cfg.upstream.name == "wavlm_base_plus"
    assert cfg.upstream.trainable is False
    assert cfg.downstream.name == "xvector"
    assert (cfg.loss.name, cfg.loss.margin, cfg.loss.scale) == ("amsoftmax", 0.4, 30.0)
    assert (cfg.optim.name, cfg.optim.lr) == ("adamw", 1e-4)
    assert cfg.data.batch_size == 10
    assert cfg.train.gradient_accumulate == 5
    assert cfg.train.total_steps == 200000
    assert (cfg.data.min_secs, cfg.data.max_secs) == (2.0, 8.0)
    assert cfg.train.use_scheduler is False


def test_fbank_recipe():
    cfg = load_config(str(REPO / "configs/fbank.yaml"))
    assert (cfg.upstream.name, cfg.upstream.n_mels) == ("fbank", 80)
    assert (cfg.loss.name, cfg.loss.margin, cfg.loss.scale) == ("aamsoftmax", 0.2, 30.0)
    assert (cfg.optim.name, cfg.optim.lr) == ("adam", 1e-3)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps) == ("cosine", 2000)
    assert cfg.train.use_scheduler is True
    assert cfg.data.batch_size == 32
    assert (cfg.data.min_secs, cfg.data.max_secs) == (2.0, 3.0)


def test_demo_recipe_is_small():
    cfg = load_config(str(REPO / "configs/demo.yaml"))
    assert (cfg.upstream.name, cfg.upstream.n_mels) == ("fbank", 40)
    d = cfg.downstream
    assert (d.proj_dim, d.channels, d.stats_dim, d.embed_dim) == (128, 128, 384, 128)
    assert cfg.train.total_steps == 300
    assert cfg.data.dir == "data/demo"


# ---------------------------------------------------------------- dotted overrides

def test_overrides_of_each_type():
    cfg = load_config(None, [
        "train.total_steps=200",
        "optim.lr=1e-3",
        "loss.margin=0.25",
        "train.auto_resume=false",
        "train.use_scheduler=true",
        "exp_dir=exp/my_run",
        "data.dir=/data/vox 1",  # spaces inside a value are kept
        "scheduler.name=cosine",
    ])
    assert cfg.train.total_steps == 200 and type(cfg.train.total_steps) is int
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.loss.margin == 0.25
    assert cfg.train.auto_resume is False
    assert cfg.train.use_scheduler is True
    assert cfg.exp_dir == "exp/my_run"
    assert cfg.data.dir == "/data/vox 1"
    assert cfg.scheduler.name == "cosine"
    # untouched keys keep their defaults
    assert cfg.train.log_step == Config().train.log_step


def test_int_given_for_a_float_becomes_a_float():
    cfg = load_config(None, ["optim.lr=3"])
    assert cfg.optim.lr == 3.0 and type(cfg.optim.lr) is float


def test_nested_dict_override():
    cfg = load_config(None, ["upstream.arch={encoder_num_layers: 2, encoder_embed_dim: 32}"])
    assert cfg.upstream.arch == {"encoder_num_layers": 2, "encoder_embed_dim": 32}


def test_overrides_apply_on_top_of_a_file_and_the_last_one_wins():
    cfg = load_config(str(REPO / "configs/base.yaml"), ["optim.lr=5e-4", "train.total_steps=10", "train.total_steps=20"])
    assert cfg.optim.lr == 5e-4
    assert cfg.train.total_steps == 20
    assert cfg.upstream.name == "wavlm_base_plus"  # the file's other values stay


def test_every_documented_mixed_precision_choice_can_be_set():
    # 'no' is the documented way back to full precision (config.py: "no | fp16 | bf16"). YAML 1.1 reads a bare
    # `no` as the boolean False, so this currently fails with "must be str, got bool False".
    for value in CHOICES["train.mixed_precision"]:
        assert load_config(None, ["train.mixed_precision=fp16", f"train.mixed_precision={value}"]).train.mixed_precision == value


def test_mixed_precision_no_in_a_yaml_file(tmp_path):
    path = tmp_path / "mp.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(str(path)).train.mixed_precision == "no"


# ---------------------------------------------------------------- errors name the key

def test_unknown_nested_key_names_the_dotted_key_and_suggests_the_fix():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.totl_steps=3"])
    assert "'train.totl_steps'" in str(e.value)
    assert "did you mean 'train.total_steps'" in str(e.value)


def test_unknown_top_level_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["exp_dirr=exp/x"])
    assert "'exp_dirr'" in str(e.value)
    assert "did you mean 'exp_dir'" in str(e.value)


def test_unknown_key_without_a_near_match_lists_the_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.zzzzzz=1"])
    assert "'train.zzzzzz'" in str(e.value)
    assert "train.total_steps" in str(e.value)


def test_unknown_section():
    with pytest.raises(ConfigError, match="'trian'"):
        load_config(None, ["trian.total_steps=3"])


@pytest.mark.parametrize("override, key, typ", [
    ("train.total_steps=abc", "train.total_steps", "int"),
    ("train.total_steps=2.5", "train.total_steps", "int"),
    ("train.auto_resume=maybe", "train.auto_resume", "bool"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("upstream.arch=3", "upstream.arch", "dict"),
])
def test_wrong_type_names_key_and_type(override, key, typ):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"'{key}'" in str(e.value)
    assert typ in str(e.value)


@pytest.mark.parametrize("override, key", [("train.total_steps=true", "train.total_steps"),
                                           ("optim.lr=false", "optim.lr")])
def test_bool_is_not_a_number(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_closed_choice_lists_the_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["loss.name=softmax"])
    msg = str(e.value)
    assert "'loss.name'" in msg and "amsoftmax" in msg and "aamsoftmax" in msg and "softmax'" in msg


@pytest.mark.parametrize("override", ["optim.name=rmsprop", "scheduler.name=step", "train.valid_metric=acc",
                                      "train.mixed_precision=fp8", "downstream.name=resnet"])
def test_every_closed_choice_is_checked(override):
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(None, [override])


def test_a_section_cannot_be_set_to_a_scalar():
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(None, ["train=3"])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="train.total_steps"):
        load_config(None, ["train.total_steps"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("upstream:\n  nmae: fbank\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(path) in str(e.value)
    assert "'upstream.nmae'" in str(e.value)
    assert "did you mean 'upstream.name'" in str(e.value)


def test_wrong_type_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad_type.yaml"
    path.write_text("train:\n  total_steps: lots\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(path) in str(e.value) and "'train.total_steps'" in str(e.value)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  total_steps: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(str(path))


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(str(path))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(str(tmp_path / "nowhere.yaml"))


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- save / load

def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(str(REPO / "configs/fbank.yaml"), [
        "optim.lr=1e-7", "exp_dir=exp/123", "train.resume_ckpt_dir=", "upstream.arch={encoder_num_layers: 2}",
        "train.auto_resume=false", "data.eval_chunk_secs=12.5", "train.mixed_precision=bf16",
    ])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    back = load_config(str(path))
    assert back == cfg
    assert back.exp_dir == "exp/123" and type(back.optim.lr) is float
    assert not (tmp_path / "config.yaml.tmp").exists()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_save_then_load_round_trips_every_shipped_config(tmp_path, path):
    cfg = load_config(str(path))
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_saved_default_config_round_trips(tmp_path):
    save_config(Config(), str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == Config()
