"""Following an alias: each new version it names is rolled out by analysis, per model.

A :class:`Rollout` polls the registry alias (``--follow``) and the shared rollout state
(:mod:`.rollout_state`) every ``rollout.poll_seconds``. When the alias names a version
the endpoint does not serve, a rollout starts: the candidate is added beside the live
version, gets copies of live requests (the mirror phase), then the traffic steps of the
policy. Only models whose file changed are compared (the others are one shared session
in both versions): copies whose live answer reached no changed model are not replayed.
Each phase is judged per changed model on the counts of every replica
(:mod:`.analysis`): it waits, passes (next step; after the last, the candidate is the
live version) or fails. A failure either holds back the failing models (the new version
minus those models, registered as a version of its own, goes on from the same step) or
rolls back: the candidate is removed, the alias is moved back to the live version
(logged in the promotion log) and the rejected version is tagged
``manymodels.rollout=rejected`` with the reason. Every event is appended to the rollout
log. Decisions are taken under the state's lock by whichever replica finds them due and
applied by every replica at its next poll.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from typing import Any, Literal

from manymodels.registry import (
    parse_models_uri,
    promote,
    resolve_bundle,
    resolve_version,
    set_version_tags,
)
from manymodels.runtime import read_manifest

from .analysis import Analysis, changed_models, judge, merge_observations
from .endpoint import Deployment, Endpoint
from .errors import DeploymentRefused, EndpointConflict, one_line
from .holdback import hold_back
from .metrics import Metrics
from .mirror import reply_models, reply_rows
from .policy import RolloutPolicy
from .rollout_state import RolloutRecord, RolloutStore

__all__ = ["ACTIONS", "REJECTED_TAG", "Rollout"]

log = logging.getLogger("manymodels.serve")

#: Operator actions (``manymodels endpoint rollout ACTION``, ``POST /admin/rollout/ACTION``).
ACTIONS = ("pause", "resume", "abort", "promote")
REJECTED_TAG = "manymodels.rollout"
Action = Literal["pause", "resume", "abort", "promote"]


class Rollout:
    """The rollouts of one followed alias on one endpoint (one replica's part).

    Parameters
    ----------
    endpoint
        The endpoint whose deployments the rollout changes.
    follow
        ``models:/NAME@ALIAS``.
    policy
        Steps and thresholds.
    metrics
        Where ``manymodels_rollout_step`` and the verdict counters go (``None``: nowhere).
    store
        The shared state (default: beside the registry, :class:`RolloutStore`).
    """

    def __init__(self, endpoint: Endpoint, follow: str, policy: RolloutPolicy,
                 metrics: Metrics | None = None, store: RolloutStore | None = None) -> None:
        model, version, alias = parse_models_uri(follow)
        if alias is None:
            raise EndpointConflict(f"--follow needs an alias URI models:/NAME@ALIAS, not "
                                   f"{follow} (a version never moves)")
        self.endpoint, self.policy, self.metrics = endpoint, policy, metrics
        self.model, self.alias, self.follow = model, alias, follow
        self.store = store or RolloutStore(model, alias)
        self.replica = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.record: RolloutRecord | None = None
        self.analysis: Analysis | None = None
        self.applied = -1
        self.paused = False
        self.stable: Deployment | None = None
        self.candidate: Deployment | None = None
        self._pairs: dict[str, Deployment] = {}
        self.compare_share = 0.0
        self.last_error: str | None = None
        self.polls = 0
        self._apply_lock: asyncio.Lock | None = None

    # -- the canary's comparisons (called by the mirror on the request path) -----------------
    def shadow_for(self, live: Deployment) -> Deployment | None:
        if self.analysis is None or self.paused:
            return None
        shadow = self._pairs.get(live.name)
        if shadow is None or random.random() >= self.compare_share:
            return None
        return shadow

    def watches(self, live: Deployment, shadow: Deployment) -> bool:
        return self.analysis is not None and self._pairs.get(live.name) is shadow

    def wants(self, path: str, reply: Any) -> bool:
        analysis = self.analysis
        if analysis is None:
            return False
        if reply is None:  # a failure: replay when the candidate failed, to see its models
            return self.candidate is not None and self.stable is not None \
                and self._pairs.get(self.candidate.name) is self.stable
        try:
            return analysis.touches(reply_models(reply))
        except (AttributeError, TypeError):
            return True

    def observe(self, path: str, live: Deployment, live_status: int, live_reply: Any,
                shadow_status: int, shadow_reply: Any, live_seconds: float,
                shadow_seconds: float) -> None:
        analysis = self.analysis
        if analysis is None:
            return
        if live is self.candidate:
            cand = (live_status, live_reply, live_seconds)
            base = (shadow_status, shadow_reply, shadow_seconds)
        else:
            cand = (shadow_status, shadow_reply, shadow_seconds)
            base = (live_status, live_reply, live_seconds)
        if base[0] != 200:
            return  # the live version refused it too: the request, not the candidate
        rows = reply_rows(path, base[1])
        analysis.observe(rows, reply_rows(path, cand[1]) if cand[0] == 200 else None,
                         cand[2], base[2])

    # -- the poll loop -----------------------------------------------------------------------
    async def run(self) -> None:
        """Poll until cancelled; a failed poll is logged and retried at the next one."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.policy.poll_seconds  # a fixed rate: a slow poll does not push the next
            try:
                await self.poll()
                self.last_error = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = one_line(exc)
                log.warning("rollout of %s: poll failed: %s", self.follow, self.last_error)
            delay = due - loop.time()
            if delay < 0:
                due, delay = loop.time(), 0.0
            await asyncio.sleep(delay)

    async def poll(self) -> RolloutRecord:
        """Read the alias and the shared state, publish this replica's counts, take the
        decisions that are due, and apply the state to the endpoint."""
        version = await asyncio.to_thread(self._alias_version)
        snapshot = self.analysis.as_json() if self.analysis is not None else None
        record = await asyncio.to_thread(self._tick, version, snapshot, self._live_version())
        await self.apply(record)
        self.polls += 1
        return record

    def _alias_version(self) -> str:
        return resolve_version(self.follow).version

    def _live_version(self) -> str | None:
        """The version of the followed model taking most live traffic here."""
        best: tuple[int, str] | None = None
        for name, deployment in self.endpoint.deployments.items():
            version = self._version_of(deployment)
            weight = self.endpoint.traffic.get(name, 0)
            if version is not None and (best is None or weight > best[0]):
                best = (weight, version)
        return best[1] if best else None

    def _version_of(self, deployment: Deployment) -> str | None:
        prefix = f"models:/{self.model}/"
        return deployment.source[len(prefix):] if deployment.source.startswith(prefix) \
            else None

    def _tick(self, alias_version: str, snapshot: dict[str, Any] | None,
              live_version: str | None) -> RolloutRecord:
        with self.store.locked():
            record = self.store.read()
            if record is None:
                record = RolloutRecord(model=self.model, alias=self.alias,
                                       stable=live_version or alias_version)
                self.store.log("following", record, replica=self.replica)
            if record.status == "running":
                if alias_version not in (record.candidate, record.target):
                    why = (f"the alias was moved back to version {alias_version} by hand"
                           if alias_version == record.stable else
                           f"superseded: the alias moved to version {alias_version}")
                    self._roll_back(record, why, move_alias=False)
                else:
                    if snapshot is not None and snapshot["generation"] == record.generation:
                        record.observations[self.replica] = snapshot
                    if not record.paused:
                        self._decide(record)
            if record.status != "running" and alias_version != record.stable \
                    and alias_version not in self._rejected(record):
                self._start(record, alias_version)
            self.store.write(record)
            return record

    @staticmethod
    def _rejected(record: RolloutRecord) -> set[str]:
        return set(record.rejected)

    # -- decisions (in a thread, under the state's lock) ----------------------------------------
    def _bundle(self, version: str) -> Any:
        return resolve_bundle(f"models:/{self.model}/{version}")

    def _bump(self, record: RolloutRecord) -> None:
        record.generation += 1
        record.observations = {}
        record.step_started_at = time.time()
        record.last_verdict = None

    def _start(self, record: RolloutRecord, version: str) -> None:
        changed = changed_models(read_manifest(self._bundle(record.stable)),
                                 read_manifest(self._bundle(version)))
        record.status, record.candidate, record.target = "running", version, version
        record.step, record.paused, record.reason = 0, False, None
        record.held_back, record.verdicts, record.changed = {}, [], changed
        record.started_at = time.time()
        self._bump(record)
        self.store.log("started", record, changed=len(changed), models=changed[:100])
        if not changed:
            self._promoted(record, "no model file changed: nothing to compare")

    def _decide(self, record: RolloutRecord) -> None:
        phase = self.policy.phase(record.step)
        requests, models = merge_observations(record.observations.values())
        verdict = judge(self.policy, phase, record.changed, requests, models,
                        time.time() - record.step_started_at, patient=record.step == 0)
        record.last_verdict = {"step": record.step, **verdict.as_json()}
        if self.metrics is not None:
            self.metrics.rollout_verdicts.labels(verdict.outcome).inc()
        if verdict.outcome == "wait":
            return
        record.verdicts.append({"step": record.step, "version": record.candidate,
                                **verdict.as_json()})
        self.store.log(f"step_{verdict.outcome}", record, requests=verdict.requests,
                       failing=verdict.failing, unobserved=verdict.unobserved)
        if verdict.outcome == "pass":
            if record.step >= len(self.policy.steps):
                self._promoted(record, "every step passed")
            else:
                record.step += 1
                self._bump(record)
            return
        keep = set(record.changed) - set(verdict.failing)
        stable = read_manifest(self._bundle(record.stable))
        if self.policy.on_failure == "hold_back" and keep \
                and all(name in stable.models for name in verdict.failing):
            self._hold_back(record, verdict.failing)
        else:
            why = "; ".join(f"{m}: {r}" for m, r in sorted(verdict.failing.items())[:5])
            self._roll_back(record, f"step {record.step} failed: {why}")

    def _hold_back(self, record: RolloutRecord, failing: dict[str, str]) -> None:
        assert record.candidate is not None
        registered = hold_back(self.model, record.candidate, self._bundle(record.candidate),
                               self._bundle(record.stable), failing,
                               self.store.directory / "bundles")
        reason = (f"rollout: version {record.target} minus {len(failing)} held-back "
                  f"model(s) ({', '.join(sorted(failing)[:5])})")
        promote(self.model, registered.version, self.alias, reason=reason)
        record.held_back.update(failing)
        record.candidate = registered.version
        record.changed = changed_models(read_manifest(self._bundle(record.stable)),
                                        read_manifest(self._bundle(registered.version)))
        self._bump(record)
        self.store.log("held_back", record, models=failing, version=registered.version)

    def _roll_back(self, record: RolloutRecord, reason: str, move_alias: bool = True) -> None:
        rejected = [v for v in {record.target, record.candidate} if v]
        if move_alias:
            promote(self.model, record.stable, self.alias,
                    reason=f"rollout of version {record.target} rolled back: {reason}")
        for version in rejected:
            set_version_tags(self.model, version, {REJECTED_TAG: "rejected",
                                                   f"{REJECTED_TAG}.reason": reason})
        record.rejected.update((v, reason) for v in rejected)
        record.status, record.reason, record.candidate = "rolled_back", reason, None
        record.step, record.paused = 0, False
        self._bump(record)
        self.store.log("rolled_back", record, reason=reason, rejected=rejected,
                       alias_moved_back=move_alias)

    def _promoted(self, record: RolloutRecord, reason: str) -> None:
        assert record.candidate is not None
        record.stable, record.candidate = record.candidate, None
        record.status, record.reason, record.paused = "promoted", reason, False
        self._bump(record)
        self.store.log("promoted", record, reason=reason, held_back=sorted(record.held_back))

    # -- operators -----------------------------------------------------------------------------
    async def command(self, action: Action, who: str) -> RolloutRecord:
        """Pause, resume, abort (roll back now) or promote (the candidate takes all live
        traffic now) the running rollout; applied here at once, elsewhere at the next poll."""
        record = await asyncio.to_thread(self._command, action, who)
        await self.apply(record)
        return record

    def _command(self, action: Action, who: str) -> RolloutRecord:
        with self.store.locked():
            record = self.store.read()
            if record is None or record.status != "running":
                raise EndpointConflict(f"no rollout of {self.follow} is running (status "
                                       f"{record.status if record else 'none'}); nothing to "
                                       f"{action}")
            if action in ("pause", "resume"):
                record.paused = action == "pause"
                self.store.log(f"{action}d", record, by_operator=who)
            elif action == "abort":
                self._roll_back(record, f"aborted by {who}")
            else:
                self._promoted(record, f"promoted by {who} at step {record.step}")
            self.store.write(record)
            return record

    def _refused(self, version: str, why: str) -> RolloutRecord:
        with self.store.locked():
            record = self.store.read()
            assert record is not None
            if record.status == "running" and record.candidate == version:
                self._roll_back(record, f"version {version} was refused: {why}")
                self.store.write(record)
            return record

    # -- applying the state to this endpoint -------------------------------------------------
    async def apply(self, record: RolloutRecord) -> None:
        """Make the endpoint match ``record``: the deployments, traffic and comparisons of
        its step (nothing to do when this replica applied its generation already)."""
        if self._apply_lock is None:
            self._apply_lock = asyncio.Lock()
        async with self._apply_lock:
            self.record, self.paused = record, record.paused
            if self.metrics is not None:
                self.metrics.rollout_step.set(record.step if record.status == "running" else -1)
            if record.generation == self.applied:
                return
            self.analysis = None  # no comparisons while the endpoint changes
            stable = await self._ensure(record.stable)
            if record.status == "running" and record.candidate is not None:
                try:
                    candidate = await self._ensure(record.candidate)
                except DeploymentRefused as exc:  # the candidate fails its checks: roll back
                    record = await asyncio.to_thread(self._refused, record.candidate,
                                                     exc.message)
                    self.record = record
                    await self._only({stable.name: 100})
                    self.stable, self.candidate, self._pairs = stable, None, {}
                    self.applied = record.generation
                    return
                percent = self.policy.candidate_percent(record.step)
                await self._only({stable.name: 100 - percent, candidate.name: percent})
                self.stable, self.candidate = stable, candidate
                if record.step == 0:
                    self._pairs = {stable.name: candidate}
                    self.compare_share = self.policy.mirror.percent / 100
                else:
                    self._pairs = {candidate.name: stable}
                    self.compare_share = min(1.0, self.policy.mirror.percent / percent)
                self.analysis = Analysis(record.changed, record.generation,
                                         self.policy.max_relative_diff)
            else:
                await self._only({stable.name: 100})
                self.stable, self.candidate, self._pairs = stable, None, {}
            self.applied = record.generation

    async def _ensure(self, version: str) -> Deployment:
        """The deployment serving ``version`` here, added (checked first) if missing."""
        for deployment in self.endpoint.deployments.values():
            if self._version_of(deployment) == version:
                return deployment
        name, n = f"v{version}", 1
        while name in self.endpoint.deployments:
            n += 1
            name = f"v{version}-{n}"
        return await self.endpoint.add(name, f"models:/{self.model}/{version}")

    async def _only(self, weights: dict[str, int]) -> None:
        """Set the traffic, then remove the followed model's other deployments."""
        if self.endpoint.mirror is not None and self.endpoint.mirror.deployment in weights:
            await self.endpoint.set_mirror(None, 0)
        await self.endpoint.set_traffic(weights)
        for name, deployment in list(self.endpoint.deployments.items()):
            if name not in weights and self._version_of(deployment) is not None:
                await self.endpoint.remove(name)

    def describe(self) -> dict[str, Any]:
        """The state, the current phase's verdict so far and the latest log events."""
        record = self.record
        state = record.model_dump(exclude={"observations"}) if record else None
        if state is not None and record is not None and record.status == "running":
            state["candidate_percent"] = self.policy.candidate_percent(record.step)
            state["steps"] = [0, *(s.percent for s in self.policy.steps)]
            state["replicas"] = sorted(record.observations)
        return {"follow": self.follow, "replica": self.replica, "state": state,
                "poll_seconds": self.policy.poll_seconds, "last_error": self.last_error,
                "log": self.store.events(last=20)}
