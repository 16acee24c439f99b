"""The serve package's layout, without Ray running: what callers import from `fedmeta.serve.app`, the
deployment names handles look up, and the import paths Serve config files name."""

import importlib


def test_app_reexports_what_callers_outside_serve_import():
    import fedmeta.serve.app as app
    from fedmeta.serve import client, members

    assert app.Deployment is client.Deployment
    assert app.member_info is members.member_info and app.PersonalModels is members.PersonalModels


def test_deployments_keep_the_names_handles_look_up():
    from fedmeta.serve.ensemble import Ensemble
    from fedmeta.serve.members import Member, PersonalModels
    from fedmeta.serve.router import Router

    assert [d.name for d in (Member, PersonalModels, Router, Ensemble)] == [
        "Member",
        "PersonalModels",
        "Router",
        "Ensemble",
    ]


def test_config_import_paths_name_the_builders_in_app():
    from fedmeta.serve.app import ensemble_builder, member_builder
    from fedmeta.serve.client import Deployment

    apps = Deployment({"a": "unused"}).config()["applications"]
    paths = [a["import_path"] for a in apps]
    assert paths == ["fedmeta.serve.app:member_builder", "fedmeta.serve.app:ensemble_builder"]
    module, _, _ = paths[0].partition(":")
    builders = [getattr(importlib.import_module(module), p.partition(":")[2]) for p in paths]
    assert builders == [member_builder, ensemble_builder]
