"""`fedmeta privacy epsilon|noise`: the last line is the number; bad options are ConfigErrors."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from actors.privacy import epsilon_for, noise_for
from sim.config import ConfigError
from sim.privacy_cli import privacy_app

runner = CliRunner()


def last_line(output: str) -> float:
    return float(output.strip().splitlines()[-1])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_last_line_is_epsilon(accountant):
    r = runner.invoke(privacy_app, ["epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04",
                                    "--steps", "300", "--delta", "1e-5", "--accountant", accountant])
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == epsilon_for(1.5, 0.04, 300, 1e-5, accountant)


def test_epsilon_defaults_to_rdp():
    r = runner.invoke(privacy_app, ["epsilon", "--noise-multiplier", "1.5", "--sample-rate", "0.04",
                                    "--steps", "2250", "--delta", "1e-5"])
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == epsilon_for(1.5, 0.04, 2250, 1e-5, "rdp")


def test_noise_last_line_is_noise_multiplier():
    r = runner.invoke(privacy_app, ["noise", "--epsilon", "2", "--sample-rate", "0.04",
                                    "--steps", "200", "--delta", "1e-5"])
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == noise_for(2.0, 0.04, 200, 1e-5)


@pytest.mark.parametrize("args, option", [
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"], "--sample-rate"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0", "--steps", "10", "--delta", "1e-5"], "--sample-rate"),
    (["epsilon", "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
     "--noise-multiplier"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0", "--delta", "1e-5"], "--steps"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"], "--delta"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5",
      "--accountant", "gdp"], "--accountant"),
    (["noise", "--epsilon", "0", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"], "--epsilon"),
    (["noise", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0"], "--delta"),
])
def test_bad_option_raises_config_error_naming_it(args, option):
    r = runner.invoke(privacy_app, args)
    assert isinstance(r.exception, ConfigError), r.output
    message = str(r.exception)
    assert message.startswith(f"{option}:") and "\n" not in message
