"""`fedmeta serve` and `fedmeta specialize`: from finished runs to a served, routed ensemble.

`serve` checks each run directory (or member checkpoint) before Ray starts, picks the bearer
tokens (an `--auth` file, or for a loopback host fresh ones in the state directory), and either
writes a Serve config for `serve deploy` or serves the ensemble until Ctrl-C, printing each
released member; `specialize` exports one member per group of similar individuals for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from fedmeta.sim.cli.common import TrustOpt
from fedmeta.sim.config import ConfigError


def serve_cmd(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="run directories (or member checkpoints): one ensemble member each")
    ],
    port: Annotated[int, typer.Option(min=1, max=65535, help="HTTP port on --host")] = 8000,
    host: Annotated[str, typer.Option(help="HTTP host")] = "127.0.0.1",
    personalized: Annotated[
        Optional[Path], typer.Option(help="run directory whose personalized/ models serve users by id")
    ] = None,
    top_k: Annotated[int, typer.Option(min=1, help="members combined per answer")] = 2,
    reweight_s: Annotated[float, typer.Option(min=0.1, help="seconds between routing recomputations")] = 2.0,
    write_config: Annotated[
        Optional[Path], typer.Option(help="write a Serve config file for `serve deploy` and exit")
    ] = None,
    address: Annotated[
        Optional[str], typer.Option(help="Ray cluster address (default: start local Ray)")
    ] = None,
    trust_code: TrustOpt = False,
    auth: Annotated[
        Optional[Path],
        typer.Option(
            help="JSON file mapping each bearer token to its scopes "
            "(predict, personal, feedback, operator); default: "
            "fresh tokens, one per scope, in a 0600 file in the "
            "state directory (loopback hosts only)"
        ),
    ] = None,
    request_timeout_s: Annotated[float, typer.Option(min=0.1, help="HTTP request timeout")] = 30.0,
) -> None:
    """Serve federation checkpoints as a routed, weighted ensemble (Ray Serve) until Ctrl-C."""
    from fedmeta.serve.app import Deployment

    names = _member_names(run_dirs, trust_code)
    if personalized is not None and not (personalized / "personalized").is_dir():
        raise ConfigError(
            f"--personalized: {personalized} has no personalized/ directory (a finished fedmeta run)"
        )
    tokens, token_file = _bearer_tokens(auth, host, port, write_config)
    dep = Deployment(
        names,
        personalized=str(personalized.resolve()) if personalized else None,
        settings={"top_k": top_k},
        reweight_s=reweight_s,
        trust_code=trust_code,
        auth=tokens,
    )
    if write_config is not None:
        import yaml

        config = dep.config(host, port)
        config["http_options"]["request_timeout_s"] = request_timeout_s
        write_config.write_text(yaml.safe_dump(config, sort_keys=False))
        if token_file is not None:
            print(f"bearer tokens (one per scope): {token_file}")
        print(write_config)
        return
    _serve_until_stopped(dep, names, host, port, address, request_timeout_s, reweight_s, token_file)


def _member_names(run_dirs: list[Path], trust_code: bool) -> dict[str, str]:
    """A unique name for each member (from its folder's name) -> its resolved path."""
    from fedmeta.serve.app import member_info

    names: dict[str, str] = {}
    for d in run_dirs:
        if not (d / "checkpoint.pt").is_file():
            raise ConfigError(f"RUN_DIRS: {d} has no checkpoint.pt")
        try:
            member_info(
                d, trust_code
            )  # a damaged or foreign checkpoint, or a card with no profile, fails here, before Ray starts
        except ValueError as e:
            raise ConfigError(f"RUN_DIRS: {e}") from None
        name = "".join(ch if ch.isalnum() else "-" for ch in d.resolve().name)[:40] or "member"
        while name in names:
            name += "-2"
        names[name] = str(d.resolve())
    return names


def _bearer_tokens(auth: Optional[Path], host: str, port: int, write_config: Optional[Path]):
    """(tokens, token_file): the --auth file's tokens (token_file None), or, for a loopback host
    only, generated ones in the state directory (a fresh set unless only writing a config)."""
    import ipaddress

    from fedmeta.serve.auth import AuthError, load_tokens, new_token_file
    from fedmeta.sim.artifacts.statedir import state_dir

    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if auth is None and not loopback:
        raise ConfigError(
            f"--host {host}: a host other hosts can reach needs --auth FILE (bearer tokens and their "
            "scopes); without it only a loopback host is served, with generated tokens"
        )
    token_file = None
    try:
        if auth is not None:
            tokens = load_tokens(auth)
        else:
            token_file = state_dir() / "serve" / f"tokens-{port}.json"
            tokens = load_tokens(token_file) if token_file.is_file() else None
            if tokens is None or write_config is None:  # a fresh set for each server started
                new_token_file(token_file)
                tokens = load_tokens(token_file)
    except AuthError as e:
        raise ConfigError(str(e)) from None
    return tokens, token_file


def _serve_until_stopped(
    dep,
    names: dict[str, str],
    host: str,
    port: int,
    address: Optional[str],
    request_timeout_s: float,
    reweight_s: float,
    token_file: Optional[Path],
) -> None:
    """Start Ray and Serve, deploy the ensemble and release members every `reweight_s` until Ctrl-C."""
    import time

    import ray
    from ray import serve

    ray.init(address=address) if address else ray.init()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": request_timeout_s})
    dep.deploy()
    print(
        f"serving {', '.join(names)} at http://{host}:{port} (predict, feedback, routing, members, health, "
        f"metrics); Ctrl-C stops"
    )
    if token_file is not None:
        print(f"bearer tokens (one per scope): {token_file}")
    try:
        while True:
            time.sleep(reweight_s)
            released = dep.collect()
            if released:
                print(f"released: {', '.join(released)}")
    except KeyboardInterrupt:
        serve.shutdown()


def specialize(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory (with personalized/)")],
    groups: Annotated[int, typer.Option(min=1, help="members to make: groups of similar individuals")] = 3,
    out_dir: Annotated[
        Optional[Path], typer.Option("--out", help="where to write them (default RUN_DIR/members)")
    ] = None,
    trust_code: TrustOpt = False,
) -> None:
    """Export specialized ensemble members, one per group of similar individuals, for `fedmeta serve`."""
    from fedmeta.sim.personalize.specialize import specialize as export

    try:
        for path in export(run_dir, groups, out_dir, trust_code):
            print(path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from None
