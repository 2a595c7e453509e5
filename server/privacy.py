"""Central (site-level) differential privacy at the server: Flower's DP strategy wrappers around the run's
strategy, and an honest account of the (ε, δ) they spend.

Modes (run config `central-dp`): `server-fixed` / `server-adaptive` clip each site's update at the server,
`client-fixed` / `client-adaptive` have each site clip its own (Flower's clipping mods, `client.clipping`),
so the server never holds an unclipped update. Each round Gaussian noise of standard deviation
z·C/m is added to the mean of the m sampled sites' clipped updates (z: `dp-noise-multiplier`, C: the
clipping norm, m: `dp-sampled-sites`), which must then be the plain mean: the sites are weighted equally
(`common.protocol.SITE_WEIGHT`), not by their exams.

The budget is computed by Opacus's RDP accountant, one Gaussian release per round, with:
- no amplification by sampling: Flower samples a fixed number of sites without replacement, which the
  accountant's Poisson analysis does not cover (Flower's own accounted mode makes the same choice);
- the round's real noise: when only n < m sampled sites reply, the noise was scaled for m, so the
  round counts as multiplier z·n/m;
- with adaptive clipping, the noisy count of clipped updates as a second release: Flower counts 0/1 bits,
  whose sensitivity is 1, so that release has multiplier `dp-clipped-count-stddev` (Flower's own split of
  z assumes centred bits, of sensitivity 1/2, and would understate ε); and Flower 1.41 scales the round's
  noise with the clipping norm it has just updated, not the one the updates were clipped to, so the update
  release counts as multiplier z_Δ · C_new / C_old.
ε is a guarantee only where the noise was calibrated to what is released: FedAvg's and FedProx's mean.
FedAdam and FedAvgM transform the noisy mean with state kept across rounds, and the robust strategies
(trimmed mean, median, Krum) are not means: with them the report states no ε.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.common import log
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from opacus.accountants import RDPAccountant

from common.config import Config
from common.protocol import ALL
from server.settings import Settings

WRAPPERS = {
    "server-fixed": DifferentialPrivacyServerSideFixedClipping,
    "client-fixed": DifferentialPrivacyClientSideFixedClipping,
    "server-adaptive": DifferentialPrivacyServerSideAdaptiveClipping,
    "client-adaptive": DifferentialPrivacyClientSideAdaptiveClipping,
}
"""Run-config `central-dp` → Flower's wrapper; `none` (the default) wraps nothing."""
ACCOUNTED = ("fedavg", "fedprox")
"""Strategies whose aggregate is the mean that the noise is calibrated to: ε is stated only for them."""


def wrap(strategy: Strategy, settings: Settings) -> Strategy:
    """The run's strategy in Flower's DP wrapper for `central-dp` (unchanged for `none`). What would void DP
    was refused with the settings (`server.settings`)."""
    s = settings
    if s.central_dp == "none":
        return strategy
    if s.central_dp.endswith("fixed"):
        return WRAPPERS[s.central_dp](strategy, s.dp_noise_multiplier, s.dp_clipping_norm, s.dp_sampled_sites)
    return WRAPPERS[s.central_dp](strategy, s.dp_noise_multiplier, s.dp_sampled_sites,
                                  initial_clipping_norm=s.dp_clipping_norm,
                                  clipped_count_stddev=s.dp_clipped_count_stddev or None)


