"""Checks of asv/config.py: defaults (SUPERB's), the shipped recipes, dotted overrides, the downstream section
owned by the chosen architecture, clear errors naming the key, save/load, and what a run folder may change."""
import re
import dataclasses

import pytest
from asv.models import DOWNSTREAMS
from conftest import REPO

from asv.config import (
    AT_LEAST_ONE,
    CHOICES,
    NOT_NEGATIVE,
    POSITIVE,
    Config,
    ConfigError,
    config_changes,
    flatten,
    load_config,
    reference,
    unsafe_changes,
)
from asv.run import save_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def error(*overrides, path=None) -> str:
    """The ConfigError message of loading `path` with `overrides`."""
    with pytest.raises(ConfigError) as e:
        load_config(str(path) if path else None, list(overrides))
    return str(e.value)


def yaml_file(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------- defaults and shipped recipes

def test_defaults_load_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.upstream.name == "wavlm_base_plus"
    assert cfg.loss.name == "amsoftmax"
    assert cfg.train.total_steps == 200000
    assert isinstance(cfg.optim.lr, float)


def test_defaults_are_superb():
    cfg = Config()
    assert cfg.optim.weight_decay == 0.01  # torch's AdamW default, which SUPERB keeps
    assert cfg.train.gradient_clipping == 1000.0
    assert cfg.train.seed == 0
    assert cfg.train.keep_num_ckpts == 0  # every checkpoint kept
    assert cfg.downstream.name == "superb_xvector"
    assert (cfg.data.effects, cfg.data.crop) == ("superb", "superb")
    assert (cfg.featurizer.layer_selections, cfg.featurizer.normalize) == ([], False)


def test_defaults_are_the_base_recipe_but_for_paths():
    assert set(config_changes(Config(), load_config(str(REPO / "configs/base.yaml")))) == {"exp_dir", "data.dir"}


def test_the_shipped_configs_are_the_documented_ones():
    assert {p.name for p in CONFIGS} >= {"base.yaml", "xvector_bn.yaml", "demo.yaml"}
    assert not (REPO / "configs" / "fbank.yaml").exists()  # became xvector_bn.yaml


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(str(path))
    assert isinstance(cfg, Config)
    assert cfg.data.min_secs <= cfg.data.max_secs
    assert isinstance(cfg.downstream, DOWNSTREAMS[cfg.downstream.name].Options)
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) in allowed, key


