"""The ensemble's routing state, as a plain class the Ray Serve `Router` deployment
(serve/router.py) wraps.

It ties the pure pieces together: `RoutingController` (weights from feedback accuracy, input
alignment and drift compensation, serve/routing.py), `CandidateTrial` and `PruningTracker`
(serve/shadow.py), plus a bounded log of recent requests so that labelled feedback, which arrives
later, can be scored against what each member answered.

`recompute()` returns the *routing state* that is pushed to the ingress replicas as their
`user_config`: weights, the active members, the candidate under test (if any) and what changed.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmeta.serve.routing import InputProfile, RoutingController
from fedmeta.serve.shadow import CandidateTrial, Decision, PruningTracker


@dataclass(frozen=True)
class RouterSettings:
    top_k: int = 2  # members combined per answer
    window: int = 256  # sliding window of recent inputs (rows)
    half_life: float = 200.0  # feedback events until old evidence counts half
    min_feedback: int = 20  # feedback before drift compensation applies
    prune_threshold: float = 0.05  # weight below which a member is at risk...
    prune_window: int = 10  # ...for this many consecutive recomputations
    log_requests: int = 10_000  # recent requests kept for feedback scoring
    tap_rows: int = 4096  # inputs kept for a drift analyzer between two takes
    # Feedback from an authenticated API counts per token (`caller`): a token's labels count toward
    # the weights, pruning and trials only while they stay within `feedback_share` of all counted
    # labels, or within `feedback_floor` (None: min_feedback // 2) while it is alone. So one token
    # never reaches min_feedback by itself, and never outweighs the others.
    feedback_share: float = 0.5
    feedback_floor: int | None = None
    # ...and pruning and trial decisions wait until feedback came from this many tokens (1: a single
    # trusted feedback source, e.g. the application's backend, may decide alone)
    min_feedback_tokens: int = 2
    auto_promote: bool = False  # False: a candidate the test favours waits for `promote` (an operator)


class RouterState:
    """Routing state of one ensemble: members, weights, candidate trial, pruning, request log."""

    def __init__(self, members: Mapping[str, Mapping], settings: RouterSettings = RouterSettings()):
        """`members`: name -> {"profile": InputProfile.to_dict(), "reference_quality": float}."""
        self.settings = settings
        self.controller = RoutingController(
            {m: InputProfile.from_dict(v["profile"]) for m, v in members.items()},
            {m: float(v["reference_quality"]) for m, v in members.items()},
            window=settings.window,
            half_life=settings.half_life,
            min_feedback=settings.min_feedback,
        )
        self.pruner = PruningTracker(settings.prune_threshold, settings.prune_window)
        self.trial: CandidateTrial | None = None
        self._candidate: dict | None = None  # profile and reference of the candidate
        self.pruned: list[str] = []
        self.history: list[dict] = []  # promotions and rejections, oldest first
        self.version = 1  # replicas holding version 0 pull this state
        self._log: OrderedDict[str, dict] = OrderedDict()
        self._tap: deque[np.ndarray] = deque(maxlen=settings.tap_rows)  # rows for the drift analyzer
        self._by_caller: dict[str, int] = {}  # counted labels per token
        self.awaiting = False  # the trial decided to promote; an operator has not yet
        self._counted = 0

    # ------------------------------------------------------------ traffic
    def observe(self, inputs: np.ndarray) -> None:
        self.controller.observe(np.asarray(inputs, dtype=np.float64))
        self._tap.extend(np.asarray(inputs, dtype=np.float32).reshape(len(inputs), -1))

    def take_inputs(self) -> np.ndarray:
        """The inputs seen since the last take (at most `tap_rows`, oldest dropped), for a drift
        analyzer watching the live stream."""
        rows = np.stack(self._tap) if self._tap else np.zeros((0, self.controller.dim), np.float32)
        self._tap.clear()
        return rows

    def record(self, request_id: str, entry: dict) -> None:
        """What answered request `request_id`: {"members": {name: predicted labels}, "answer":
        labels returned, "arm": "ensemble" | "candidate" | "personal", "candidate": labels or None}."""
        self._log[request_id] = entry
        self._log.move_to_end(request_id)
        if self.trial is not None:  # the ingress routes by stable hashing; counted here
            self.trial.requests += 1
            self.trial.answers += entry.get("trial") == self.trial.candidate
        while len(self._log) > self.settings.log_requests:
            self._log.popitem(last=False)

    def _counts(self, caller: str | None, n: int) -> bool:
        """Whether `n` more labels from `caller` count (None: an open API, no tokens: always)."""
        if caller is None:
            return True
        floor = (
            self.settings.min_feedback // 2
            if self.settings.feedback_floor is None
            else self.settings.feedback_floor
        )
        mine, total = self._by_caller.get(caller, 0) + n, self._counted + n
        if mine > max(floor, self.settings.feedback_share * total):
            return False
        self._by_caller[caller], self._counted = mine, total
        return True

    def feedback(self, request_id: str, labels: np.ndarray, caller: str | None = None) -> dict:
        """Score a logged request against its true labels; unknown (or expired) ids are a KeyError, a
        wrong label count a ValueError. The entry is consumed only by a successful scoring, so a
        refused call can be retried with the right labels. `caller`: the token that sent them; past
        its share (`_counts`) the labels are scored for the caller but steer nothing (`counted`)."""
        if request_id not in self._log:
            raise KeyError(
                f"request_id {request_id!r} is unknown or older than the last "
                f"{self.settings.log_requests} requests"
            )
        labels = np.asarray(labels)
        expected = len(self._log[request_id]["answer"])
        if labels.ndim != 1 or len(labels) != expected:
            raise ValueError(
                f"labels: request {request_id!r} had {expected} inputs, got {labels.size} labels"
            )
        entry = self._log.pop(request_id)
        if not self._counts(caller, len(labels)):
            return {
                "accuracy": float((np.asarray(entry["answer"]) == labels).mean()),
                "members": {},
                "counted": False,
            }
        scored = {}
        for member, preds in entry["members"].items():
            if member in self.controller.profiles:  # pruned or rejected since: nothing to learn
                correct = int((np.asarray(preds) == labels).sum())
                self.controller.feedback(member, correct, len(labels))
                scored[member] = correct / len(labels)
        if self.trial is not None and entry.get("trial") == self.trial.candidate:
            self._score_trial(entry, labels)
        return {
            "accuracy": float((np.asarray(entry["answer"]) == labels).mean()),
            "members": scored,
            "counted": True,
        }

    def _score_trial(self, entry: dict, labels: np.ndarray) -> None:
        answer = np.asarray(entry["answer"]) == labels  # what the user got
        if self.trial.mode == "shadow":
            candidate = np.asarray(entry["candidate"]) == labels
            for c, p in zip(candidate, answer):
                self.trial.record_feedback(bool(c), bool(p))
        else:
            side = "candidate_correct" if entry["arm"] == "candidate" else "production_correct"
            for ok in answer:
                self.trial.record_feedback(**{side: bool(ok)})

    # ------------------------------------------------------------ candidates
    def set_candidate(
        self, name: str, profile: dict, reference_quality: float, mode: str, fraction: float, **test_options
    ) -> None:
        """Start a trial (test_options go to the sequential test, e.g. max_pairs); replaces a running one."""
        if name in self.controller.profiles:
            raise ValueError(f"candidate {name!r} is already a member")
        make = CandidateTrial.shadow if mode == "shadow" else CandidateTrial.ab
        self.trial = make(name, fraction, **test_options)
        # a secret salt: a caller who knew it could pick a user_id in the arm it wants
        self.trial.salt = secrets.token_hex(16)
        self._candidate = {
            "profile": InputProfile.from_dict(profile),
            "reference_quality": float(reference_quality),
        }
        self.version += 1

    # ------------------------------------------------------------ schedule
    def recompute(self) -> dict:
        """New weights; prune members that stayed weak; settle a decided trial. Returns the routing
        state for the ingress replicas."""
        events = []
        weights = self.controller.recompute()
        # with tokens, nothing is pruned or settled on the word of fewer than min_feedback_tokens of them
        decides = not self._by_caller or len(self._by_caller) >= self.settings.min_feedback_tokens
        for member in self.pruner.observe(weights) if decides else []:
            if len(self.controller.members) > 1:
                self.controller.remove_member(member)
                self.pruned.append(member)
                events.append({"event": "pruned", "member": member})
        if decides and self.trial is not None and self.trial.decision is not Decision.CONTINUE:
            if self.trial.decision is Decision.PROMOTE and not self.settings.auto_promote:
                if not self.awaiting:  # said once; the trial goes on serving its share meanwhile
                    self.awaiting = True
                    events.append(
                        {
                            "event": "awaiting_promotion",
                            "member": self.trial.candidate,
                            "trial": self.trial.to_dict(),
                        }
                    )
            else:
                events.append(self._settle())
        self.version += 1
        return self.routing(events)

    def _settle(self) -> dict:
        """End the decided trial: a promoted candidate joins the members. Returns its event."""
        name, decision = self.trial.candidate, self.trial.decision
        if decision is Decision.PROMOTE:
            self.controller.add_member(name, self._candidate["profile"], self._candidate["reference_quality"])
        event = {
            "event": "promoted" if decision is Decision.PROMOTE else "rejected",
            "member": name,
            "trial": self.trial.to_dict(),
        }
        self.history.append(event)
        self.trial, self._candidate, self.awaiting = None, None, False
        return event

    def promote(self, name: str) -> dict:
        """The operator's promotion of a candidate its trial decided for (`auto_promote` off); a
        ValueError when `name` is not such a candidate."""
        if self.trial is None or self.trial.candidate != name:
            raise ValueError(f"name: {name!r} is not the candidate under trial")
        if self.trial.decision is not Decision.PROMOTE:
            raise ValueError(
                f"name: the trial of {name!r} has not decided for it ({self.trial.decision.value})"
            )
        event = self._settle()
        self.version += 1
        return self.routing([event])

    def routing(self, events: list | None = None) -> dict:
        trial = self.trial
        return {
            "version": self.version,
            "weights": self.controller.weights,
            "active": self.controller.members,
            "top_k": self.settings.top_k,
            "pruned": list(self.pruned),
            "events": events or [],
            "candidate": None
            if trial is None
            else {
                "name": trial.candidate,
                "mode": trial.mode,
                "fraction": trial.fraction,
                "salt": trial.salt,
            },
        }

    def snapshot(self) -> dict:
        """For the /routing and /members endpoints: the routing without the trial's salt."""
        routing = self.routing()
        if routing["candidate"] is not None:
            routing["candidate"] = {k: v for k, v in routing["candidate"].items() if k != "salt"}
        return {
            **routing,
            "parts": self.controller.last_parts,
            "window_rows": self.controller.window_rows,
            "trial": None if self.trial is None else self.trial.to_dict(),
            "history": list(self.history),
        }
