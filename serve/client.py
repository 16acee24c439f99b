"""The driver's side of serving: `Deployment` deploys the member applications and the ensemble
(what `fedmeta serve` runs), adds candidates and starts their trials, runs a push or a promotion on
the Router, releases the applications of pruned members and rejected candidates, and writes the
equivalent Serve config file, whose applications name the builders in serve/app.py by import path.
"""

from dataclasses import dataclass, field

from ray import serve

from fedmeta.serve.ensemble import ensemble_app
from fedmeta.serve.members import member_app, member_app_name, member_info
from fedmeta.serve.router import router_entry


@dataclass
class Deployment:
    """Deploys and maintains the ensemble from the driver (what `fedmeta serve` runs)."""

    members: dict[str, str]  # name -> checkpoint (run dir)
    personalized: str | None = None
    settings: dict = field(default_factory=dict)  # RouterSettings fields
    reweight_s: float = 2.0
    app_name: str = "fedmeta"
    candidates: dict[str, str] = field(default_factory=dict)
    # Serve's LoggingConfig of every replica, e.g. {"enable_access_log": False}: an access-log line
    # per request and replica is written, tailed and shipped to the driver (~1 ms of CPU a request)
    logging_config: dict | None = None
    trust_code: bool = False  # custom models named by the members' cards may be imported (--trust-code)
    auth: dict | None = None  # token digest -> scopes (serve/auth.py); None: an open API

    def _run(self, app: serve.Application, name: str, route_prefix: str | None) -> None:
        serve.run(app, name=name, route_prefix=route_prefix, logging_config=self.logging_config)

    def deploy(self) -> None:
        for name, path in self.members.items():
            self._run(member_app(name, path, self.trust_code), member_app_name(name, self.app_name), None)
        self._run(
            ensemble_app(
                self.members,
                self.personalized,
                self.settings,
                self.reweight_s,
                self.app_name,
                self.trust_code,
                self.auth,
            ),
            self.app_name,
            "/",
        )

    def router(self):
        return serve.get_deployment_handle("Router", app_name=self.app_name)

    def add_candidate(self, name: str, checkpoint: str, mode: str, fraction: float, **test_options) -> dict:
        """Deploy a candidate as its own app and start its trial (shadow or A/B); `test_options` go to
        the sequential test (e.g. max_pairs=200 to bound how long a trial can run)."""
        if name in self.members or name in self.candidates:
            raise ValueError(f"name: {name!r} is already deployed")
        info = member_info(checkpoint, self.trust_code)
        self._run(member_app(name, checkpoint, self.trust_code), member_app_name(name, self.app_name), None)
        self.candidates[name] = str(checkpoint)
        return (
            self.router().start_trial.remote(name, router_entry(info), mode, fraction, test_options).result()
        )

    def promote(self, name: str) -> dict:
        """The operator's promotion of the candidate its trial decided for (auto_promote off)."""
        routing = self.router().promote.remote(name).result()
        return {**routing, "released": self.collect()}

    def push(self) -> dict:
        """One scheduled step now (recompute + push), then release what the router dropped."""
        routing = self.router().push.remote().result()
        return {**routing, "released": self.collect()}

    def collect(self) -> list[str]:
        """Delete the apps of pruned members and rejected candidates (releasing their replicas);
        a promoted candidate becomes a member."""
        snap = self.router().snapshot.remote().result()
        released = []
        for event in snap["history"]:
            name = event["member"]
            if event["event"] == "promoted" and name in self.candidates:
                self.members[name] = self.candidates.pop(name)
            elif event["event"] == "rejected" and name in self.candidates:
                self.candidates.pop(name)
                released.append(name)
        for name in snap["pruned"]:
            if self.members.pop(name, None) is not None:
                released.append(name)
        for name in released:
            serve.delete(member_app_name(name, self.app_name))
        return released

    def config(self, host: str = "127.0.0.1", port: int = 8000) -> dict:
        """A Serve config file for `serve deploy` / `serve run` (members as their own applications)."""
        logging = {"logging_config": self.logging_config} if self.logging_config else {}
        apps = [
            {
                "name": member_app_name(n, self.app_name),
                "route_prefix": None,
                "import_path": "fedmeta.serve.app:member_builder",
                "args": {"name": n, "checkpoint": str(p), "trust_code": self.trust_code},
                **logging,
            }
            for n, p in self.members.items()
        ]
        apps.append(
            {
                "name": self.app_name,
                "route_prefix": "/",
                "import_path": "fedmeta.serve.app:ensemble_builder",
                "args": {
                    "members": dict(self.members),
                    "personalized": self.personalized,
                    "settings": self.settings,
                    "reweight_s": self.reweight_s,
                    "app_name": self.app_name,
                    "trust_code": self.trust_code,
                    "auth": self.auth,
                },
                **logging,
            }
        )
        return {"http_options": {"host": host, "port": port}, "applications": apps}
