"""What a key-recovery attack is after, read from SEAL's key (the attack tests' oracle).

Shared by tests/test_guard.py, tests/test_trust_attacks.py and tests/test_trust_review.py:
the attacker never has these; the tests use them to score what an attack learned.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cipherface.crypto import seal
from cipherface.crypto.ckks import CkksEdgeCipher


def secret_coefficients(cipher: CkksEdgeCipher) -> np.ndarray[Any, Any]:
    """The ternary secret in coefficient form (centred, -1/0/1), from SEAL's key."""
    from tenseal import sealapi

    ctx = seal.context_for(cipher.params)
    sk = seal.load_into(sealapi.SecretKey(), cipher.keys._secret, ctx)
    raw = seal.parse_plaintext(seal.save_bytes(sk.data()), k=3, n=cipher.params.n)
    return cipher.ring.centred(cipher.ring.intt(raw[:1])[0], 0)


def shift_at(s: np.ndarray[Any, Any], k: int, j: int) -> int:
    """Coefficient ``k`` of ``X^j · s`` in Z[X]/(X^N + 1)."""
    n = len(s)
    return int(s[k - j]) if k >= j else -int(s[k - j + n])
