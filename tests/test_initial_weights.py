"""A run can start from given weights (run config ``initial-weights``: a public
pretraining, another run's ``best.pt``), checked against the run's network before the run
directory is written; a resumed run still continues from its own checkpoint."""

import pytest
import torch

from fedq.common.config import ConfigError, FedqConfig
from fedq.server.run_directory import RunDirectory
from fedq.server.server_app import initial_model, run_in


def _config(tmp_path, **keys):
    return FedqConfig.from_mapping({"run-dir": str(tmp_path / "run"), **keys})


def _saved_run_checkpoint(tmp_path, **keys):
    """A checkpoint written the way a run writes them, of a net seeded differently."""
    source = RunDirectory(tmp_path / "source")
    source.checkpoints.mkdir(parents=True)
    net = initial_model(_config(tmp_path, seed=7, **keys), None)
    return source.save_checkpoint(3, net.state_dict(), {}), net


def test_a_fresh_run_starts_from_the_checkpoint_not_from_its_seed(tmp_path):
    path, source_net = _saved_run_checkpoint(tmp_path)
    net = initial_model(_config(tmp_path, **{"initial-weights": str(path)}), None)
    fresh = initial_model(_config(tmp_path), None)
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, source_net.state_dict()[name])
    assert not all(torch.equal(t, fresh.state_dict()[n]) for n, t in net.state_dict().items())


def test_a_resumed_run_continues_from_its_own_checkpoint(tmp_path):
    path, _ = _saved_run_checkpoint(tmp_path)
    own = initial_model(_config(tmp_path, seed=3), None).state_dict()
    net = initial_model(_config(tmp_path, **{"initial-weights": str(path)}),
                        {"state_dict": own})
    assert all(torch.equal(t, own[n]) for n, t in net.state_dict().items())


def test_weights_of_another_network_are_refused_naming_the_field_and_tensor(tmp_path):
    path, _ = _saved_run_checkpoint(tmp_path, **{"hidden-sizes": "32,32"})
    with pytest.raises(ConfigError, match=r"initial-weights.*tensor '.*' has shape"):
        initial_model(_config(tmp_path, **{"initial-weights": str(path)}), None)


def test_a_missing_or_foreign_file_is_refused_naming_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"initial-weights.*no checkpoint file"):
        initial_model(_config(tmp_path, **{"initial-weights": str(tmp_path / "nope.pt")}),
                      None)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"initial-weights.*cannot be loaded"):
        initial_model(_config(tmp_path, **{"initial-weights": str(junk)}), None)


def test_bad_initial_weights_fail_before_the_run_directory_is_written(tmp_path):
    """Fixing the path and starting again must not meet a half-made run directory."""
    config = _config(tmp_path, **{"initial-weights": str(tmp_path / "nope.pt")})
    with pytest.raises(ConfigError, match="initial-weights"):
        run_in(RunDirectory(tmp_path / "run"), grid=None, config=config)
    assert not (tmp_path / "run").exists()


def test_fedq_simulate_checks_the_file_before_any_process_and_passes_it_absolute(
        tmp_path, monkeypatch):
    """A typo fails in the driver, not after Ray has started; a relative path is made
    absolute, since Flower's ServerApp does not run in the user's directory."""
    from fedq.simulations.run import resolve_run_config

    run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"initial-weights.*no checkpoint file"):
        resolve_run_config({"run-dir": run_dir, "initial-weights": "nope.pt"}, 2)
    path, _ = _saved_run_checkpoint(tmp_path)
    monkeypatch.chdir(path.parent)
    _, run_config = resolve_run_config({"run-dir": run_dir, "initial-weights": path.name}, 2)
    assert run_config["initial-weights"] == str(path.resolve())