def test_base_recipe_is_s3prl_superb_asv_default_config():
    """s3prl 0.4.18 SuperbASV.default_config(), key by key."""
    cfg = load_config(str(REPO / "configs/base.yaml"))
    assert (cfg.data.min_secs, cfg.data.max_secs, cfg.data.batch_size) == (2.0, 8.0, 10)  # build_dataset, sampler
    assert (cfg.data.effects, cfg.data.crop, cfg.data.sample_rate) == ("superb", "superb", 16000)  # EFFECTS, RandomCrop
    assert (cfg.featurizer.layer_selections, cfg.featurizer.normalize) == ([], False)  # build_featurizer
    assert cfg.upstream.trainable is False  # build_model.upstream_trainable
    d = cfg.downstream
    assert (d.name, d.hidden_size, d.aggregation_size, d.embed_dim) == ("superb_xvector", 512, 1500, 512)
    assert (cfg.loss.name, cfg.loss.margin, cfg.loss.scale, cfg.loss.sub_centers) == ("amsoftmax", 0.4, 30.0, 1)
    assert (cfg.loss.margin_warmup_steps, cfg.loss.margin_warmup_start) == (0, 0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", 1e-4, 0.01)
    assert cfg.scheduler.name == "constant"  # s3prl's ExponentialLR is built but never stepped
    t = cfg.train
    assert (t.total_steps, t.log_step, t.save_step, t.gradient_clipping, t.gradient_accumulate) == (
        200000, 500, 10000, 1000.0, 5)
    assert (t.auto_resume, t.resume_ckpt_dir, t.keep_num_ckpts, t.mixed_precision) == (True, "", 0, "no")
    assert cfg.augment == type(cfg.augment)()  # no augmentation
    assert cfg.score.asnorm is False


def test_xvector_bn_recipe():
    cfg = load_config(str(REPO / "configs/xvector_bn.yaml"))
    assert (cfg.upstream.name, cfg.upstream.n_mels) == ("logmel", 80)
    assert (cfg.downstream.name, cfg.downstream.pooling) == ("xvector_bn", "stats")
    assert (cfg.loss.name, cfg.loss.margin, cfg.loss.scale) == ("aamsoftmax", 0.2, 30.0)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adam", 1e-3, 0.0)
    assert (cfg.scheduler.name, cfg.scheduler.warmup_steps) == ("cosine", 2000)
    assert (cfg.data.batch_size, cfg.data.crop, cfg.data.effects) == (32, "fixed", "none")
    assert (cfg.data.min_secs, cfg.data.max_secs) == (2.0, 3.0)


def test_demo_recipe_is_small():
    cfg = load_config(str(REPO / "configs/demo.yaml"))
    assert (cfg.upstream.name, cfg.upstream.n_mels) == ("logmel", 40)
    d = cfg.downstream
    assert (d.name, d.proj_dim, d.channels, d.stats_dim, d.embed_dim) == ("xvector_bn", 128, 128, 384, 128)
    assert cfg.train.total_steps == 300
    assert cfg.data.dir == "data/demo"


def test_docs_config_reference_is_current():
    """docs/config.md embeds reference() (python -c 'import asv.config as c; print(c.reference())')."""
    assert reference() in (REPO / "docs" / "config.md").read_text()


# ---------------------------------------------------------------- dotted overrides

def test_overrides_of_each_type():
    cfg = load_config(None, [
        "train.total_steps=200",
        "optim.lr=1e-3",
        "loss.margin=0.25",
        "train.auto_resume=false",
        "exp_dir=exp/my_run",
        "data.dir=/data/vox 1",  # spaces inside a value are kept
        "scheduler.name=cosine",
        "featurizer.layer_selections=[0, 3]",
    ])
    assert cfg.train.total_steps == 200 and type(cfg.train.total_steps) is int
    assert cfg.optim.lr == 1e-3 and type(cfg.optim.lr) is float
    assert cfg.loss.margin == 0.25
    assert cfg.train.auto_resume is False
    assert cfg.scheduler.name == "cosine"
    assert cfg.exp_dir == "exp/my_run"
    assert cfg.data.dir == "/data/vox 1"
    assert cfg.scheduler.name == "cosine"
    assert cfg.featurizer.layer_selections == [0, 3]
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
    # 'no' is the documented way back to full precision; YAML 1.1 reads a bare `no` as the boolean False
    for value in CHOICES["train.mixed_precision"]:
        assert load_config(None, ["train.mixed_precision=fp16", f"train.mixed_precision={value}"]).train.mixed_precision == value


def test_mixed_precision_no_in_a_yaml_file(tmp_path):
    assert load_config(yaml_file(tmp_path, "train:\n  mixed_precision: no\n")).train.mixed_precision == "no"


@pytest.mark.parametrize("value", ["off", "on", "yes", "no", "2024-01-01", "123", "1e-3", "null", "a: b", "[x"])
def test_a_string_key_on_the_command_line_keeps_the_text_as_typed(value):
    """A command line is not YAML to its user: exp_dir=off names the folder 'off'."""
    cfg = load_config(None, [f"exp_dir={value}", f"data.dir=/d/{value}", f"upstream.ckpt={value}"])
    assert (cfg.exp_dir, cfg.data.dir, cfg.upstream.ckpt) == (value, f"/d/{value}", value)


def test_quotes_around_a_string_override_are_taken_off():
    assert load_config(None, ["exp_dir='off'"]).exp_dir == "off"


def test_a_yaml_boolean_for_a_string_key_in_a_file_says_to_quote_it(tmp_path):
    path = yaml_file(tmp_path, "exp_dir: off\n")
    msg = error(path=path)
    assert path in msg and "'exp_dir'" in msg and "quote" in msg
    assert load_config(yaml_file(tmp_path, 'exp_dir: "off"\n', "quoted.yaml")).exp_dir == "off"
    msg = error(path=yaml_file(tmp_path, "data:\n  effects: yes\n", "effects.yaml"))
    assert "'data.effects'" in msg and "quote" in msg


def test_boolean_keys_still_read_yaml_booleans():
    assert load_config(None, ["train.auto_resume=off", "score.asnorm=yes"]).train.auto_resume is False


# ---------------------------------------------------------------- the downstream section belongs to its architecture

@pytest.mark.parametrize("name", list(DOWNSTREAMS))
def test_each_downstream_has_its_own_options(name):
    cfg = load_config(None, [f"downstream.name={name}"])
    assert cfg.downstream == DOWNSTREAMS[name].Options()
    assert cfg.downstream.name == name
    assert {f.name for f in dataclasses.fields(cfg.downstream)} >= {"name", "embed_dim"}


@pytest.mark.parametrize("name, key", [("superb_xvector", "pooling"), ("superb_xvector", "channels"),
                                       ("xvector_bn", "aggregation_size"), ("ecapa", "proj_dim")])
def test_a_key_of_another_architecture_is_refused(name, key):
    msg = error(f"downstream.name={name}", f"downstream.{key}=64")
    assert f"'downstream.{key}'" in msg and f"does not apply to downstream.name={name}" in msg
    for own in (f.name for f in dataclasses.fields(DOWNSTREAMS[name].Options) if f.name != "name"):
        assert own in msg  # the architecture's own keys are listed


def test_a_key_of_another_architecture_in_a_yaml_file_names_the_file(tmp_path):
    path = yaml_file(tmp_path, "downstream:\n  name: ecapa\n  proj_dim: 64\n")
    msg = error(path=path)
    assert path in msg and "'downstream.proj_dim'" in msg and "downstream.name=ecapa" in msg


def test_options_of_the_chosen_architecture_are_set():
    cfg = load_config(None, ["downstream.name=ecapa", "downstream.channels=1024", "downstream.pooling=stats"])
    assert cfg.downstream == DOWNSTREAMS["ecapa"].Options(channels=1024, pooling="stats")


def test_changing_the_name_carries_over_only_the_keys_set(tmp_path):
    """A new downstream.name starts from that architecture's defaults; what the YAML set away from the old
    architecture's defaults comes along, and must apply to the new one."""
    path = yaml_file(tmp_path, "downstream:\n  name: xvector_bn\n  embed_dim: 256\n  channels: 1024\n")
    cfg = load_config(path, ["downstream.name=ecapa"])
    assert cfg.downstream == DOWNSTREAMS["ecapa"].Options(embed_dim=256, channels=1024)  # scale, pooling: ecapa's
    # xvector_bn's own defaults (proj_dim 512, pooling stats) are not carried
    assert load_config(path, ["downstream.name=ecapa"]).downstream.pooling == "attentive"
    # a key the new architecture lacks is dropped with the old architecture; given after the name, refused
    path = yaml_file(tmp_path, "downstream:\n  name: xvector_bn\n  proj_dim: 128\n", "proj.yaml")
    assert not hasattr(load_config(path, ["downstream.name=ecapa"]).downstream, "proj_dim")
    msg = error("downstream.name=ecapa", "downstream.proj_dim=128", path=path)
    assert "'downstream.proj_dim'" in msg and "downstream.name=ecapa" in msg
    # a key set explicitly to the old default is not carried: the new architecture's default wins
    path = yaml_file(tmp_path, "downstream:\n  name: xvector_bn\n  embed_dim: 512\n", "same.yaml")
    assert load_config(path, ["downstream.name=ecapa"]).downstream.embed_dim == DOWNSTREAMS["ecapa"].Options().embed_dim


def test_demo_with_another_downstream_or_upstream():
    """Switching architecture on the command line over a YAML: shared keys carry, the old one's own keys go."""
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["downstream.name=ecapa"])
    assert (cfg.downstream.channels, cfg.downstream.embed_dim) == (128, 128) and not hasattr(cfg.downstream, "proj_dim")
    cfg = load_config(str(REPO / "configs/demo.yaml"), ["upstream.name=wavlm_base_plus", "upstream.random_init=true"])
    assert cfg.upstream.n_mels == 80  # demo's 40 bands belonged to logmel
    assert "upstream.n_mels does not apply" in error("upstream.name=wavlm_base_plus", "upstream.n_mels=40",
                                                     path=REPO / "configs/demo.yaml")
    cfg = load_config(str(REPO / "configs/strong.yaml"), ["downstream.name=xvector_bn"])
    assert (cfg.downstream.channels, cfg.downstream.embed_dim) == (1024, 256)


