"""Issue 26, item 7: with profiles on, consent gates the evaluation panel, fine-tuning, exports and
per-user serving, user by user; a revocation takes effect from the next evaluation and deletes the
user's exported model. Written as an adversary checks the claim: from the store and the run
directory, not from what the code under test says about itself."""

import numpy as np
import pandas as pd
import pytest
import torch

from fedmeta.sim.config import from_dict
from fedmeta.sim.engine.consent import PURPOSE, consenting_panel
from tests.conftest import tiny_raw

CONSENT = {"enabled": True, "consent_rate": 0.5}


def consenting_users(run_dir, n: int) -> set[int]:
    """Who consents to personalization, read from the run's encrypted store itself."""
    from fedmeta.actors.profile_store import ProfileStore
    from fedmeta.sim.artifacts.statedir import store_key_path

    store = ProfileStore(
        run_dir / "profiles.sqlite", key_file=store_key_path(run_dir / "profiles.sqlite", run_dir)
    )
    try:
        return set(store.eligible(PURPOSE, list(range(n))))
    finally:
        store.close()


def knows(run_dir, user: int) -> bool:
    """Whether per-user serving would answer `user` with a personalized model (serve/app.py)."""
    from fedmeta.serve.app import PersonalModels

    threads = torch.get_num_threads()  # the replica pins itself to one thread: not this process
    try:
        return PersonalModels.func_or_class(str(run_dir), str(run_dir / "personalized")).known(str(user))
    finally:
        torch.set_num_threads(threads)


def test_the_panel_is_drawn_from_consenting_users_and_all_of_them_when_too_few_consent():
    users = np.array([3, 5, 8, 13, 21, 34, 55])
    panel = consenting_panel(3, users, 4)
    assert len(panel) == 4 and set(panel) <= set(users) and list(panel) == sorted(panel)
    assert np.array_equal(panel, consenting_panel(3, users, 4))  # seeded: the same each time
    assert np.array_equal(consenting_panel(3, users, 100), users)  # fewer consent than asked: all of them
    assert len(consenting_panel(3, np.array([], dtype=np.int64), 8)) == 0


@pytest.mark.slow
@pytest.mark.adversary
def test_a_user_without_consent_is_never_evaluated_exported_or_served(ray_session, tmp_path):
    from fedmeta.sim.run.experiment import run_experiment

    run_dir, s = run_experiment(from_dict(tiny_raw(tmp_path, profiles=CONSENT, federation={"rounds": 2})))
    consenting = consenting_users(run_dir, 40)
    refused = set(range(40)) - consenting
    assert 8 < len(consenting) < 32 and refused  # about half consent
    evaluated = set(pd.read_parquet(run_dir / "individuals.parquet").client_id)
    exported = {int(f.stem) for f in (run_dir / "personalized").glob("*.npy")}
    assert evaluated <= consenting and exported <= consenting
    assert len(exported) == s["eval_individuals"] == min(8, len(consenting))  # the panel: 8 consenting users
    assert not any(knows(run_dir, u) for u in refused)
    assert all(knows(run_dir, u) for u in exported)


@pytest.mark.adversary
def test_revoking_deletes_the_exported_model_and_leaves_the_next_evaluation(ray_session, tmp_path):
    from fedmeta.sim.checkpoint import save_member
    from fedmeta.sim.engine.federation import Federation
    from fedmeta.sim.engine.plan import FederationPlan
    from fedmeta.sim.run.hooks import export_personalized

    cfg = from_dict(tiny_raw(tmp_path, profiles=CONSENT))
    fed = Federation(FederationPlan.from_config(cfg), run_dir=tmp_path)
    try:
        g = fed.plan.init_params
        ev = fed.evaluate(0, g, export=True)
        export_personalized(tmp_path, ev["client_ids"], ev["personalized"])
        save_member(
            tmp_path,
            cfg.model.model_dump(mode="json"),
            g,
            list(fed.plan.input_shape),
            fed.plan.num_classes,
            fed.plan.input_profile,
        )  # a checkpoint serving can load
        victim, other = ev["client_ids"][:2]
        assert knows(tmp_path, victim)
        fed.revoke(victim)
        assert not (tmp_path / "personalized" / f"{victim}.npy").exists() and not knows(tmp_path, victim)
        fed.revoke(other, "analytics")  # another purpose: personalization and its model stay
        assert knows(tmp_path, other)
        after = fed.evaluate(0, g)
        assert victim not in after["client_ids"] and set(after["client_ids"]) == set(ev["client_ids"]) - {
            victim
        }
        assert fed.private_metric(0, g)["count"] == len(ev["client_ids"]) - 1
    finally:
        fed.shutdown()
