"""The cloud's per-gateway query quotas (issue 8, item 4: the key holder's limits).

Bucket arithmetic on a test clock, then the real cloud agent (``CloudAgent.handle``,
real CKKS gallery) refusing with ``rate_limited`` while other gateways and identities
are served, and a retried request id costing nothing.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import numpy as np
import pytest
from vectors import unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.agents.quota import QuotaPolicy, Quotas
from cipherface.crypto.engine import EdgeCipher
from cipherface.errors import InvalidArgumentError, RateLimitedError
from cipherface.protocol import (
    Enroll,
    Error,
    Identify,
    KeyPublish,
    Result,
    Verify,
    decode,
    encode,
    request_topic,
)

DIM = 128


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _verify(gw: str = "gw1", who: str = "alice") -> Verify:
    return Verify(site="s1", gw=gw, kid="0" * 32, identity=who, probe=b"x")


def test_buckets_refill_at_the_hourly_rate() -> None:
    clock = _Clock()
    q = Quotas(policy=QuotaPolicy(verify_per_identity_per_hour=360, verify_burst=3), clock=clock)
    for _ in range(3):
        q.charge(_verify())
    with pytest.raises(RateLimitedError, match=r"next fits in 10 s") as err:
        q.charge(_verify())
    assert err.value.code == "rate_limited"
    q.charge(_verify(who="bob"))  # another identity: its own bucket
    q.charge(_verify(gw="gw2"))  # another gateway: its own bucket
    clock.t += 10.0  # 360 an hour: one token every 10 s
    q.charge(_verify())
    with pytest.raises(RateLimitedError):
        q.charge(_verify())
    clock.t += 3600.0  # refills to the burst, not beyond
    for _ in range(3):
        q.charge(_verify())
    with pytest.raises(RateLimitedError):
        q.charge(_verify())
    assert q.refused == 3


def test_identify_is_counted_per_gateway_and_zero_turns_a_limit_off() -> None:
    clock = _Clock()
    q = Quotas(policy=QuotaPolicy(identify_per_hour=60, identify_burst=2), clock=clock)
    ident = Identify(site="s1", gw="gw1", kid="0" * 32, probe=b"x")
    q.charge(ident)
    q.charge(ident)
    with pytest.raises(RateLimitedError, match="identify requests"):
        q.charge(ident)
    off = Quotas(policy=QuotaPolicy(identify_per_hour=0, verify_per_identity_per_hour=0))
    for _ in range(1000):
        off.charge(ident)
        off.charge(_verify())
    with pytest.raises(InvalidArgumentError):
        QuotaPolicy(verify_per_identity_per_hour=-1)
    with pytest.raises(InvalidArgumentError):
        QuotaPolicy(identify_per_hour=10, identify_burst=0)


def test_full_buckets_go_first_when_the_book_is_full() -> None:
    """A gateway cannot reset its own spent bucket by flooding the book with new keys:
    refilled buckets are dropped before any spent one."""
    clock = _Clock()
    q = Quotas(policy=QuotaPolicy(verify_per_identity_per_hour=120, verify_burst=2),
               clock=clock, max_buckets=100)  # fmt: skip
    target = ("verify", "s1", "gw1", "target")
    q.charge(_verify(who="target"))
    q.charge(_verify(who="target"))  # spent: 0 tokens, one back every 30 s
    for i in range(99):
        q.charge(_verify(who=f"filler{i}"))  # 1 token left each: not full
    clock.t += 31.0  # fillers full again (2), the target at 1.03
    q.charge(_verify(who="one-more"))  # 101 buckets: trim
    assert len(q._buckets) <= 100
    assert target in q._buckets  # kept: it carries state
    q.charge(_verify(who="target"))
    with pytest.raises(RateLimitedError):
        q.charge(_verify(who="target"))


def _reply(agent: CloudAgent, msg: object) -> Result | Error:
    [out] = agent.handle(request_topic(msg.site, msg.gw, msg.TYPE), encode(msg))  # type: ignore[attr-defined]
    reply = decode(out.payload)
    assert isinstance(reply, Result | Error), reply
    return reply


def test_cloud_refuses_over_quota_and_serves_the_others(tmp_path: Path, cipher: EdgeCipher) -> None:
    site = f"q{secrets.token_hex(3)}"
    agent = CloudAgent(
        broker=BrokerConfig(),
        data_dir=tmp_path / "cloud",
        sites=[site],
        quotas=QuotaPolicy(
            verify_per_identity_per_hour=360, verify_burst=3, identify_per_hour=60, identify_burst=2
        ),
    )
    kid = cipher.key_id
    people = unit(np.random.default_rng(3), 4)
    names = ["ann", "bob", "cy", "di"]
    assert isinstance(
        _reply(agent, KeyPublish(site=site, gw="gw0", kid=kid, scheme="ckks",
                                 public_key=cipher.public_key_bytes())), Result,
    )  # fmt: skip
    enroll = Enroll(site=site, gw="gw0", kid=kid, ids=tuple(names),
                    payload=cipher.encrypt_templates(people))  # fmt: skip
    assert isinstance(_reply(agent, enroll), Result)
    later = Enroll(site=site, gw="gw0", kid=kid, ids=("eve", "fay"),
                   payload=cipher.encrypt_templates(people[:2]))  # fmt: skip
    assert isinstance(_reply(agent, later), Result)  # a payload starts a pack: pack 1
    probe = cipher.encrypt_probe(people[0], op="verify")
    first = Verify(site=site, gw="gw1", kid=kid, identity="ann", probe=probe)
    assert isinstance(_reply(agent, first), Result)
    assert isinstance(_reply(agent, first), Result)  # the same request id again: free
    for _ in range(2):
        ok = _reply(agent, Verify(site=site, gw="gw1", kid=kid, identity="ann", probe=probe))
        assert isinstance(ok, Result)
    refused = _reply(agent, Verify(site=site, gw="gw1", kid=kid, identity="ann", probe=probe))
    assert isinstance(refused, Error) and refused.code == "rate_limited", refused
    assert not refused.retry and "/" not in refused.message.replace("an hour", "")
    # Another identity of the same pack: refused too (its result shows the same pack).
    sibling = _reply(agent, Verify(site=site, gw="gw1", kid=kid, identity="bob",
                                   probe=cipher.encrypt_probe(people[1], op="verify")))  # fmt: skip
    assert isinstance(sibling, Error) and sibling.code == "rate_limited", sibling
    # An identity of another pack, another gateway: served.
    other = _reply(agent, Verify(site=site, gw="gw1", kid=kid, identity="eve",
                                 probe=cipher.encrypt_probe(people[1], op="verify")))  # fmt: skip
    assert isinstance(other, Result)
    assert isinstance(
        _reply(agent, Verify(site=site, gw="gw2", kid=kid, identity="ann", probe=probe)), Result
    )
    iprobe = cipher.encrypt_probe(people[2], op="identify")
    for _ in range(2):
        assert isinstance(
            _reply(agent, Identify(site=site, gw="gw3", kid=kid, probe=iprobe)), Result
        )
    late = _reply(agent, Identify(site=site, gw="gw3", kid=kid, probe=iprobe))
    assert isinstance(late, Error) and late.code == "rate_limited"
    assert agent.quotas.refused == 3
