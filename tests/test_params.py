from pathlib import Path

import pytest
import yaml

from dvae_cli.core.errors import UserError
from dvae_cli.models.jointvae.config import CapacitySchedule, JointVAEConfig
from dvae_cli.models.vqvae.config import VQVAEConfig
from dvae_cli.params import (
    Params,
    annotated_yaml,
    experiment_arguments,
    load_params,
    parse_set_options,
    parse_value,
    to_dict,
    value_origins,
)
from dvae_cli.sources import DataConfig

PROJECT = Path(__file__).resolve().parents[1]
PRESETS = PROJECT / "presets"

DESIGN_EXAMPLE = {
    "seed": 0,
    "models": ["jointvae", "vqvae"],
    "data": {"dataset": "dsprites", "root": "data/raw", "download": False, "image_size": 64, "channels": 1,
             "subset": None, "split": [0.8, 0.1, 0.1]},
    "runtime": {"device": "auto", "precision": "auto", "compile": False},
    "train": {"checkpoint_every": 1000, "log_every": 50},
    "jointvae": {"continuous": 6, "discrete": [3], "temperature": 0.67, "likelihood": "bernoulli",
                 "cont_capacity": {"max": 40.0, "steps": 300000, "gamma": 150.0},
                 "disc_capacity": {"max": 1.1, "steps": 300000, "gamma": 150.0},
                 "lr": 5.0e-4, "batch_size": 64, "epochs": 30},
    "vqvae": {"hidden": 256, "res_blocks": 2, "downsample": 4, "num_codes": 512, "code_dim": 64, "beta": 0.25,
              "codebook_update": "ema", "ema_decay": 0.99, "init": "kmeans", "dead_code_threshold": 1.0,
              "likelihood": "gaussian", "lr": 2.0e-4, "batch_size": 128, "epochs": 30},
    "encode": {"batch_size": 512},
    "evaluate": {"num_samples": 10000},
    "render": {"steps": 8, "base_index": 0},
}


def load_error(write_params, **sections) -> str:
    with pytest.raises(UserError) as error:
        load_params(write_params(**sections))
    message = str(error.value)
    assert "\n" not in message
    return message


# Loading

def test_design_example_loads_into_typed_objects(write_params):
    params = load_params(write_params(**DESIGN_EXAMPLE))
    assert params.model_config("vqvae").num_codes == 512 and params.data.subset is None
    assert isinstance(params.data, DataConfig)
    assert isinstance(params.model_config("jointvae").cont_capacity, CapacitySchedule)
    assert params.model_config("jointvae").cont_capacity == CapacitySchedule(max=40.0, steps=300000, gamma=150.0)
    assert isinstance(params.model_config("vqvae"), VQVAEConfig)
    assert isinstance(params.model_config("jointvae"), JointVAEConfig)


def test_missing_keys_take_defaults(write_params):
    params = load_params(write_params(data={"image_size": 32}))
    assert params.data.image_size == 32
    assert params.data.channels == DataConfig().channels
    assert params.model_config("vqvae") == VQVAEConfig()
    assert params.seed == 0


def test_empty_params_file_is_all_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    assert load_params(path) == Params()


def test_integer_is_accepted_where_a_number_is_expected(write_params):
    params = load_params(write_params(vqvae={"beta": 1}, jointvae={"cont_capacity": {"max": 5}}))
    assert params.model_config("vqvae").beta == 1.0 and isinstance(params.model_config("vqvae").beta, float)
    assert params.model_config("jointvae").cont_capacity.max == 5.0
    assert params.model_config("jointvae").cont_capacity.steps == JointVAEConfig().cont_capacity.steps


@pytest.mark.parametrize("subset", [None, 100, 0.25, 1.0])
def test_subset_takes_null_a_count_or_a_fraction(write_params, subset):
    params = load_params(write_params(data={"subset": subset}))
    assert params.data.subset == subset
    assert type(params.data.subset) is type(subset)


def test_to_dict_round_trips(write_params):
    params = load_params(write_params(seed=3, vqvae={"num_codes": 64}))
    assert load_params(write_params(**to_dict(params))) == params


# Errors: every one names the key and what is allowed

@pytest.mark.parametrize(("sections", "expected"), [
    ({"sed": 1}, "did you mean `seed`"),
    ({"data": {"imagesize": 32}}, "did you mean `data.image_size`"),
    ({"jointvae": {"cont_capacity": {"mx": 1.0}}}, "did you mean `jointvae.cont_capacity.max`"),
    ({"vqvae": {"num_code": 8}}, "did you mean `vqvae.num_codes`"),
])
def test_unknown_key_suggests_the_close_one(write_params, sections, expected):
    message = load_error(write_params, **sections)
    assert "unknown key" in message
    assert expected in message