def test_a_key_set_before_the_name_is_carried():
    assert load_config(None, ["downstream.embed_dim=64", "downstream.name=ecapa"]).downstream.embed_dim == 64


def test_unknown_downstream_and_pooling_list_the_choices():
    msg = error("downstream.name=resnet")
    assert "'downstream.name'" in msg and all(name in msg for name in DOWNSTREAMS)
    msg = error("downstream.name=xvector_bn", "downstream.pooling=max")
    assert "'downstream.pooling'" in msg and "stats" in msg and "attentive" in msg


def test_old_featurizer_key_is_gone():
    msg = error("featurizer.layer_norm=true")
    assert "'featurizer.layer_norm'" in msg and "featurizer.normalize" in msg
    assert load_config(None, ["featurizer.normalize=true"]).featurizer.normalize is True


# ---------------------------------------------------------------- values that cannot be meant

@pytest.mark.parametrize("key", AT_LEAST_ONE)
def test_at_least_one(key):
    assert f"'{key}' must be >= 1" in error(f"{key}=0")
    load_config(None, [f"{key}=1"])


@pytest.mark.parametrize("key", NOT_NEGATIVE)
def test_not_negative(key):
    assert f"'{key}' must be >= 0" in error(f"{key}=-1")
    load_config(None, [f"{key}=0"])


