"""Authenticated serving (issue 27, item 2): the pure parts (token files, the bearer check, the
rate limit) and the CLI's refusals. The HTTP status codes are checked against a live deployment in
test_app.py::test_the_api_needs_a_token_with_the_scope."""

from __future__ import annotations

import json
import sys

import pytest

from fedmeta.serve.auth import (
    SCOPES,
    AuthError,
    RateLimit,
    authenticate,
    digest,
    load_tokens,
    new_token_file,
    parse_tokens,
)

TOKEN = "t" * 32


def test_a_token_file_maps_tokens_to_scopes_and_refuses_what_is_not_one(tmp_path):
    assert parse_tokens({TOKEN: ["predict", "predict"]}) == {digest(TOKEN): ["predict"]}
    for raw, match in [
        ([], "expected a JSON object"),
        ({"short": ["predict"]}, "at least 16"),
        ({TOKEN: []}, "non-empty list"),
        ({TOKEN: ["admin"]}, "unknown scope 'admin'"),
        ({TOKEN: "predict"}, "non-empty list"),
    ]:
        with pytest.raises(AuthError, match=match):
            parse_tokens(raw)
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(AuthError, match="is not JSON"):
        load_tokens(tmp_path / "bad.json")
    with pytest.raises(AuthError, match="cannot read"):
        load_tokens(tmp_path / "missing.json")


def test_generated_tokens_are_private_and_one_per_scope(tmp_path):
    path = tmp_path / "state" / "tokens.json"
    tokens = new_token_file(path)
    assert set(tokens) == set(SCOPES) and path.stat().st_mode & 0o777 == 0o600
    grants = load_tokens(path)
    assert authenticate(f"Bearer {tokens['predict']}", grants).scopes == {"predict"}
    assert authenticate(f"Bearer {tokens['operator']}", grants).scopes == set(SCOPES)
    assert TOKEN not in path.read_text() and digest(tokens["predict"]) not in path.read_text()


def test_the_bearer_check():
    grants = parse_tokens({TOKEN: ["predict"], "u" * 32: ["feedback"]})
    assert authenticate(f"Bearer {TOKEN}", grants).may("predict")
    assert not authenticate(f"Bearer {TOKEN}", grants).may("feedback")
    for header in (None, "", TOKEN, f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer "):
        assert authenticate(header, grants) is None
    assert authenticate(f"Bearer {TOKEN}", grants).id == digest(TOKEN)[:12]  # a name safe to log


def test_the_rate_limit_is_per_token():
    now = [0.0]
    limit = RateLimit(rate=2.0, burst=3.0, clock=lambda: now[0])
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b")  # another token has its own bucket
    now[0] += 1.0  # two more a second
    assert [limit.allow("a") for _ in range(3)] == [True, True, False]


def test_serve_refuses_a_public_host_without_auth_and_a_bad_token_file(tmp_path, monkeypatch, capsys):
    from fedmeta.sim.checkpoint import save_member
    from fedmeta.sim.cli.main import main

    member = save_member(
        tmp_path / "m",
        {"kind": "mlp", "hidden": [4]},
        [0.0] * (4 * 4 + 4 + 4 * 2 + 2),
        [4],
        2,
        {"mean": [0.0] * 4, "var": [1.0] * 4, "n": 10},
    ).parent

    def fedmeta(*argv):
        monkeypatch.setattr(sys, "argv", ["fedmeta", *argv])
        with pytest.raises(SystemExit) as stop:
            main()
        return stop.value.code, capsys.readouterr()

    code, out = fedmeta("serve", str(member), "--host", "0.0.0.0", "--write-config", str(tmp_path / "s.yaml"))
    assert code == 2 and "--host 0.0.0.0: a host other hosts can reach needs --auth FILE" in out.err
    (tmp_path / "tokens.json").write_text(json.dumps({"short": ["predict"]}))
    code, out = fedmeta(
        "serve",
        str(member),
        "--auth",
        str(tmp_path / "tokens.json"),
        "--write-config",
        str(tmp_path / "s.yaml"),
    )
    assert code == 2 and len(out.err.strip().splitlines()) == 1 and "at least 16" in out.err
    # a loopback host without --auth: generated tokens in the state directory; the config carries their digests
    code, out = fedmeta("serve", str(member), "--write-config", str(tmp_path / "s.yaml"))
    assert code in (0, None), out.err
    import yaml

    written = yaml.safe_load((tmp_path / "s.yaml").read_text())
    auth = written["applications"][-1]["args"]["auth"]
    assert (
        len(auth) == 4
        and all(len(d) == 64 for d in auth)
        and written["http_options"]["request_timeout_s"] == 30
    )
    assert "bearer tokens (one per scope)" in out.out and str(tmp_path) not in out.out.split("tokens")[1]


@pytest.mark.slow
def test_the_written_config_deploys_with_serve_run(tmp_path):
    """`fedmeta serve --write-config` output is what Ray's own `serve run CONFIG` deploys (on a Ray
    instance of its own): liveness open, answers only with a token."""
    import os
    import shutil
    import signal
    import socket
    import subprocess
    import time

    import requests

    from fedmeta.sim.checkpoint import save_member

    member = save_member(
        tmp_path / "m",
        {"kind": "mlp", "hidden": [4]},
        [0.0] * (4 * 4 + 4 + 4 * 2 + 2),
        [4],
        2,
        {"mean": [0.0] * 4, "var": [1.0] * 4, "n": 10},
    ).parent
    (tmp_path / "tokens.json").write_text(json.dumps({TOKEN: ["predict"]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "serve.yaml"
    written = subprocess.run(
        [sys.executable, "-m", "fedmeta", "serve", str(member), "--auth", str(tmp_path / "tokens.json")]
        + ["--port", str(port), "--write-config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert written.returncode == 0, written.stderr
    serve_cli = shutil.which("serve", path=os.path.dirname(sys.executable)) or shutil.which("serve")
    proc = subprocess.Popen(
        [serve_cli, "run", "--address", "local", str(config)],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, "serve run exited"
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the deployment never became healthy"
            time.sleep(1)
        body = {"inputs": [[0.0, 0.0, 0.0, 0.0]]}
        assert requests.post(url + "/predict", json=body, timeout=30).status_code == 401
        answer = requests.post(
            url + "/predict", json=body, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # serve run tears its applications and Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
