"""A device's privacy policy: the floor the server's run config may raise but never lower.

fedq's run config comes from the server (``pyproject.toml``, ``--run-config``); a curious
server could set ``dp-enabled = false``, a tiny ``dp-noise-multiplier``, a huge
``dp-target-epsilon`` or ``dp-delta`` for a device that does not pin them in its node
config. The policy is what the device's owner pins instead, in the device's own node
config (``fedq-client --set privacy-...=...``):

============================== ========== ==============================================
key                            default    meaning
============================== ========== ==============================================
``privacy-dp-required``        false      train only with DP-SGD (``dp-enabled``); a finite
                                          max epsilon or a noise floor > 0 also needs DP
``privacy-min-noise-multiplier`` 0        the DP-SGD noise multiplier (given or derived
                                          from ``dp-planned-updates``) is at least this
``privacy-max-epsilon``        inf        lifetime epsilon cap: the device's budget is the
                                          smaller of this and ``dp-target-epsilon``
``privacy-max-delta``          1e-5       ``dp-delta`` of a DP device is at most this (an
                                          epsilon cap means nothing at a delta the server
                                          picks)
``privacy-release-metrics``    covered    ``all``, ``covered`` (a DP device withholds the
                                          metrics computed from its transitions) or
                                          ``minimal`` (counters and the ledger only)
``privacy-allow-personalize``  true       whether evaluate messages may fine-tune on the
                                          device's buffer (never on a DP device: refused)
``privacy-require-secagg``     false      answer a train message only through SecAgg+
                                          (:mod:`client.secure_aggregation`): the server
                                          gets this device's update only masked
============================== ========== ==============================================

The same keys in the run config can only tighten the node's policy: each setting of the
effective policy is the stricter of the two (:meth:`PrivacyPolicy.tightened`). A message
that asks for more than the effective policy allows gets a Flower error reply with code
:data:`PRIVACY_POLICY_ERROR_CODE` whose reason names the key; the device's state is not
touched. Bad policy values fail at device start (``fedq-client``) and in every handler
with a :class:`common.config.ConfigError` naming the key.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from fedq.common.config import (
    POLICY_PREFIX,
    ConfigError,
    ConfigScalar,
    FedqConfig,
    coerce,
    unknown_key,
)

PRIVACY_POLICY_ERROR_CODE = 1002
"""Error code of a reply refused by the device's privacy policy (budget declines: 1001)."""

RELEASE_LEVELS = ("all", "covered", "minimal")
"""``privacy-release-metrics`` values, loosest first."""


