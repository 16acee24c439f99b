"""`fedmeta table` end to end on tiny writers data (local Ray), and its summary maths."""

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedmeta.sim.cli.main import app
from fedmeta.sim.config import ConfigError
from fedmeta.sim.personalize.table import summarize, to_markdown

TINY = """
seed: 1
data: {kind: writers, num_clients: 50, samples_per_client: 40, global_clients: 5, writers: {flips: true}}
model: {kind: mlp, hidden: [32]}
federation: {clients_per_round: 10}
eval: {num_individuals: 5}
personalization:
  individuals: 5
  epochs: 1
  ae_epochs: 2
  ig_pool: 12
  consent_rate: CONSENT
  methods:
    - {method: baseline}
    - {method: es, n: 4}
    - {method: sw, n: 0.5}
    - {method: tl, n: 6, last_layers: 1}
    - {method: random, n: 30}
    - {method: sg, n: 30}
    - {method: ig, n: IG}
ray: {num_workers: 2, num_cpus_per_worker: 0.5}
run: {out_dir: OUT, progress: false}
"""


def write(tmp_path, consent=1.0, ig=3):
    path = tmp_path / "table.yaml"
    path.write_text(
        TINY.replace("CONSENT", str(consent)).replace("IG", str(ig)).replace("OUT", str(tmp_path))
    )
    return path


@pytest.mark.slow
def test_table_end_to_end(ray_session, tmp_path):
    res = CliRunner().invoke(app, ["table", str(write(tmp_path, consent=0.0)), "--json"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    run_dir = tmp_path / lines[-1].split("/")[-1]
    rows = json.loads(lines[-2])
    assert [r["method"] for r in rows] == [
        "BaseLine",
        "EarlyShape-ES-n-4",
        "SampleWeigh-SW-n-0.5",
        "TransferL-TL-n-6-last-1",
        "BaseLine-n-30",
        "SingleSa.Group-SG-n-30",
        "IndividualGroup-IG-n-3",
    ]
    assert lines[0].startswith("| Method |")
    for name in ("table.md", "table.csv", "individuals.csv", "profiles.sqlite", "config.yaml"):
        assert (run_dir / name).is_file(), name
    per = pd.read_csv(run_dir / "individuals.csv")
    assert len(per) == 7 * 5 and per.acc_DI.between(0, 1).all() and per.acc_DG.between(0, 1).all()
    # nobody outside the evaluated individuals consented to grouping: IG groups come from them only
    evaluated = set(per.individual)
    for members in per[per.method == "IndividualGroup-IG-n-3"].group_members:
        group = {int(m) for m in members.split()}
        assert len(group) == 3 and group <= evaluated
    assert (per[per.method.isin(["BaseLine-n-30", "SingleSa.Group-SG-n-30"])].added_samples == 30).all()
    for group in ("shaping", "grouping"):  # ranks within each block follow the mean accuracies
        block = [r for r in rows if r["group"] == group]
        for r in block:
            assert r["rank_acc_DI"] == 1 + sum(o["acc_DI"] > r["acc_DI"] for o in block)
            assert r["rank_acc_DG"] == 1 + sum(o["acc_DG"] > r["acc_DG"] for o in block)


def test_table_refuses_groups_larger_than_the_consenting_pool(ray_session, tmp_path):
    res = CliRunner().invoke(app, ["table", str(write(tmp_path, consent=0.0, ig=5))])
    assert isinstance(res.exception, ConfigError)  # `main` turns it into one line and exit status 2
    assert str(res.exception).startswith(
        "personalization.methods.6.n: IndividualGroup-IG-n-5 needs 5 consenting"
    )


def test_summarize_ranks_and_paired_test():
    rng = np.random.default_rng(0)
    rows = []
    for method, group, shift in (
        ("BaseLine", "shaping", 0.0),
        ("ES", "shaping", 0.1),
        ("SW", "shaping", -0.05),
    ):
        for i in range(8):
            rows.append(
                {
                    "group": group,
                    "method": method,
                    "individual": i,
                    "acc_DI": 0.5 + shift + 0.01 * rng.random(),
                    "acc_DG": 0.7 - shift,
                    "transfers": 2,
                }
            )
    table = summarize(pd.DataFrame(rows), ["BaseLine", "ES", "SW"])
    assert table.method.tolist() == ["BaseLine", "ES", "SW"]
    assert table.rank_acc_DI.tolist() == [2, 1, 3] and table.rank_acc_DG.tolist() == [2, 3, 1]
    assert np.isnan(table.p_DI_vs_baseline[0]) and table.p_DI_vs_baseline[1] < 1e-3
    md = to_markdown(table)
    assert md.count("\n") == 2 + 3 and "| Shaping | BaseLine |" in md
