"""Site keys across cloud workers sharing one PostgreSQL store (each its own --data,
as on separate hosts): a key published through one worker is every worker's.

Before, a worker kept the keys it had been sent in its own data directory only: a
worker on another host answered ``key_mismatch`` to every request under a key that
another worker had received (the edge republishes once and retries, and the retry
may land on yet another worker that lacks it); a worker that joined later had no
key at all; and ``rotate-key``'s last step (``key.retire``) was refused with
``key_in_use`` by any worker that had not itself received the new key.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import storekit
from test_rotate_cloud import Key, _ask, _code, _key, _publish
from vectors import unit

from cipherface.agents.cloud import CloudAgent
from cipherface.agents.mqtt import BrokerConfig
from cipherface.protocol import Delete, Enroll, KeyRetire, Result, Verify

pg_url = storekit.pg_url  # fixture: a PostgreSQL database of this session's own


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Key, Key]:
    base = tmp_path_factory.mktemp("fleetkeys")
    return _key(base / "old"), _key(base / "new")


def _worker(tmp_path: Path, pg_url: str) -> CloudAgent:
    data = tmp_path / f"w{secrets.token_hex(3)}"  # its own data directory: another host
    return CloudAgent(broker=BrokerConfig(url="mqtt://127.0.0.1:1"), data_dir=data, store=pg_url)


def _score(agent: CloudAgent, site: str, cipher: Any, ident: str, v: np.ndarray) -> Any:
    probe = cipher.encrypt_probe(v, op="verify")
    reply = _ask(agent, Verify(site=site, gw="gw", kid=cipher.key_id, identity=ident, probe=probe))
    if not isinstance(reply, Result):
        return reply
    return float(cipher.decrypt_scores(reply.scores, op="verify", count=1)[0])


def test_a_key_published_through_one_worker_serves_on_all(
    pg_url: str, tmp_path: Path, keys: tuple[Key, Key]
) -> None:
    (ocipher, _, _), (ncipher, _, _) = keys
    site, old, new = f"s{secrets.token_hex(3)}", ocipher.key_id, ncipher.key_id
    people = unit(np.random.default_rng(4), 3)
    w1, w2, w3 = (_worker(tmp_path, pg_url) for _ in range(3))
    try:
        _publish(w1, site, ocipher)  # only w1 hears the key
        enroll = Enroll(site=site, gw="gw", kid=old, ids=("a", "b", "c"),
                        payload=ocipher.encrypt_templates(people))  # fmt: skip
        assert isinstance(_ask(w1, enroll), Result)
        assert _score(w2, site, ocipher, "b", people[1]) == pytest.approx(1.0, abs=1e-3)
        deleted = _ask(w3, Delete(site=site, gw="gw", kid=old, ids=("c",)))
        assert isinstance(deleted, Result) and deleted.deleted == 1
        assert _code(_score(w1, site, ocipher, "c", people[2])) == "unknown_identity"
        assert w2.keys.kids(site) == [old] and w3.keys.current(site) == old

        # rotate-key: the new key reaches w1 only; the retire lands on w2.
        _publish(w1, site, ncipher)
        assert w2.keys.current(site) == new  # the last key published, whichever worker
        done = _ask(w2, KeyRetire(site=site, gw="gw", kid=old, successor=new))
        assert isinstance(done, Result) and done.deleted == 1  # before: key_in_use
        assert _code(_score(w3, site, ocipher, "a", people[0])) == "key_retired"
        late = _worker(tmp_path, pg_url)  # joins after the retire: never sees the old key
        assert late.keys.kids(site) == [new]
        assert _code(_score(late, site, ocipher, "a", people[0])) == "key_retired"
        late.keys.close()
    finally:
        for w in (w1, w2, w3):
            w.keys.close()


def test_a_key_swapped_in_the_database_is_refused(
    pg_url: str, tmp_path: Path, keys: tuple[Key, Key]
) -> None:
    """The database says which key a kid is, but the worker checks the bytes: a row
    holding another key is storage_corrupt, never a gallery served under it."""
    import psycopg

    (ocipher, _, _), (ncipher, _, _) = keys
    site = f"s{secrets.token_hex(3)}"
    w1, w2 = _worker(tmp_path, pg_url), _worker(tmp_path, pg_url)
    try:
        _publish(w1, site, ocipher)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE cf_keys SET public_key = %s WHERE name = %s",
                (ncipher.public_key_bytes(), f"{site}/{ocipher.key_id}"),
            )
        reply = _score(w2, site, ocipher, "a", unit(np.random.default_rng(5), 1)[0])
        assert _code(reply) == "storage_corrupt" and "another key" in reply.message
        assert not (w2.keys.key_dir(site, ocipher.key_id) / "public.key").exists()
    finally:
        w1.keys.close()
        w2.keys.close()
