"""The configuration contract: TOML sections, --set overrides, errors that name the key."""

import pytest

from fleetfl.coordinator.config import (
    Config,
    ConfigError,
    describe_keys,
    from_run_config,
    load_config,
    parse_override,
    to_run_config,
)


def test_defaults_validate_and_round_trip_through_run_config():
    cfg = load_config()
    assert cfg == Config()
    assert from_run_config(to_run_config(cfg)) == cfg


def test_toml_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[task]\ndataset = "synthetic"\nmodel = "logreg"\n'
        "[federation]\nnum_clients = 30\nrounds = 5\n"
        "[fleet]\nmix = { rpi4 = 1, phone-low = 3 }\n"
    )
    cfg = load_config(path, ["federation.lr=0.01", "strategy.mu=1", "fleet.stragglers=0.9"])
    assert cfg.task.name == "synthetic" and cfg.task.params == {"model": "logreg"}
    assert cfg.federation.num_clients == 30 and cfg.federation.rounds == 5
    assert cfg.federation.lr == 0.01
    assert cfg.strategy.mu == 1.0 and isinstance(cfg.strategy.mu, float)
    assert dict(cfg.fleet.mix) == {"rpi4": 1.0, "phone-low": 3.0}


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("federation.clients=3", "federation.clients"),
        ("nosuch.key=1", "nosuch"),
        ("federation.rounds=0", "federation.rounds"),
        ("federation.rounds=2.5", "federation.rounds"),
        ("federation.lr=-1", "federation.lr"),
        ("federation.lr=nan", "federation.lr"),
        ("task.dataset=mnist", "task.name"),  # the old key names the new one
        ("task.iid=1", "task.params"),
        ("task.name=mnist", "task.name"),
        ("task.name=no_such_module:Task", "task.name"),
        ("task.params.model=lstm", "task.params"),
        ("task.params.layers=3", "task.params"),
        ("task.seed=-1", "task.seed"),
        ("strategy.name=scaffold", "strategy.name"),
        ("fleet.stragglers=1.5", "fleet.stragglers"),
        ("fleet.mix={iphone99=1}", "fleet.mix"),
        ("federation.clients_per_round=50", "federation.clients_per_round"),
        ("fleet.memory_budget_fraction=1.5", "fleet.memory_budget_fraction"),
        ("fleet.memory_budget_fraction=-0.1", "fleet.memory_budget_fraction"),
        ("fleet.runtime_memory_mib=-1", "fleet.runtime_memory_mib"),
        ("fleet.runtime_memory_mib=inf", "fleet.runtime_memory_mib"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert info.value.key == key
    assert f"'{key}'" in str(info.value)


def test_cnn_on_synthetic_is_rejected():
    with pytest.raises(ConfigError, match="task.params.*model 'cnn'"):
        load_config(None, ["task.dataset=synthetic", "task.model=cnn"])


def test_unknown_toml_key_and_bad_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[strategy]\nmuu = 1\n")
    with pytest.raises(ConfigError, match="strategy.muu"):
        load_config(path)
    path.write_text("[strategy\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")


def test_override_syntax():
    assert parse_override("output.dir=runs/x") == ("output", "dir", "runs/x")
    assert parse_override("fleet.seed=3") == ("fleet", "seed", 3)
    with pytest.raises(ConfigError):
        parse_override("rounds=3")


def test_fedavg_resolves_mu_to_zero():
    assert load_config(None, ["strategy.name=fedavg", "strategy.mu=1"]).strategy.mu == 0.0


def test_every_key_is_documented():
    rows = describe_keys()
    assert len(rows) >= 20
    assert all(help_text for _, _, help_text in rows), [k for k, _, h in rows if not h]


def test_shipped_example_configs_are_valid():
    from pathlib import Path

    examples = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert examples
    for path in examples:
        load_config(path)


# Found by fuzzing the configuration: each was a traceback or failed after Ray started.
@pytest.mark.parametrize(("overrides", "key"), [
    (["fleet.seed=-1"], "fleet.seed"),
    (["federation.num_clients=2000", "federation.clients_per_round=2"],
     "federation.num_clients"),  # digits has too few examples for 2000 clients
    (["federation.num_clients=1000000000"], "federation.num_clients"),
    (["federation.lr=1e308"], "federation.lr"),
    (['task.name="synthetic"', "task.params.beta=1e308"], "task.params"),
    (["federation.client_cpus=100000"], "federation.client_cpus"),
    (["fleet.runtime_memory_mib=1e12"], "fleet.runtime_memory_mib"),
])
def test_fuzzed_values_are_one_error_naming_the_key_before_any_engine(
        overrides: list[str], key: str) -> None:
    from fleetfl.coordinator.preflight import preflight

    with pytest.raises(ConfigError) as err:
        preflight(load_config(None, overrides))  # what `fleetfl simulate` runs before Ray
    assert err.value.key == key


def test_config_and_out_paths_that_are_not_files_or_directories(tmp_path) -> None:
    binary = tmp_path / "random.toml"
    binary.write_bytes(bytes(range(256)))
    for path, words in ((binary, "not valid TOML"), (tmp_path, "is a directory")):
        with pytest.raises(ConfigError, match=words) as err:
            load_config(path)
        assert err.value.key == "--config"
    taken = tmp_path / "a-file"
    taken.write_text("")
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"output.dir={str(taken)!r}"])
    assert err.value.key == "output.dir"


def test_the_documented_configs_load():
    """docs/deploy.md's sample coordinator.toml (and the other examples) are valid configs."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    deploy = (root / "docs" / "deploy.md").read_text()
    sample = (root / "examples" / "coordinator.toml").read_text()
    assert sample in deploy  # the file is the sample the docs show
    for path in sorted((root / "examples").glob("*.toml")):
        load_config(str(path), [])


def test_the_defaults_are_the_full_stack_and_its_conflicts_say_how_out() -> None:
    config = load_config(None)
    assert (config.compression.update_bits, config.compression.downlink_bits) == (8, 8)
    assert config.compression.prune_final_sparsity == 0.8 and config.secagg.enabled
    assert config.compression.pruning_rounds(config.federation.rounds) == (10, 30)
    with pytest.raises(ConfigError, match="secagg.enabled.*secagg.enabled = false"):
        load_config(None, ["compression.update_bits=32"])
    with pytest.raises(ConfigError, match="federation.clients_per_round.*secagg.enabled"):
        load_config(None, ["federation.clients_per_round=1"])
    with pytest.raises(ConfigError, match="aggregation.robust.*secagg.enabled = false"):
        load_config(None, ["aggregation.robust=median"])
    plain = load_config(None, ["compression.update_bits=32", "secagg.enabled=false",
                               "federation.clients_per_round=1"])
    assert not plain.secagg.enabled