@pytest.mark.parametrize("key", POSITIVE)
def test_positive(key):
    assert f"'{key}' must be > 0" in error(f"{key}=0")
    load_config(None, [f"{key}=100"])


def test_ranges_cover_the_keys_that_crash_later():
    # a negative seed stops numpy's generator; a negative final ratio makes an exponential lr complex
    assert {"train.seed", "scheduler.final_lr_ratio"} <= set(NOT_NEGATIVE)
    assert {"data.batch_size", "train.gradient_accumulate", "train.total_steps"} <= set(AT_LEAST_ONE)


@pytest.mark.parametrize("value", [0, -2])
def test_eval_batch_is_all_or_at_least_one(value):
    assert "'eval_batch'" in error(f"eval_batch={value}")
    assert load_config(None, ["eval_batch=-1"]).eval_batch == -1


@pytest.mark.parametrize("key", ["augment.noise_prob", "augment.rir_prob", "augment.speed_prob", "augment.specaug_prob"])
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_probabilities(key, value):
    assert f"'{key}' must be a probability" in error(f"{key}={value}")
    load_config(None, [f"{key}=1.0"])


def test_min_secs_above_max_secs():
    msg = error("data.min_secs=9", "data.max_secs=8")
    assert "data.min_secs" in msg and "data.max_secs" in msg