def test_unknown_key_without_close_match_lists_allowed_keys(write_params):
    message = load_error(write_params, data={"zzz": 1})
    assert "`data.zzz`" in message
    for key in ("dataset", "root", "image_size", "channels", "subset", "split"):
        assert key in message


@pytest.mark.parametrize(("sections", "key", "allowed"), [
    ({"data": {"image_size": "big"}}, "data.image_size", "an integer"),
    ({"data": {"image_size": 16.0}}, "data.image_size", "an integer"),
    ({"seed": True}, "seed", "an integer"),
    ({"data": {"download": "yes"}}, "data.download", "true or false"),
    ({"vqvae": {"beta": "high"}}, "vqvae.beta", "a number"),
    ({"data": 5}, "data", "a mapping"),
    ({"data": {"split": 0.8}}, "data.split", "a list"),
    ({"jointvae": {"discrete": [3, "x"]}}, "jointvae.discrete[1]", "an integer"),
    ({"data": {"subset": True}}, "data.subset", "null"),
])
def test_wrong_type_names_key_and_expected_type(write_params, sections, key, allowed):
    message = load_error(write_params, **sections)
    assert f"`{key}`" in message
    assert allowed in message


@pytest.mark.parametrize(("sections", "key", "allowed"), [
    ({"data": {"dataset": "imagenet"}}, "data.dataset", "'dsprites' | 'mnist' | 'fashion-mnist'"),
    ({"data": {"channels": 2}}, "data.channels", "1 | 3"),
    ({"data": {"channels": 1.0}}, "data.channels", "1 | 3"),
    ({"models": ["vqvae", "vae"]}, "models[1]", "'jointvae' | 'vqvae'"),
    ({"runtime": {"precision": "fp64"}}, "runtime.precision", "'fp32'"),
    ({"runtime": {"device": "gpu"}}, "runtime.device", "cuda:N"),
    ({"vqvae": {"codebook_update": "sgd"}}, "vqvae.codebook_update", "'ema' | 'loss'"),
])
def test_value_outside_a_choice_names_key_and_choices(write_params, sections, key, allowed):
    message = load_error(write_params, **sections)
    assert f"`{key}`" in message
    assert allowed in message


@pytest.mark.parametrize(("sections", "key", "bound"), [
    ({"data": {"image_size": 2}}, "data.image_size", "≥ 4"),
    ({"data": {"image_size": 4096}}, "data.image_size", "≤ 1024"),
    ({"seed": -1}, "seed", "≥ 0"),
    ({"vqvae": {"ema_decay": 1.0}}, "vqvae.ema_decay", "< 1"),
    ({"vqvae": {"num_codes": 1}}, "vqvae.num_codes", "≥ 2"),
    ({"jointvae": {"temperature": 0}}, "jointvae.temperature", "> 0"),
    ({"jointvae": {"disc_capacity": {"steps": 0}}}, "jointvae.disc_capacity.steps", "≥ 1"),
    ({"data": {"subset": 0}}, "data.subset", "> 0"),
    ({"data": {"subset": 1.5}}, "data.subset", "(0, 1]"),
    ({"data": {"split": [0.5, 0.3]}}, "data.split", "sum to 1"),
    ({"data": {"split": [0.5, 0.6, -0.1]}}, "data.split", "non-negative"),
    ({"data": {"split": [0.0, 0.5, 0.5]}}, "data.split", "first fraction > 0"),
    ({"vqvae": {"downsample": 6}}, "vqvae.downsample", "power of two"),
    ({"jointvae": {"discrete": [3, 1]}}, "jointvae.discrete[1]", "2 to 65536 categories"),
    ({"jointvae": {"continuous": 0, "discrete": []}}, "jointvae.continuous", "at least one dimension"),
    ({"models": ["vqvae", "vqvae"]}, "models", "twice"),
])
def test_out_of_range_names_key_and_range(write_params, sections, key, bound):
    message = load_error(write_params, **sections)
    assert f"`{key}`" in message
    assert bound in message


def test_missing_params_file(tmp_path):
    with pytest.raises(UserError, match="not found; pass --params"):
        load_params(tmp_path / "nope.yaml")