class PolicyRefusal(RuntimeError):
    """A message asks the device for more than its privacy policy allows."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """The effective privacy policy of a device (see the module docstring)."""

    dp_required: bool = False
    min_noise_multiplier: float = 0.0
    max_epsilon: float = math.inf
    max_delta: float = 1e-5
    release_metrics: str = "covered"
    allow_personalize: bool = True
    require_secagg: bool = False

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, ConfigScalar]) -> PrivacyPolicy:
        """The policy of the ``privacy-*`` keys of a node or run config (other keys are
        ignored); a wrong key, type or value raises :class:`ConfigError` naming it."""
        known = {_key(f.name): f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, raw in mapping.items():
            if not key.startswith(POLICY_PREFIX):
                continue
            if key not in known:
                raise unknown_key(key, known, "privacy policy key")
            values[known[key].name] = coerce(key, known[key].type, raw)
        policy = replace(cls(), **values)
        policy._validate()
        return policy

    def _validate(self) -> None:
        if math.isnan(self.min_noise_multiplier) or not (
                0.0 <= self.min_noise_multiplier < math.inf):
            raise ConfigError(_key("min_noise_multiplier"), "must be a finite number >= 0, "
                              f"got {self.min_noise_multiplier!r}")
        if math.isnan(self.max_epsilon) or self.max_epsilon <= 0:
            raise ConfigError(_key("max_epsilon"), "must be > 0 (inf: no cap); no run can "
                              f"train under {self.max_epsilon!r}")
        if not 0.0 < self.max_delta < 1.0:
            raise ConfigError(_key("max_delta"), "must be in (0, 1); no run can train "
                              f"under {self.max_delta!r}")
        if self.release_metrics not in RELEASE_LEVELS:
            raise ConfigError(_key("release_metrics"), f"one of {RELEASE_LEVELS}, got "
                              f"{self.release_metrics!r}")

    def tightened(self, other: PrivacyPolicy) -> PrivacyPolicy:
        """The stricter of this policy and ``other`` in every setting (a run config's
        policy keys can only add restrictions to the device's)."""
        return PrivacyPolicy(
            dp_required=self.dp_required or other.dp_required,
            min_noise_multiplier=max(self.min_noise_multiplier, other.min_noise_multiplier),
            max_epsilon=min(self.max_epsilon, other.max_epsilon),
            max_delta=min(self.max_delta, other.max_delta),
            release_metrics=RELEASE_LEVELS[max(RELEASE_LEVELS.index(self.release_metrics),
                                               RELEASE_LEVELS.index(other.release_metrics))],
            allow_personalize=self.allow_personalize and other.allow_personalize,
            require_secagg=self.require_secagg or other.require_secagg)

    def apply(self, config: FedqConfig) -> FedqConfig:
        """``config`` as the device may train with it: its budget capped at
        ``privacy-max-epsilon``. Raises :class:`PolicyRefusal` (naming the key) if the
        config asks for less privacy than the policy allows; the noise multiplier derived
        from ``dp-planned-updates`` is checked when it is derived
        (:class:`common.privacy.DevicePrivacy`)."""
        if not config.dp_enabled:
            if self._requiring_dp():
                raise PolicyRefusal("the run config sets dp-enabled = false but this "
                                    f"device's privacy policy has {self._requiring_dp()}")
            return config
        if not config.dp_planned_updates and (
                config.dp_noise_multiplier < self.min_noise_multiplier):
            raise PolicyRefusal(
                f"dp-noise-multiplier {config.dp_noise_multiplier:g} is below this device's "
                f"privacy-min-noise-multiplier {self.min_noise_multiplier:g}")
        if config.dp_delta > self.max_delta:
            raise PolicyRefusal(f"dp-delta {config.dp_delta:g} is above this device's "
                                f"privacy-max-delta {self.max_delta:g}")
        return replace(config, dp_target_epsilon=min(config.dp_target_epsilon,
                                                     self.max_epsilon))

    def _requiring_dp(self) -> str:
        """The setting that requires DP-SGD ("" if none): DP itself, or a bound that only
        DP can meet (training without DP makes the device's epsilon infinite)."""
        if self.dp_required:
            return "privacy-dp-required = true"
        if self.max_epsilon < math.inf:
            return f"privacy-max-epsilon = {self.max_epsilon:g}"
        if self.min_noise_multiplier > 0:
            return f"privacy-min-noise-multiplier = {self.min_noise_multiplier:g}"
        return ""

    def check_personalize(self, steps: int, private: bool) -> None:
        """Refuse an evaluate message's ``personalize-steps`` that the policy forbids:
        any on a ``private`` device (one that trains with DP, must, or ever did: the
        fine-tune's returns would be a release of its buffer that its ledger does not
        account), any where ``privacy-allow-personalize`` is false."""
        if steps <= 0:
            return
        if private:
            raise PolicyRefusal(
                f"personalize-steps {steps}: a DP device does not fine-tune on its private "
                "buffer for evaluation (its returns would be a release no epsilon in its "
                "ledger covers)")
        if not self.allow_personalize:
            raise PolicyRefusal(f"personalize-steps {steps}: this device's privacy policy "
                                "has privacy-allow-personalize = false")


def _key(name: str) -> str:
    return POLICY_PREFIX + name.replace("_", "-")