def test_fixed_crops_need_a_shortest_crop():
    assert "data.min_secs" in error("data.crop=fixed", "data.min_secs=0")
    assert load_config(None, ["data.crop=superb", "data.min_secs=0"]).data.min_secs == 0  # superb: keep everything


def test_removed_keys_say_what_replaces_them():
    msg = error("train.valid_higher_better=true")
    assert "train.valid_higher_better' was removed" in msg and "lower is always better" in msg
    assert "scheduler.name=constant" in error("train.use_scheduler=true")


def test_momentum_only_for_sgd():
    msg = error("optim.momentum=0.5")
    assert "optim.momentum" in msg and "sgd" in msg and "adamw" in msg
    assert load_config(None, ["optim.name=sgd", "optim.momentum=0.5"]).optim.momentum == 0.5


@pytest.mark.parametrize("overrides, key", [
    (["upstream.n_mels=40"], "n_mels"),  # default upstream: wavlm_base_plus
    (["upstream.name=fbank", "upstream.n_mfcc=20"], "n_mfcc"),
    (["upstream.name=mfcc", "upstream.n_mels=40"], "n_mels"),
    (["upstream.name=fbank", "upstream.random_init=true"], "random_init"),
    (["upstream.name=logmel", "upstream.ckpt=w.pt"], "ckpt"),
    (["upstream.name=mfcc", "upstream.arch={encoder_num_layers: 2}"], "arch"),
])
def test_upstream_keys_that_do_not_apply(overrides, key):
    msg = error(*overrides)
    name = overrides[0].split("=")[1] if overrides[0].startswith("upstream.name") else "wavlm_base_plus"
    assert f"upstream.{key} does not apply to upstream.name={name}" in msg


def test_upstream_keys_that_apply():
    assert load_config(None, ["upstream.name=fbank", "upstream.n_mels=40"]).upstream.n_mels == 40
    assert load_config(None, ["upstream.name=logmel", "upstream.n_mels=64"]).upstream.n_mels == 64
    assert load_config(None, ["upstream.name=mfcc", "upstream.n_mfcc=20"]).upstream.n_mfcc == 20
    assert load_config(None, ["upstream.random_init=true", "upstream.arch={encoder_num_layers: 2}"]).upstream.random_init


@pytest.mark.parametrize("value", ["[-1]", "[1, true]", "[0.5]"])
def test_layer_selections_are_layer_numbers(value):
    assert "featurizer.layer_selections" in error(f"featurizer.layer_selections={value}")


# ---------------------------------------------------------------- errors name the key

def test_unknown_nested_key_names_the_dotted_key_and_suggests_the_fix():
    msg = error("train.totl_steps=3")
    assert "'train.totl_steps'" in msg
    assert "did you mean 'train.total_steps'" in msg


def test_unknown_top_level_key():
    msg = error("exp_dirr=exp/x")
    assert "'exp_dirr'" in msg
    assert "did you mean 'exp_dir'" in msg


def test_unknown_key_without_a_near_match_lists_the_valid_keys():
    msg = error("train.zzzzzz=1")
    assert "'train.zzzzzz'" in msg
    assert "train.total_steps" in msg


def test_unknown_section():
    assert "'trian'" in error("trian.total_steps=3")