def test_missing_default_params_file_is_allowed_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_params(Path("params.yaml"), missing_ok=True) == Params()


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 0\ndata:\n  image_size: [64\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_params(path)


def test_params_file_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- seed\n- data\n")
    with pytest.raises(UserError, match="must be a mapping"):
        load_params(path)


# Overrides: --set and flags, over the file, over the defaults

@pytest.mark.parametrize(("text", "value"), [
    ("3", 3), ("0.5", 0.5), ("true", True), ("null", None), ("[3, 2]", [3, 2]), ("cuda:1", "cuda:1"),
    ("mnist", "mnist"), ("[unclosed", "[unclosed"),
])
def test_parse_value_reads_yaml_scalars_and_lists(text, value):
    assert parse_value(text) == value


def test_parse_set_options():
    assert parse_set_options(["vqvae.num_codes=256", "data.split=[0.6, 0.2, 0.2]", "runtime.device=cuda:0"]) == {
        "vqvae.num_codes": 256, "data.split": [0.6, 0.2, 0.2], "runtime.device": "cuda:0"}


def test_set_option_without_equals_sign():
    with pytest.raises(UserError, match="key.sub=value"):
        parse_set_options(["vqvae.num_codes"])


def test_precedence_override_over_file_over_default(write_params):
    path = write_params(seed=5, data={"image_size": 32, "channels": 3})
    params = load_params(path, {"data.image_size": 16, "vqvae.num_codes": 64, "jointvae.cont_capacity.max": 7.5})
    assert params.data.image_size == 16  # override beats file
    assert params.data.channels == 3  # file beats default
    assert params.seed == 5
    assert params.model_config("vqvae").num_codes == 64  # override of a section the file does not have
    assert params.model_config("vqvae").hidden == VQVAEConfig().hidden  # default
    default = JointVAEConfig().cont_capacity
    assert params.model_config("jointvae").cont_capacity == CapacitySchedule(7.5, default.steps, default.gamma)


def test_override_is_validated_like_the_file(write_params):
    path = write_params()
    with pytest.raises(UserError, match="`vqvae.num_codes` is 1"):
        load_params(path, {"vqvae.num_codes": 1})
    with pytest.raises(UserError, match="did you mean `vqvae.num_codes`"):
        load_params(path, {"vqvae.num_code": 8})


def test_override_below_a_value_that_is_not_a_section(write_params):
    with pytest.raises(UserError, match="`image_size` is not a section"):
        load_params(write_params(data={"image_size": 32}), {"data.image_size.x": 1})
    with pytest.raises(UserError, match="`data.image_size` is {'x': 1}, expected an integer"):
        load_params(write_params(), {"data.image_size.x": 1})


def test_partial_nested_section_keeps_the_other_defaults(write_params):
    params = load_params(write_params(jointvae={"disc_capacity": {"gamma": 30.0}}), {"jointvae.cont_capacity.max": 5})
    default = JointVAEConfig()
    assert params.model_config("jointvae").disc_capacity == CapacitySchedule(default.disc_capacity.max,
                                                                             default.disc_capacity.steps, 30.0)
    assert params.model_config("jointvae").cont_capacity == CapacitySchedule(5.0, default.cont_capacity.steps,
                                                                             default.cont_capacity.gamma)


def test_override_does_not_change_the_file(write_params):
    path = write_params(seed=1)
    before = path.read_text()
    load_params(path, {"seed": 2})
    assert path.read_text() == before


def test_shipped_params_are_the_defaults():
    """One set of defaults: params.yaml writes out the schema's (DVC needs every tracked key in the file)."""
    assert load_params(PROJECT / "params.yaml") == Params()
    assert yaml.safe_load((PROJECT / "params.yaml").read_text()) == to_dict(Params())


@pytest.mark.parametrize(("moved", "new"), [("device", "runtime.device"), ("precision", "runtime.precision"),
                                            ("compile", "runtime.compile")])
def test_a_moved_key_names_its_new_place(write_params, moved, new):
    message = load_error(write_params, train={moved: "auto" if moved != "compile" else False, "log_every": 5})
    assert f"`train.{moved}` has moved to `{new}`" in message


@pytest.mark.parametrize("preset", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_is_an_overlay_of_changed_keys_only(preset: Path) -> None:
    overlay = yaml.safe_load(preset.read_text())
    defaults = to_dict(Params())

    def unchanged(new: dict, base: dict, prefix: str = "") -> list[str]:
        found = []
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                found += unchanged(value, base[key], f"{prefix}{key}.")
            elif base.get(key) == value:
                found.append(prefix + key)
        return found

    assert unchanged(overlay, defaults) == []
    params = load_params(PROJECT / "params.yaml", preset=preset.stem)
    assert params.models == [preset.stem.split("-")[0]]


def test_preset_merges_over_the_params_file_and_under_overrides(write_params):
    path = write_params(seed=4, jointvae={"temperature": 0.5, "lr": 0.01})
    params = load_params(path, {"jointvae.epochs": 2}, preset=str(PRESETS / "jointvae-dsprites.yaml"))
    config = params.model_config("jointvae")
    assert (params.seed, config.temperature) == (4, 0.5)  # the file where the preset is silent
    assert config.lr == 5e-4  # the preset over the file
    assert config.epochs == 2  # the override over the preset
    assert config.disc_capacity == CapacitySchedule(1.1, 300000, 150.0)  # a partial nested overlay


def test_unknown_preset_lists_the_available_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(PROJECT)
    with pytest.raises(UserError, match="preset 'jointvae-mnst' not found.*available: .*jointvae-mnist"):
        load_params(PROJECT / "params.yaml", preset="jointvae-mnst")


def test_presets_hold_the_papers_settings(monkeypatch) -> None:
    monkeypatch.chdir(PROJECT)

    def preset(name: str) -> Params:
        return load_params("params.yaml", preset=name)

    dsprites = preset("jointvae-dsprites").model_config("jointvae")
    assert (dsprites.continuous, dsprites.discrete, dsprites.lr, dsprites.batch_size) == (6, [3], 5e-4, 64)
    assert (dsprites.cont_capacity.max, dsprites.cont_capacity.steps, dsprites.cont_capacity.gamma) == (40, 300000, 150)
    assert (dsprites.disc_capacity.max, dsprites.disc_capacity.steps) == (1.1, 300000)
    cifar = preset("vqvae-cifar10")
    vq = cifar.model_config("vqvae")
    assert (cifar.data.image_size, cifar.data.channels, cifar.train.max_steps) == (32, 3, 250000)
    assert (vq.hidden, vq.res_blocks, vq.downsample) == (256, 2, 4)
    assert (vq.num_codes, vq.code_dim, vq.beta, vq.lr) == (512, 64, 0.25, 2e-4)
    mnist = preset("jointvae-mnist").model_config("jointvae")
    assert (mnist.continuous, mnist.discrete, mnist.cont_capacity.max, mnist.cont_capacity.steps,
            mnist.cont_capacity.gamma, mnist.epochs) == (10, [10], 5, 25000, 30, 100)


def test_origins_say_which_layer_set_each_value(tmp_path, write_params):
    path = write_params(seed=1, jointvae={"epochs": 2, "lr": 0.01})
    preset = tmp_path / "overlay.yaml"
    preset.write_text("jointvae: {epochs: 7, cont_capacity: {max: 3.0}}\n")
    overrides = {"jointvae.lr": 0.5, "vqvae.num_codes": 8}
    origins = value_origins(path, overrides, preset=str(preset))
    assert origins == {"seed": str(path), "jointvae.epochs": f"preset {preset}", "jointvae.lr": "flag",
                       "jointvae.cont_capacity.max": f"preset {preset}", "vqvae.num_codes": "flag"}
    params = load_params(path, overrides, preset=str(preset))
    text = annotated_yaml(params, origins)
    assert yaml.safe_load(text) == to_dict(params)  # the YAML reads back as the same params
    lines = text.splitlines()
    assert "seed: 1  # " + str(path) in lines
    assert f"  epochs: 7  # preset {preset}" in lines
    assert f"    max: 3.0  # preset {preset}" in lines
    assert "  num_codes: 8  # flag" in lines
    assert "  batch_size: 64" in lines  # a default says nothing


def test_experiment_arguments_apply_the_preset_and_flags_to_the_file(tmp_path, write_params):
    path = write_params(seed=1, jointvae={"epochs": 2})
    overrides = {"jointvae.epochs": 5, "jointvae.discrete": [4, 2]}
    origins = value_origins(path, overrides, preset=str(PRESETS / "jointvae-dsprites-cpu.yaml"))
    arguments = experiment_arguments(load_params(path, overrides, preset=str(PRESETS / "jointvae-dsprites-cpu.yaml")),
                                     origins, path)
    pairs = dict(value.split("=", 1) for value in arguments[1::2])
    assert set(arguments[::2]) == {"-S"}
    assert pairs["jointvae.epochs"] == "5"  # in the file: a plain override
    assert pairs["+jointvae.discrete"] == "[4, 2]"  # not in the file: DVC's grammar adds it with +
    assert pairs["+data.subset"] == "200000"
    assert "seed" not in pairs and "+seed" not in pairs  # the file's own value needs no option
