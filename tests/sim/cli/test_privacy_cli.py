"""`fedmeta privacy epsilon|noise`: the last line is the number; bad options are ConfigErrors."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedmeta.actors.privacy import epsilon_for, noise_for
from fedmeta.sim.cli.privacy import privacy_app
from fedmeta.sim.config import ConfigError

runner = CliRunner()


def last_line(output: str) -> float:
    return float(output.strip().splitlines()[-1])


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_last_line_is_epsilon(accountant):
    r = runner.invoke(
        privacy_app,
        [
            "epsilon",
            "--noise-multiplier",
            "1.5",
            "--sample-rate",
            "0.04",
            "--steps",
            "300",
            "--delta",
            "1e-5",
            "--accountant",
            accountant,
        ],
    )
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == epsilon_for(1.5, 0.04, 300, 1e-5, accountant)


def test_epsilon_defaults_to_rdp():
    r = runner.invoke(
        privacy_app,
        [
            "epsilon",
            "--noise-multiplier",
            "1.5",
            "--sample-rate",
            "0.04",
            "--steps",
            "2250",
            "--delta",
            "1e-5",
        ],
    )
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == epsilon_for(1.5, 0.04, 2250, 1e-5, "rdp")


def test_noise_last_line_is_noise_multiplier():
    r = runner.invoke(
        privacy_app, ["noise", "--epsilon", "2", "--sample-rate", "0.04", "--steps", "200", "--delta", "1e-5"]
    )
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == noise_for(2.0, 0.04, 200, 1e-5)


@pytest.mark.parametrize(
    "args, option",
    [
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "10", "--delta", "1e-5"],
            "--sample-rate",
        ),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0", "--steps", "10", "--delta", "1e-5"],
            "--sample-rate",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "0",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
            ],
            "--noise-multiplier",
        ),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "0", "--delta", "1e-5"],
            "--steps",
        ),
        (
            ["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "1"],
            "--delta",
        ),
        (
            [
                "epsilon",
                "--noise-multiplier",
                "1",
                "--sample-rate",
                "0.1",
                "--steps",
                "10",
                "--delta",
                "1e-5",
                "--accountant",
                "gdp",
            ],
            "--accountant",
        ),
        (
            ["noise", "--epsilon", "0", "--sample-rate", "0.1", "--steps", "10", "--delta", "1e-5"],
            "--epsilon",
        ),
        (["noise", "--epsilon", "1", "--sample-rate", "0.1", "--steps", "10", "--delta", "0"], "--delta"),
    ],
)
def test_bad_option_raises_config_error_naming_it(args, option):
    r = runner.invoke(privacy_app, args)
    assert isinstance(r.exception, ConfigError), r.output
    message = str(r.exception)
    assert message.startswith(f"{option}:") and "\n" not in message


def test_poisson_from_population_and_cohort_is_the_rate_cohort_over_population():
    r = runner.invoke(
        privacy_app,
        [
            "epsilon",
            "--noise-multiplier",
            "1",
            "--population",
            "2000",
            "--cohort",
            "100",
            "--steps",
            "300",
            "--delta",
            "1e-5",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        last_line(r.output) == epsilon_for(1.0, 0.05, 300, 1e-5)
        and "Poisson" not in r.output.splitlines()[-1]
    )


def test_fixed_sampling_accounts_without_replacement_and_is_larger():
    from fedmeta.actors.privacy import Sampling

    args = [
        "--population",
        "2000",
        "--cohort",
        "100",
        "--steps",
        "300",
        "--delta",
        "1e-5",
        "--sampling",
        "fixed",
    ]
    r = runner.invoke(privacy_app, ["epsilon", "--noise-multiplier", "1", *args])
    assert r.exit_code == 0, r.output
    fixed = last_line(r.output)
    assert fixed == epsilon_for(1.0, 0.05, 300, 1e-5, sampling=Sampling("fixed", 2000, 100))
    assert fixed > 10 * epsilon_for(1.0, 0.05, 300, 1e-5) and "replace one user" in r.output
    r = runner.invoke(privacy_app, ["noise", "--epsilon", "8", *args])
    assert r.exit_code == 0, r.output
    assert last_line(r.output) == noise_for(8.0, 0.05, 300, 1e-5, sampling=Sampling("fixed", 2000, 100))


@pytest.mark.parametrize(
    "args, option",
    [
        (["--sampling", "fixed", "--sample-rate", "0.1"], "--population"),
        (["--population", "100"], "--cohort"),
        (["--population", "100", "--cohort", "101"], "--cohort"),
        (["--population", "100", "--cohort", "10", "--sample-rate", "0.1"], "--sample-rate"),
        (["--sampling", "uniform", "--sample-rate", "0.1"], "--sampling"),
        (
            ["--sampling", "fixed", "--population", "100", "--cohort", "10", "--accountant", "prv"],
            "--accountant",
        ),
        ([], "--sample-rate"),
    ],
)
def test_bad_sampling_options_name_the_option(args, option):
    r = runner.invoke(
        privacy_app, ["epsilon", "--noise-multiplier", "1", "--steps", "10", "--delta", "1e-5", *args]
    )
    assert isinstance(r.exception, ConfigError), r.output
    assert str(r.exception).startswith(f"{option}:")