@pytest.mark.parametrize("override, key, typ", [
    ("train.total_steps=abc", "train.total_steps", "int"),
    ("train.total_steps=2.5", "train.total_steps", "int"),
    ("train.auto_resume=maybe", "train.auto_resume", "bool"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("upstream.arch=3", "upstream.arch", "dict"),
    ("featurizer.layer_selections=3", "featurizer.layer_selections", "list"),
])
def test_wrong_type_names_key_and_type(override, key, typ):
    msg = error(override)
    assert f"'{key}'" in msg
    assert typ in msg


@pytest.mark.parametrize("override, key", [("train.total_steps=true", "train.total_steps"),
                                           ("optim.lr=false", "optim.lr")])
def test_bool_is_not_a_number(override, key):
    assert key in error(override)


@pytest.mark.parametrize("override", ["optim.lr=[1", "upstream.arch={a: 1", "featurizer.layer_selections=[1, 2"])
def test_invalid_yaml_in_an_override_is_a_config_error(override):
    msg = error(override)
    assert override in msg and "not valid YAML" in msg


def test_closed_choice_lists_the_choices():
    msg = error("loss.name=softmax")
    assert "'loss.name'" in msg and "amsoftmax" in msg and "aamsoftmax" in msg and "softmax'" in msg


@pytest.mark.parametrize("override", ["optim.name=rmsprop", "scheduler.name=step", "train.valid_metric=acc",
                                      "train.mixed_precision=fp8", "downstream.name=resnet", "data.crop=random",
                                      "data.effects=sox", "train.mixed_precision=off"])
def test_every_closed_choice_is_checked(override):
    assert "must be one of" in error(override)


def test_a_section_cannot_be_set_to_a_scalar():
    assert "'train' is a section" in error("train=3")
    assert "'downstream' is a section" in error("downstream=ecapa")


def test_override_without_equals_sign():
    assert "train.total_steps" in error("train.total_steps")


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = yaml_file(tmp_path, "upstream:\n  nmae: fbank\n", "typo.yaml")
    msg = error(path=path)
    assert path in msg
    assert "'upstream.nmae'" in msg
    assert "did you mean 'upstream.name'" in msg


def test_wrong_type_in_a_yaml_file_names_the_file(tmp_path):
    path = yaml_file(tmp_path, "train:\n  total_steps: lots\n", "bad_type.yaml")
    msg = error(path=path)
    assert path in msg and "'train.total_steps'" in msg


def test_invalid_yaml_names_the_file(tmp_path):
    assert "broken.yaml" in error(path=yaml_file(tmp_path, "train:\n  total_steps: [1, 2\n", "broken.yaml"))


@pytest.mark.parametrize("where", ["top", "value"])
def test_a_python_tag_in_a_config_file_runs_nothing_and_names_the_file(tmp_path, where):
    """yaml.safe_load: a tag that would call os.system under yaml.load is refused, naming the file."""
    marker = tmp_path / "marker"
    tag = f"!!python/object/apply:os.system [touch {marker}]"
    text = f"{tag}\n" if where == "top" else f"train:\n  total_steps: {tag}\n"
    path = yaml_file(tmp_path, text, "tagged.yaml")
    assert path in error(path=path)
    assert not marker.exists()


def test_yaml_that_is_not_a_mapping(tmp_path):
    assert "list.yaml" in error(path=yaml_file(tmp_path, "- a\n- b\n", "list.yaml"))


def test_missing_file_names_the_file(tmp_path):
    assert "nowhere.yaml" in error(path=tmp_path / "nowhere.yaml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# ---------------------------------------------------------------- save / load

def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(str(REPO / "configs/xvector_bn.yaml"), [
        "optim.lr=1e-7", "exp_dir=exp/123", "train.resume_ckpt_dir=", "train.auto_resume=false",
        "data.eval_chunk_secs=12.5", "train.mixed_precision=bf16", "downstream.pooling=attentive",
        "featurizer.layer_selections=[0]",
    ])
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    back = load_config(str(path))
    assert back == cfg
    assert back.exp_dir == "exp/123" and type(back.optim.lr) is float
    assert isinstance(back.downstream, DOWNSTREAMS["xvector_bn"].Options)
    assert not (tmp_path / "config.yaml.tmp").exists()


def test_an_ssl_config_round_trips(tmp_path):
    cfg = load_config(None, ["upstream.random_init=true", "upstream.arch={encoder_num_layers: 2}",
                             "downstream.name=ecapa", "downstream.embed_dim=96", "exp_dir=off"])
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg  # 'off' is written quoted


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_save_then_load_round_trips_every_shipped_config(tmp_path, path):
    cfg = load_config(str(path))
    save_config(cfg, str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_saved_default_config_round_trips(tmp_path):
    save_config(Config(), str(tmp_path / "c.yaml"))
    assert load_config(str(tmp_path / "c.yaml")) == Config()


# ---------------------------------------------------------------- changes between two configs

def test_flatten_names_every_key_dotted():
    flat = flatten(Config())
    assert flat["data.dir"] == "data/demo" and flat["exp_dir"] == "exp/run"
    assert flat["downstream.name"] == "superb_xvector" and flat["downstream.aggregation_size"] == 1500
    assert flat["upstream.arch"] == {}  # a dict value is one key
    assert flat["featurizer.layer_selections"] == []
    assert not any(isinstance(v, dict) for k, v in flat.items() if k != "upstream.arch")
    assert len(flat) == len(set(flat))


def test_config_changes_lists_old_and_new_values():
    old = Config()
    new = load_config(None, ["optim.lr=3e-4", "downstream.embed_dim=256"])
    assert config_changes(old, new) == {"optim.lr": (1e-4, 3e-4), "downstream.embed_dim": (512, 256)}
    assert config_changes(old, Config()) == {}


def test_another_downstream_shows_its_keys_as_changes():
    changes = config_changes(Config(), load_config(None, ["downstream.name=ecapa"]))
    assert changes["downstream.name"] == ("superb_xvector", "ecapa")
    assert changes["downstream.pooling"] == (None, "attentive")  # a key only the new one has
    assert changes["downstream.aggregation_size"] == (1500, None)


def test_unsafe_changes_are_those_that_change_the_weights():
    old = Config()
    new = load_config(None, ["optim.lr=3e-4", "exp_dir=exp/elsewhere", "num_workers=8", "score.asnorm=true",
                             "train.log_step=10", "train.keep_num_ckpts=3", "train.seed=1", "data.eval_batch_secs=20"])
    assert unsafe_changes(old, new) == {"optim.lr": (1e-4, 3e-4), "train.seed": (0, 1)}


def test_total_steps_is_safe_while_no_schedule_depends_on_it():
    old = Config()
    for extra in ([], ["scheduler.name=constant", "scheduler.warmup_steps=100"],
                  ["loss.margin_warmup_steps=1000"]):  # the margin warm-up counts from its start, not to the end
        o, n = load_config(None, extra), load_config(None, [*extra, "train.total_steps=400000"])
        assert unsafe_changes(o, n) == {}, extra
    assert unsafe_changes(old, load_config(None, ["train.total_steps=1"])) == {}


@pytest.mark.parametrize("name", ["linear", "cosine", "exponential"])
def test_total_steps_is_unsafe_when_the_lr_schedule_depends_on_it(name):
    sched = [f"scheduler.name={name}"]
    old, new = load_config(None, sched), load_config(None, [*sched, "train.total_steps=400000"])
    assert unsafe_changes(old, new) == {"train.total_steps": (200000, 400000)}


def test_reference_is_read_from_field_metadata_not_source():
    """Every field of every section (list and dict fields included) is a row with its help from the field's
    metadata, and no help text breaks its table row (a `|` inside is escaped)."""
    import dataclasses

    from asv.config import SECTIONS, reference_rows
    rows = {k: text for k, _, text in reference_rows()}
    for section in SECTIONS:
        for f in dataclasses.fields(section):
            if not dataclasses.is_dataclass(f.type) and f.metadata.get("help"):
                assert any(k.endswith("." + f.name) or k == f.name for k in rows), f.name
    assert rows["featurizer.layer_selections"] and rows["upstream.arch"]  # a list and a dict field
    assert "wavlm_base_plus" in rows["upstream.name"]  # the choices come from models.upstream.UPSTREAMS
    for line in reference().splitlines():
        assert len(re.split(r"(?<!\\)\|", line)) == 5, line  # | key | default | meaning |