@dataclasses.dataclass
class Ledger:
    """The central DP budget spent so far: one entry per aggregated round, kept in the round's metrics rows
    (so a resumed run rebuilds it from its checkpoint)."""

    mode: str
    strategy: str
    noise_multiplier: float
    sampled: int
    delta: float
    releases: list[tuple[float, float, int]] = dataclasses.field(default_factory=list)
    """Opacus RDPAccountant history: (noise multiplier, sampling rate, count) per release."""
    rounds: int = 0
    _clipped_to: float = 0.0
    """The clipping norm the round's updates are clipped to (adaptive clipping moves it)."""

    @classmethod
    def of(cls, settings: Settings) -> Ledger:
        return cls(settings.central_dp, settings.strategy, settings.dp_noise_multiplier,
                   settings.dp_sampled_sites, settings.dp_delta)

    @property
    def accounted(self) -> bool:
        return self.mode != "none" and self.strategy in ACCOUNTED

    def configured(self, server_round: int, sent: int, wrapper: Strategy) -> None:
        """Before the round's replies: the noise is scaled for `dp-sampled-sites`, so a round that samples
        another number is refused; note the clipping norm of the round."""
        self._clipped_to = float(getattr(wrapper, "clipping_norm", 0.0))
        if self.mode != "none" and sent != self.sampled:
            raise ValueError(f"round {server_round}: the strategy sampled {sent} sites but dp-sampled-sites "
                             f"is {self.sampled}: set it to the number sampled (fraction-train × connected "
                             "sites, at least min-nodes)")

    def release(self, server_round: int, replied: int, wrapper: Strategy) -> dict[str, Any]:
        """Account the round's release (`replied` sites aggregated); the row fields to record."""
        if self.mode == "none":
            return {}
        new = [(self.noise_multiplier * replied / self.sampled, 1.0, 1)]
        if self.mode.endswith("adaptive"):  # see the module docstring
            noise_to = wrapper.noise_multiplier * wrapper.clipping_norm / self._clipped_to
            new = [(noise_to * replied / self.sampled, 1.0, 1), (float(wrapper.clipped_count_stddev), 1.0, 1)]
        self.releases += new
        self.rounds += 1
        row = {"dp_releases": [list(r) for r in new], "dp_clipping_norm": float(wrapper.clipping_norm)}
        if self.accounted:
            row["epsilon"] = self.epsilon()
            log(INFO, "central DP after round %d: ε = %.3f at δ = %g (%d of %d sampled sites aggregated)",
                server_round, row["epsilon"], self.delta, replied, self.sampled)
        return row

    def epsilon(self) -> float:
        accountant = RDPAccountant()
        accountant.history = list(self.releases)
        return float(accountant.get_epsilon(self.delta)) if self.releases else 0.0

    def restore(self, rows: Iterable[Mapping[str, Any]], wrapper: Strategy) -> None:
        """Rebuild the account, and the adaptive clipping norm, from a checkpoint's metrics rows."""
        for row in rows:
            if "dp_releases" in row:
                self.releases += [tuple(r) for r in row["dp_releases"]]
                self.rounds += 1
                if self.mode.endswith("adaptive"):
                    wrapper.clipping_norm = row["dp_clipping_norm"]

    def summary(self) -> dict[str, Any]:
        """The report's `privacy.central` entry."""
        if self.mode == "none":
            return {"mode": "none"}
        summary = {"mode": self.mode, "noise_multiplier": self.noise_multiplier,
                   "sampled_sites": self.sampled, "delta": self.delta, "rounds": self.rounds,
                   "accountant": "Opacus RDP, no sampling amplification", "epsilon": None}
        if self.accounted:
            summary["epsilon"] = self.epsilon()
        else:
            summary["why_no_epsilon"] = (f"strategy {self.strategy}'s aggregate is not the mean the noise is "
                                         f"calibrated to; ε is stated for {' and '.join(ACCOUNTED)} only")
        return summary


def privacy_report(ledger: Ledger, rounds: Iterable[Mapping[str, Any]], config: Config) -> dict[str, Any]:
    """The report's `privacy` entry: central DP's account, and each site's last reported DP-SGD ε."""
    local: dict[str, Any] = {"dp_sgd": config.privacy.dp_sgd}
    if config.privacy.dp_sgd:
        p = config.privacy
        trained = [r for r in rounds
                   if r["phase"] == "train" and r.get("epsilon") is not None and r["site"] != ALL]
        local |= {"target_epsilon": p.target_epsilon or None, "noise_multiplier": p.noise_multiplier or None,
                  "max_grad_norm": p.max_grad_norm, "delta": p.delta,
                  "accountant": "Opacus RDP, Poisson sampling",
                  "sites": {r["site"]: {"epsilon": r["epsilon"], "last_round_trained": r["round"]}
                            for r in trained}}
    return {"central": ledger.summary(), "local": local}


def markdown(privacy: Mapping[str, Any]) -> list[str]:
    """The report's privacy section (docs/privacy.md says what each guarantee covers)."""
    central, local = privacy["central"], privacy["local"]
    lines = ["## Privacy", ""]
    if central["mode"] == "none":
        lines.append("Central differential privacy: off.")
    else:
        spent = (f"ε = {central['epsilon']:.3f} at δ = {central['delta']:g}" if central["epsilon"] is not None
                 else f"no ε stated ({central['why_no_epsilon']})")
        lines.append(f"Central (site-level) differential privacy, {central['mode']} clipping, noise "
                     f"multiplier {central['noise_multiplier']:g}, {central['sampled_sites']} sites sampled "
                     f"a round, {central['rounds']} rounds: {spent} ({central['accountant']}).")
    lines.append("")
    if not local["dp_sgd"]:
        lines.append("Local DP-SGD: off.")
    else:
        budget = f"budget ε = {local['target_epsilon']:g}" if local["target_epsilon"] else "no ε budget"
        lines += [f"Local DP-SGD at every site (per-exam clipping at {local['max_grad_norm']:g}, {budget}, "
                  f"δ = {local['delta']:g}, {local['accountant']}): ε spent as last reported by each site.",
                  "",
                  "| Site | ε spent | last round trained |", "|---|---|---|",
                  *(f"| {site} | {v['epsilon']:.3f} | {v['last_round_trained']} |"
                    for site, v in sorted(local["sites"].items()))]
    return [*lines, ""]
