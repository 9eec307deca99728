"""Credentials for a CipherFace deployment: CA, certificates, broker accounts, ACL.

Everything is made here with the ``cryptography`` package (no shell openssl) and
written atomically; every secret (CA key, server and client keys, passwords,
the broker's password file) is mode 0600.

Account (broker username) scheme -- the ids are topic levels matching
``^[a-z0-9][a-z0-9_-]{0,62}$``, so the separators below never occur inside them
and no two schemes can produce the same username:

=================  ======================  ==========================================
role               username                may
=================  ======================  ==========================================
edge gateway       ``<site>.<gateway>``    publish ``<site>/req/<gateway>/#``,
                                           ``<site>/events/<gateway>``; read its
                                           ``res/<gateway>``, ``err/<gateway>``;
                                           read/write ``<site>/status/<gateway>``,
                                           ``<site>/health/<gateway>``;
                                           read ``cloud/status/+``
cloud worker       ``cloud-<name>``        read ``<s>/req/+/+`` and write
                                           ``<s>/res/+``, ``<s>/err/+`` for each site
                                           ``s`` it serves; read/write
                                           ``cloud/status/cloud-<name>`` and
                                           ``cloud/health/cloud-<name>`` (its agent id
                                           is its username). Never ``events``.
site integrator    ``<site>@<name>``       read ``<site>/events/+``, ``<site>/status/+``,
                                           ``<site>/health/+``, ``cloud/status/+``,
                                           ``cloud/health/+``
broker healthcheck ``cipherface-health``   nothing (it only proves the broker answers)
=================  ======================  ==========================================

(topics abbreviated: each starts with ``cipherface/v1/``). Nothing else is allowed:
no ``#``, no ``$SYS``, no other site. The broker runs with
``use_username_as_clientid``, so each account holds one connection at a time.

Directory layout made by :class:`Deployment` (``cipherface creds``)::

    DIR/state.json                 accounts and hostnames (no secrets)
    DIR/ca.crt                     the CA certificate, for every client
    DIR/ca/ca.key                  CA private key (0600; keep it offline)
    DIR/broker/                    mounted into the broker at /mosquitto/secrets
        ca.crt server.crt server.key(0600) passwd(0600) acl(0600) health.password(0600)
    DIR/broker-data/               the broker's persistence (0700)
    DIR/accounts/<username>/       one per account
        password(0600) agent.env(0600) client.crt client.key(0600) ca.crt
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cipherface.agents.broker import BrokerFiles
from cipherface.crypto.keyfile import write_atomic
from cipherface.errors import InvalidArgumentError, LocalError
from cipherface.protocol.topics import PREFIX, validate_id

#: Environment variables the agents read (docker-compose.yml sets exactly these).
ENV_VARS: Final = (
    "CIPHERFACE_BROKER",
    "CIPHERFACE_USERNAME",
    "CIPHERFACE_PASSWORD",
    "CIPHERFACE_CA",
    "CIPHERFACE_KEYS",
    "CIPHERFACE_DATA",
    "CIPHERFACE_SITE",
    "CIPHERFACE_GATEWAY",
    "CIPHERFACE_METRICS_PORT",
    "CIPHERFACE_LOG_FORMAT",
    "CIPHERFACE_HOME",
)
#: What each of :data:`ENV_VARS` means.
ENV_HELP: Final[Mapping[str, str]] = {
    "CIPHERFACE_BROKER": "broker URL: mqtts://host:8883 (mqtt://127.0.0.1:1883 on the broker host)",
    "CIPHERFACE_USERNAME": "broker account (<site>.<gateway> or cloud-<name>)",
    "CIPHERFACE_PASSWORD": "its password (DIR/accounts/<username>/password)",
    "CIPHERFACE_CA": "CA certificate that signed the broker's certificate (DIR/ca.crt)",
    "CIPHERFACE_KEYS": "directory of the HE key files",
    "CIPHERFACE_DATA": "data directory (the cloud's encrypted galleries, the edge's state)",
    "CIPHERFACE_SITE": "site id (edge)",
    "CIPHERFACE_GATEWAY": "gateway id (edge)",
    "CIPHERFACE_METRICS_PORT": "serve Prometheus /metrics and /healthz on this port "
    "(docs/operations.md)",
    "CIPHERFACE_LOG_FORMAT": "text or json",
    "CIPHERFACE_HOME": "edge cache root: face model weights and photos (~/.cache/cipherface)",
}

HEALTH_USERNAME: Final = "cipherface-health"
CLOUD_PREFIX: Final = "cloud-"
INTEGRATOR_SEPARATOR: Final = "@"
GATEWAY_SEPARATOR: Final = "."
#: PBKDF2 rounds of the broker's password hashes. The passwords are 256-bit
#: random strings, so rounds add nothing against guessing; they do cost broker
#: CPU on every connect (a reconnect storm of thousands of gateways), hence modest.
PASSWORD_ITERATIONS: Final = 1000
RELOAD_HINT: Final = "reload the broker: docker compose kill -s HUP mosquitto"

Role = Literal["gateway", "cloud", "integrator", "health"]
Access = Literal["read", "write", "readwrite"]


# ------------------------------------------------------------------------ accounts
def gateway_username(site: str, gateway: str) -> str:
    """Broker username of an edge gateway: ``<site>.<gateway>``.

    Raises:
        InvalidArgumentError: a bad or reserved id.
    """
    return (
        f"{validate_id(site, what='site')}{GATEWAY_SEPARATOR}{validate_id(gateway, what='gateway')}"
    )


def cloud_username(name: str) -> str:
    """Broker username of a cloud worker: ``cloud-<name>`` (also its agent id).

    Raises:
        InvalidArgumentError: a bad id, or a name that already starts with ``cloud-``.
    """
    validate_id(name, what="cloud worker name")
    if name.startswith(CLOUD_PREFIX):
        raise InvalidArgumentError(f"give the worker name without the prefix: {name[6:]!r}")
    # The username is the cloud's agent id in cloud/status/<agent_id>: one topic level.
    return validate_id(CLOUD_PREFIX + name, what="cloud agent id")


def integrator_username(site: str, name: str = "integrator") -> str:
    """Broker username of a site integrator: ``<site>@<name>``.

    Raises:
        InvalidArgumentError: a bad or reserved id.
    """
    site = validate_id(site, what="site")
    return f"{site}{INTEGRATOR_SEPARATOR}{validate_id(name, what='integrator name')}"


@dataclass(frozen=True, kw_only=True)
class AclRule:
    """One ``topic <access> <topic>`` line of a Mosquitto ACL file.

    Args:
        access: ``read``, ``write`` or ``readwrite``.
        topic: topic filter (``+`` and ``#`` allowed).
    """

    access: Access
    topic: str


@dataclass(frozen=True, kw_only=True)
class Account:
    """A broker account and its role.

    Args:
        username: the broker username (see the module docstring for the scheme).
        role: ``gateway``, ``cloud``, ``integrator`` or ``health``.
        site: the site (gateway and integrator).
        gateway: the gateway id (gateway).
        sites: the sites a cloud worker serves (sorted).
    """

    username: str
    role: Role
    site: str | None = None
    gateway: str | None = None
    sites: tuple[str, ...] = ()

    @classmethod
    def for_gateway(cls, site: str, gateway: str) -> Account:
        """The account of edge gateway ``gateway`` of ``site``."""
        return cls(
            username=gateway_username(site, gateway), role="gateway", site=site, gateway=gateway
        )

    @classmethod
    def for_cloud(cls, name: str, sites: Iterable[str]) -> Account:
        """The account of cloud worker ``name`` serving ``sites``."""
        served = tuple(sorted({validate_id(s, what="site") for s in sites}))
        return cls(username=cloud_username(name), role="cloud", sites=served)

    @classmethod
    def for_integrator(cls, site: str, name: str = "integrator") -> Account:
        """The account of an integrator reading the decisions of ``site``."""
        return cls(username=integrator_username(site, name), role="integrator", site=site)

    @classmethod
    def for_health(cls) -> Account:
        """The broker healthcheck's account (no topic at all)."""
        return cls(username=HEALTH_USERNAME, role="health")

    def acl_rules(self) -> tuple[AclRule, ...]:
        """The topics this account may use; everything else is denied."""
        if self.role == "gateway":
            assert self.site is not None and self.gateway is not None
            base = f"{PREFIX}/{self.site}"
            gw = self.gateway
            return (
                AclRule(access="write", topic=f"{base}/req/{gw}/#"),
                AclRule(access="read", topic=f"{base}/res/{gw}"),
                AclRule(access="read", topic=f"{base}/err/{gw}"),
                AclRule(access="write", topic=f"{base}/events/{gw}"),
                # Camera gateways' integrator JSON (docs/integrations.md).
                AclRule(access="write", topic=f"{base}/json/{gw}/#"),
                AclRule(access="readwrite", topic=f"{base}/status/{gw}"),
                AclRule(access="readwrite", topic=f"{base}/health/{gw}"),
                AclRule(access="read", topic=f"{PREFIX}/cloud/status/+"),
            )
        if self.role == "cloud":
            rules: list[AclRule] = []
            for site in self.sites:
                base = f"{PREFIX}/{site}"
                rules += [
                    AclRule(access="read", topic=f"{base}/req/+/+"),
                    AclRule(access="write", topic=f"{base}/res/+"),
                    AclRule(access="write", topic=f"{base}/err/+"),
                ]
            rules.append(
                AclRule(access="readwrite", topic=f"{PREFIX}/cloud/status/{self.username}")
            )
            rules.append(
                AclRule(access="readwrite", topic=f"{PREFIX}/cloud/health/{self.username}")
            )
            return tuple(rules)
        if self.role == "integrator":
            assert self.site is not None
            return (
                AclRule(access="read", topic=f"{PREFIX}/{self.site}/events/+"),
                AclRule(access="read", topic=f"{PREFIX}/{self.site}/json/#"),
                AclRule(access="read", topic=f"{PREFIX}/{self.site}/status/+"),
                AclRule(access="read", topic=f"{PREFIX}/{self.site}/health/+"),
                # Whether a cloud worker is up, and its load (JSON): no site data.
                AclRule(access="read", topic=f"{PREFIX}/cloud/status/+"),
                AclRule(access="read", topic=f"{PREFIX}/cloud/health/+"),
            )
        return ()

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (state.json, ``--json`` output)."""
        out: dict[str, Any] = {"username": self.username, "role": self.role}
        if self.site is not None:
            out["site"] = self.site
        if self.gateway is not None:
            out["gateway"] = self.gateway
        if self.role == "cloud":
            out["sites"] = list(self.sites)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Account:
        """Rebuild (and re-validate) an account from :meth:`to_json` data.

        Raises:
            LocalError: malformed data.
        """
        if not isinstance(obj, dict):
            raise LocalError(f"bad account entry in state.json: {obj!r:.80}")
        role = obj.get("role")
        try:
            if role == "gateway":
                acct = cls.for_gateway(obj["site"], obj["gateway"])
            elif role == "cloud":
                name = str(obj["username"]).removeprefix(CLOUD_PREFIX)
                acct = cls.for_cloud(name, obj.get("sites", []))
            elif role == "integrator":
                site, _, name = str(obj["username"]).partition(INTEGRATOR_SEPARATOR)
                acct = cls.for_integrator(obj["site"], name)
                if site != acct.site:
                    raise InvalidArgumentError("integrator username does not match its site")
            elif role == "health":
                acct = cls.for_health()
            else:
                raise InvalidArgumentError(f"unknown role {role!r}")
        except (KeyError, TypeError, InvalidArgumentError) as exc:
            raise LocalError(f"bad account entry in state.json {obj!r:.120}: {exc}") from exc
        if acct.username != obj.get("username"):
            raise LocalError(f"account {obj.get('username')!r} does not match its role fields")
        return acct


def render_acl(accounts: Iterable[Account]) -> str:
    """Render a Mosquitto ACL file: one ``user`` block per account, nothing global.

    No ``pattern`` lines (they would also apply to every other user) and no lines
    before the first ``user`` (those apply to anonymous clients).

    Args:
        accounts: the accounts.

    Returns:
        The ACL file text (deterministic: sorted by username).
    """
    lines = [
        "# Generated by `cipherface creds` -- do not edit; rerun the tool instead.",
        "# Default deny: a topic not listed for a user is neither readable nor writable.",
    ]
    for acct in sorted(accounts, key=lambda a: a.username):
        lines += ["", f"# {acct.role}", f"user {acct.username}"]
        lines += [f"topic {rule.access} {rule.topic}" for rule in acct.acl_rules()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------- passwords
def generate_password() -> str:
    """A new random password: 256 bits from ``secrets``, URL-safe (43 chars)."""
    return secrets.token_urlsafe(32)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(
    password: str, *, iterations: int = PASSWORD_ITERATIONS, salt: bytes | None = None
) -> str:
    """Hash a password the way Mosquitto 2 stores it (``mosquitto_passwd`` default).

    The format is ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``
    with a 12-byte salt and a 64-byte derived key.

    Args:
        password: the clear password (UTF-8).
        iterations: PBKDF2 rounds.
        salt: 12 random bytes (default: fresh from ``secrets``).

    Returns:
        The encoded hash, to follow ``username:`` in the password file.

    Raises:
        InvalidArgumentError: empty password, bad iteration count or salt.
    """
    if not password:
        raise InvalidArgumentError("empty password")
    if not 1 <= iterations <= 10_000_000:
        raise InvalidArgumentError(f"iterations out of range: {iterations}")
    salt = secrets.token_bytes(12) if salt is None else salt
    if len(salt) < 8:
        raise InvalidArgumentError("salt too short")
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(dk)}"


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a Mosquitto ``$7$`` hash (constant-time compare).

    Args:
        password: the clear password.
        encoded: ``$7$<iterations>$<salt>$<hash>``.

    Returns:
        Whether they match.

    Raises:
        InvalidArgumentError: not a ``$7$`` hash.
    """
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise InvalidArgumentError("not a Mosquitto $7$ (PBKDF2-SHA512) hash")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError as exc:
        raise InvalidArgumentError(f"malformed $7$ hash: {exc}") from exc
    if not 1 <= iterations <= 10_000_000:
        raise InvalidArgumentError(f"iterations out of range: {iterations}")
    dk = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(dk, expected)


def parse_password_file(text: str) -> dict[str, str]:
    """Read ``username:hash`` lines (blank lines and ``#`` comments skipped)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if sep:
            out[user] = encoded.strip()
    return out


def render_password_file(hashes_by_user: Mapping[str, str]) -> str:
    """Write ``username:hash`` lines, sorted.

    Raises:
        InvalidArgumentError: a username with ``:`` or a line break, or an empty one.
    """
    lines = []
    for user in sorted(hashes_by_user):
        if not user or any(c in user for c in ":\r\n"):
            raise InvalidArgumentError(f"username {user!r} cannot go in a password file")
        lines.append(f"{user}:{hashes_by_user[user]}")
    return "\n".join(lines) + ("\n" if lines else "")


# ----------------------------------------------------------------------------- PKI
@dataclass(frozen=True, kw_only=True)
class CertKey:
    """A certificate and its private key, both PEM.

    Args:
        cert_pem: the certificate.
        key_pem: the unencrypted PKCS#8 private key (a secret: store it 0600).
    """

    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """The parsed private key.

        Raises:
            LocalError: not an EC private key.
        """
        key = serialization.load_pem_private_key(self.key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise LocalError("expected an EC private key")
        return key


def _new_key() -> ec.EllipticCurvePrivateKey:
    # P-256: what every TLS stack (OpenSSL in Mosquitto, Python ssl, embedded clients)
    # accepts; 128-bit security.
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),  # Mosquitto cannot prompt for a passphrase
    )


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if days < 1:
        raise InvalidArgumentError(f"validity must be at least one day, got {days}")
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)  # 5 min of clock skew


def create_ca(*, common_name: str = "CipherFace development CA", days: int = 3650) -> CertKey:
    """Create a self-signed CA that can only sign end-entity certificates.

    Args:
        common_name: the CA's subject CN.
        days: validity.

    Returns:
        The CA certificate and key.
    """
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKey(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def _leaf(
    ca: CertKey,
    *,
    common_name: str,
    san: Sequence[x509.GeneralName],
    usage: x509.ObjectIdentifier,
    days: int,
) -> CertKey:
    ca_cert = ca.certificate
    ca_key = ca.private_key()
    key = _new_key()
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(san)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return CertKey(cert_pem=cert.public_bytes(serialization.Encoding.PEM), key_pem=_key_pem(key))


def server_names(hostnames: Iterable[str] = ()) -> list[x509.GeneralName]:
    """Subject alternative names of the broker: localhost, 127.0.0.1, ::1 and ``hostnames``.

    Raises:
        InvalidArgumentError: a hostname that is neither an IP nor a DNS name.
    """
    dns: list[str] = ["localhost"]
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    for raw in hostnames:
        host = raw.strip().lower()
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            labels = host.rstrip(".").split(".")
            if not host or not all(
                label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
                for label in labels
            ):
                raise InvalidArgumentError(f"not a DNS name or IP address: {raw!r}") from None
            if host not in dns:
                dns.append(host)
        else:
            if ip not in ips:
                ips.append(ip)
    return [x509.DNSName(d) for d in dns] + [x509.IPAddress(i) for i in ips]


def issue_server_cert(ca: CertKey, *, hostnames: Sequence[str] = (), days: int = 397) -> CertKey:
    """Issue the broker's TLS certificate.

    Args:
        ca: the signing CA.
        hostnames: names and addresses clients use (besides localhost/127.0.0.1/::1).
        days: validity (capped by the CA's).

    Returns:
        The certificate and key.

    Raises:
        InvalidArgumentError: a bad hostname.
    """
    cn = hostnames[0] if hostnames else "localhost"
    return _leaf(
        ca,
        common_name=cn,
        san=server_names(hostnames),
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        days=days,
    )


def issue_client_cert(ca: CertKey, *, username: str, days: int = 397) -> CertKey:
    """Issue a client certificate whose CN is the broker username (for mutual TLS).

    Args:
        ca: the signing CA.
        username: the account.
        days: validity (capped by the CA's).

    Returns:
        The certificate and key.
    """
    return _leaf(ca, common_name=username, san=(), usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=days)


# ---------------------------------------------------------------- deployment dir
@dataclass(frozen=True, kw_only=True)
class AccountFiles:
    """Where one account's credentials are.

    Args:
        directory: ``DIR/accounts/<username>``.
    """

    directory: Path

    @property
    def password(self) -> Path:
        """The clear password (0600)."""
        return self.directory / "password"

    @property
    def env(self) -> Path:
        """``KEY=VALUE`` file for ``docker compose`` ``env_file`` (0600, holds the password)."""
        return self.directory / "agent.env"

    @property
    def cert(self) -> Path:
        """Client certificate (for mutual TLS)."""
        return self.directory / "client.crt"

    @property
    def key(self) -> Path:
        """Client private key (0600)."""
        return self.directory / "client.key"

    @property
    def ca(self) -> Path:
        """Copy of the CA certificate."""
        return self.directory / "ca.crt"

    def to_json(self) -> dict[str, str]:
        """Paths as strings."""
        return {
            "dir": str(self.directory),
            "password": str(self.password),
            "env": str(self.env),
            "cert": str(self.cert),
            "key": str(self.key),
            "ca": str(self.ca),
        }


class Deployment:
    """A credentials directory: CA, broker files, accounts (``cipherface creds``).

    Open an existing one with :meth:`open`, make a new one with :meth:`init`.
    Every change rewrites the broker's ``passwd`` and ``acl``; reload the broker
    afterwards (SIGHUP).

    Args:
        directory: the credentials directory.

    Raises:
        LocalError: it is not an initialised credentials directory.
    """

    STATE_VERSION: Final = 1

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        state_path = self.directory / "state.json"
        try:
            state = json.loads(state_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LocalError(
                f"{self.directory} is not a credentials directory; "
                f"create it with 'cipherface creds init --dir {self.directory}'"
            ) from None
        except (OSError, ValueError) as exc:
            raise LocalError(f"cannot read {state_path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != self.STATE_VERSION:
            raise LocalError(f"{state_path}: unknown format")
        self.hostnames: tuple[str, ...] = tuple(str(h) for h in state.get("hostnames", []))
        owner = state.get("broker_owner")
        self.broker_owner: tuple[int, int] | None = (
            (int(owner[0]), int(owner[1])) if isinstance(owner, list) and len(owner) == 2 else None
        )
        self._accounts: dict[str, Account] = {}
        for entry in state.get("accounts", []):
            acct = Account.from_json(entry)
            self._accounts[acct.username] = acct

    # ------------------------------------------------------------------ paths
    @property
    def ca_cert_path(self) -> Path:
        """The CA certificate every client trusts (``CIPHERFACE_CA``)."""
        return self.directory / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        """The CA private key (0600)."""
        return self.directory / "ca" / "ca.key"

    @property
    def broker_dir(self) -> Path:
        """What the broker mounts at ``/mosquitto/secrets``."""
        return self.directory / "broker"

    @property
    def broker_data_dir(self) -> Path:
        """The broker's persistence directory (``/mosquitto/data``)."""
        return self.directory / "broker-data"

    @property
    def broker_files(self) -> BrokerFiles:
        """The broker's password, ACL and TLS files (for :class:`LocalBroker`)."""
        b = self.broker_dir
        return BrokerFiles(
            password_file=b / "passwd",
            acl_file=b / "acl",
            cafile=b / "ca.crt",
            certfile=b / "server.crt",
            keyfile=b / "server.key",
        )

    @property
    def health_password_path(self) -> Path:
        """The healthcheck account's password, inside the broker directory."""
        return self.broker_dir / "health.password"

    def account_files(self, username: str) -> AccountFiles:
        """Where ``username``'s credentials are."""
        return AccountFiles(directory=self.directory / "accounts" / username)

    @property
    def accounts(self) -> tuple[Account, ...]:
        """Every account, sorted by username."""
        return tuple(self._accounts[u] for u in sorted(self._accounts))

    def account(self, username: str) -> Account:
        """One account.

        Raises:
            InvalidArgumentError: no such account.
        """
        try:
            return self._accounts[username]
        except KeyError:
            raise InvalidArgumentError(f"no account {username!r} in {self.directory}") from None

    def password(self, username: str) -> str:
        """Read ``username``'s password.

        Raises:
            InvalidArgumentError: no such account.
            LocalError: the password file is unreadable.
        """
        self.account(username)
        path = self.account_files(username).password
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LocalError(f"cannot read {path}: {exc}") from exc

    # ----------------------------------------------------------- constructors
    @classmethod
    def init(
        cls,
        directory: str | os.PathLike[str],
        *,
        hostnames: Sequence[str] = (),
        broker_owner: tuple[int, int] | None = None,
        force: bool = False,
    ) -> Deployment:
        """Create a credentials directory: CA, broker certificate, healthcheck account.

        Args:
            directory: where (created if missing).
            hostnames: names clients reach the broker by (e.g. ``mosquitto`` in
                docker-compose, the host's DNS name); localhost/127.0.0.1 always.
            broker_owner: ``(uid, gid)`` to give the broker's files to (needs root),
                for a broker that runs as another user (the image's uid 1883).
            force: overwrite an existing directory's CA (every certificate and
                password must then be redistributed).

        Returns:
            The new deployment.

        Raises:
            LocalError: already initialised (without ``force``), or not writable.
            InvalidArgumentError: a bad hostname.
        """
        root = Path(directory)
        if (root / "state.json").exists() and not force:
            raise LocalError(f"{root} is already initialised (use --force to start over)")
        server_names(hostnames)  # validate before writing anything
        root.mkdir(parents=True, exist_ok=True)
        for sub in ("ca", "broker", "broker-data", "accounts"):
            (root / sub).mkdir(mode=0o700, exist_ok=True)
        ca = create_ca()
        write_atomic(root / "ca" / "ca.key", ca.key_pem, mode=0o600)
        write_atomic(root / "ca" / "ca.crt", ca.cert_pem, mode=0o644)
        write_atomic(root / "ca.crt", ca.cert_pem, mode=0o644)
        state = {
            "version": cls.STATE_VERSION,
            "hostnames": list(hostnames),
            "broker_owner": list(broker_owner) if broker_owner else None,
            "accounts": [],
        }
        write_atomic(root / "state.json", _json_bytes(state), mode=0o644)
        dep = cls(root)
        with dep._locked():
            dep._write_server_cert(ca)
            health = Account.for_health()
            password = generate_password()
            write_atomic(dep.health_password_path, password.encode() + b"\n", mode=0o600)
            dep._accounts = {health.username: health}
            dep._sync({health.username: hash_password(password)})
        return dep

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> Deployment:
        """Open an initialised credentials directory.

        Raises:
            LocalError: not initialised or unreadable.
        """
        return cls(directory)

    # --------------------------------------------------------------- changes
    def add_site(
        self, site: str, *, gateways: Sequence[str], integrator: str | None = None
    ) -> list[Account]:
        """Create accounts for new gateways of ``site`` (and optionally an integrator).

        Existing accounts are left as they are (use :meth:`rotate` for new secrets).

        Args:
            site: the site id.
            gateways: gateway ids.
            integrator: name of an integrator account to create (e.g. ``"integrator"``).

        Returns:
            The accounts created now.

        Raises:
            InvalidArgumentError: a bad or reserved id.
        """
        new = [Account.for_gateway(site, gw) for gw in gateways]
        if integrator is not None:
            new.append(Account.for_integrator(site, integrator))
        return self._add([a for a in new if a.username not in self._accounts])

    def add_cloud(self, name: str, *, sites: Sequence[str]) -> Account:
        """Create cloud worker ``cloud-<name>`` serving ``sites``, or extend its sites.

        Args:
            name: worker name (its username and agent id is ``cloud-<name>``).
            sites: site ids it serves (added to those it already serves).

        Returns:
            The account.

        Raises:
            InvalidArgumentError: a bad id, or no site.
        """
        if not sites:
            raise InvalidArgumentError("a cloud worker must serve at least one site")
        acct = Account.for_cloud(name, sites)
        old = self._accounts.get(acct.username)
        if old is None:
            self._add([acct])
            return acct
        merged = replace(old, sites=tuple(sorted(set(old.sites) | set(acct.sites))))
        with self._locked():
            self._accounts[merged.username] = merged
            self._sync({})
        return merged

    def mismatched_clouds(self, username: str) -> list[str]:
        """Cloud workers that serve other sites than ``username`` does.

        Mosquitto hands a shared-subscription message to the next member of the
        group and only then checks that member's ACL: a worker that does not serve
        the site drops the request. Workers that serve different sites need
        different share groups (the cloud agent's ``share_group``).

        Returns:
            Their usernames (empty when every cloud worker serves the same sites).
        """
        sites = self.account(username).sites
        return [
            a.username
            for a in self.accounts
            if a.role == "cloud" and a.username != username and a.sites != sites
        ]

    def rotate(self, username: str) -> Account:
        """Give an account a new password and client certificate (old ones stop working
        once the broker reloads).

        Raises:
            InvalidArgumentError: no such account.
        """
        acct = self.account(username)
        with self._locked():
            if acct.role == "health":
                password = generate_password()
                write_atomic(self.health_password_path, password.encode() + b"\n", mode=0o600)
                self._sync({username: hash_password(password)})
            else:
                self._sync({username: self._issue(acct)})
        return acct

    def remove(self, username: str) -> None:
        """Delete an account: password, ACL rules and its credential files.

        Raises:
            InvalidArgumentError: no such account, or the healthcheck account.
        """
        acct = self.account(username)
        if acct.role == "health":
            raise InvalidArgumentError("the healthcheck account cannot be removed")
        with self._locked():
            del self._accounts[username]
            self._sync({})
            files = self.account_files(username)
            for path in (files.password, files.env, files.key, files.cert, files.ca):
                path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                files.directory.rmdir()

    def renew_server_cert(self, hostnames: Sequence[str] | None = None) -> None:
        """Issue a new broker certificate (same CA), optionally for other hostnames.

        Raises:
            InvalidArgumentError: a bad hostname.
            LocalError: the CA key is not here (kept offline).
        """
        with self._locked():
            if hostnames is not None:
                server_names(hostnames)
                self.hostnames = tuple(hostnames)
            self._write_server_cert(self._load_ca())
            self._save_state()

    # -------------------------------------------------------------- internals
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Two `creds` commands at once would lose each other's accounts.
        fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _load_ca(self) -> CertKey:
        try:
            return CertKey(
                cert_pem=(self.directory / "ca" / "ca.crt").read_bytes(),
                key_pem=self.ca_key_path.read_bytes(),
            )
        except OSError as exc:
            raise LocalError(
                f"the CA key is needed to issue certificates: {exc} "
                "(put ca/ca.key back from where you keep it offline)"
            ) from exc

    def _write_server_cert(self, ca: CertKey) -> None:
        server = issue_server_cert(ca, hostnames=self.hostnames)
        self._write_broker(self.broker_dir / "server.key", server.key_pem, 0o600)
        self._write_broker(self.broker_dir / "server.crt", server.cert_pem, 0o644)
        self._write_broker(self.broker_dir / "ca.crt", ca.cert_pem, 0o644)

    def _write_broker(self, path: Path, data: bytes, mode: int) -> None:
        write_atomic(path, data, mode=mode)
        if self.broker_owner is not None:
            os.chown(path, *self.broker_owner)

    def _issue(self, acct: Account) -> str:
        """Write a new password, env file and client certificate; return the hash."""
        ca = self._load_ca()
        files = self.account_files(acct.username)
        files.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        password = generate_password()
        client = issue_client_cert(ca, username=acct.username)
        write_atomic(files.password, password.encode() + b"\n", mode=0o600)
        write_atomic(files.key, client.key_pem, mode=0o600)
        write_atomic(files.cert, client.cert_pem, mode=0o644)
        write_atomic(files.ca, ca.cert_pem, mode=0o644)
        env = {"CIPHERFACE_USERNAME": acct.username, "CIPHERFACE_PASSWORD": password}
        if acct.site is not None:
            env["CIPHERFACE_SITE"] = acct.site
        if acct.gateway is not None:
            env["CIPHERFACE_GATEWAY"] = acct.gateway
        write_atomic(files.env, "".join(f"{k}={v}\n" for k, v in env.items()).encode(), mode=0o600)
        return hash_password(password)

    def _add(self, accounts: Sequence[Account]) -> list[Account]:
        with self._locked():
            new_hashes = {}
            for acct in accounts:
                new_hashes[acct.username] = self._issue(acct)
                self._accounts[acct.username] = acct
            self._sync(new_hashes)
        return list(accounts)

    def _sync(self, new_hashes: Mapping[str, str]) -> None:
        """Rewrite state.json, the ACL and the password file from the accounts."""
        passwd = self.broker_dir / "passwd"
        try:
            existing = parse_password_file(passwd.read_text(encoding="utf-8"))
        except FileNotFoundError:
            existing = {}
        except OSError as exc:
            raise LocalError(
                f"cannot read {passwd}: {exc} (owned by the broker? run as root)"
            ) from exc
        hashes_by_user = {u: h for u, h in existing.items() if u in self._accounts}
        hashes_by_user.update(new_hashes)
        missing = set(self._accounts) - set(hashes_by_user)
        if missing:
            raise LocalError(f"no password hash for {sorted(missing)} in {passwd}; rotate them")
        # ACL before passwords: a new account can log in only once its rules exist,
        # and a removed one loses its password first (rules of unknown users are inert).
        self._write_broker(self.broker_dir / "acl", render_acl(self.accounts).encode(), 0o600)
        self._write_broker(passwd, render_password_file(hashes_by_user).encode(), 0o600)
        self._save_state()

    def _save_state(self) -> None:
        state = {
            "version": self.STATE_VERSION,
            "hostnames": list(self.hostnames),
            "broker_owner": list(self.broker_owner) if self.broker_owner else None,
            "accounts": [a.to_json() for a in self.accounts],
        }
        write_atomic(self.directory / "state.json", _json_bytes(state), mode=0o644)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ---------------------------------------------------------------------------- CLI
def _describe(dep: Deployment, accounts: Iterable[Account]) -> list[dict[str, Any]]:
    out = []
    for acct in accounts:
        entry = acct.to_json()
        if acct.role != "health":
            entry["files"] = dep.account_files(acct.username).to_json()
        entry["acl"] = [f"{r.access} {r.topic}" for r in acct.acl_rules()]
        out.append(entry)
    return out


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(text)


def _accounts_text(dep: Deployment, accounts: Sequence[Account]) -> str:
    lines = []
    for acct in accounts:
        where = (
            "" if acct.role == "health" else f"  -> {dep.account_files(acct.username).directory}"
        )
        extra = f" sites={','.join(acct.sites)}" if acct.role == "cloud" else ""
        lines.append(f"{acct.role:<10} {acct.username}{extra}{where}")
    return "\n".join(lines) if lines else "(no new account)"


def _parse_owner(value: str) -> tuple[int, int]:
    uid, sep, gid = value.partition(":")
    if not (uid.isdigit() and sep and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"expected UID:GID, got {value!r}")
    return int(uid), int(gid)


def _split_sites(values: Sequence[str]) -> list[str]:
    return [s.strip() for v in values for s in v.split(",") if s.strip()]


def _cmd_init(args: argparse.Namespace) -> int:
    dep = Deployment.init(
        args.dir, hostnames=args.hostname, broker_owner=args.broker_owner, force=args.force
    )
    payload = {
        "dir": str(dep.directory),
        "ca": str(dep.ca_cert_path),
        "ca_key": str(dep.ca_key_path),
        "broker_dir": str(dep.broker_dir),
        "hostnames": ["localhost", "127.0.0.1", "::1", *dep.hostnames],
        "accounts": _describe(dep, dep.accounts),
    }
    _emit(
        args,
        payload,
        f"initialised {dep.directory}: CA {dep.ca_cert_path}, broker files in {dep.broker_dir}\n"
        f"next: cipherface creds add-site SITE --gateway GW --dir {dep.directory}",
    )
    return 0


def _cmd_add_site(args: argparse.Namespace) -> int:
    dep = Deployment.open(args.dir)
    created = dep.add_site(args.site, gateways=args.gateway, integrator=args.integrator)
    payload = {"dir": str(dep.directory), "created": _describe(dep, created), "reload": RELOAD_HINT}
    _emit(args, payload, f"{_accounts_text(dep, created)}\n{RELOAD_HINT}")
    return 0


def _cmd_add_cloud(args: argparse.Namespace) -> int:
    dep = Deployment.open(args.dir)
    acct = dep.add_cloud(args.name, sites=_split_sites(args.sites))
    others = dep.mismatched_clouds(acct.username)
    warnings = (
        [
            f"warning: {', '.join(others)} serve(s) other sites than {acct.username}: give them "
            "different share groups, or a worker will swallow requests of sites it does not serve"
        ]
        if others
        else []
    )
    for warning in warnings:
        print(warning, file=sys.stderr)
    payload = {
        "dir": str(dep.directory),
        "account": _describe(dep, [acct])[0],
        "reload": RELOAD_HINT,
        "warnings": warnings,
    }
    _emit(args, payload, f"{_accounts_text(dep, [acct])}\n{RELOAD_HINT}")
    return 0


def _cmd_rotate(args: argparse.Namespace) -> int:
    dep = Deployment.open(args.dir)
    acct = dep.rotate(args.username)
    payload = {
        "dir": str(dep.directory),
        "account": _describe(dep, [acct])[0],
        "reload": RELOAD_HINT,
    }
    _emit(args, payload, f"new password and client certificate for {acct.username}\n{RELOAD_HINT}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    dep = Deployment.open(args.dir)
    dep.remove(args.username)
    payload = {"dir": str(dep.directory), "removed": args.username, "reload": RELOAD_HINT}
    _emit(args, payload, f"removed {args.username}\n{RELOAD_HINT}")
    return 0


def _cmd_renew_server(args: argparse.Namespace) -> int:
    dep = Deployment.open(args.dir)
    dep.renew_server_cert(args.hostname or None)
    hint = RELOAD_HINT  # Mosquitto reloads certfile/keyfile on SIGHUP
    payload = {"dir": str(dep.directory), "hostnames": list(dep.hostnames), "reload": hint}
    _emit(args, payload, f"new broker certificate in {dep.broker_dir}\n{hint}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    dep = Deployment.open(args.dir)
    payload = {"dir": str(dep.directory), "accounts": _describe(dep, dep.accounts)}
    _emit(args, payload, _accounts_text(dep, dep.accounts))
    return 0


def register_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``creds`` command group to a CLI.

    Each leaf parser sets ``func``: call ``args.func(args)``, which returns an exit
    status and raises :class:`~cipherface.errors.CipherFaceError` on failure.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``creds`` parser.
    """
    creds = subparsers.add_parser(
        "creds",
        help="create the CA, broker certificate, accounts, password file and ACL",
        description="Credentials for the broker and the agents (see docs/deployment.md).",
    )
    sub = creds.add_subparsers(dest="creds_command", required=True, metavar="COMMAND")

    def leaf(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--dir", default="deploy", help="credentials directory (default: ./deploy)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = leaf("init", "create the CA, the broker certificate and the broker files")
    p.add_argument(
        "--hostname",
        action="append",
        default=[],
        help="name or address clients use for the broker (repeatable; "
        "localhost and 127.0.0.1 are always included; 'mosquitto' for docker-compose)",
    )
    p.add_argument(
        "--broker-owner",
        type=_parse_owner,
        metavar="UID:GID",
        help="chown the broker's files to this user (needs root), e.g. 1883:1883",
    )
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p.set_defaults(func=_cmd_init)

    p = leaf("add-site", "add gateway accounts (and an integrator) for a site")
    p.add_argument("site", help="site id")
    p.add_argument("--gateway", action="append", required=True, help="gateway id (repeatable)")
    p.add_argument(
        "--integrator",
        nargs="?",
        const="integrator",
        default=None,
        metavar="NAME",
        help="also create <site>@NAME, which reads the site's decisions (default NAME: integrator)",
    )
    p.set_defaults(func=_cmd_add_site)

    p = leaf("add-cloud", "add a cloud worker account cloud-NAME, or extend its sites")
    p.add_argument("name", help="worker name; the username and agent id become cloud-NAME")
    p.add_argument(
        "--sites", action="append", required=True, help="sites it serves, comma-separated"
    )
    p.set_defaults(func=_cmd_add_cloud)

    p = leaf("rotate", "new password and client certificate for an account")
    p.add_argument("username")
    p.set_defaults(func=_cmd_rotate)

    p = leaf("remove", "delete an account")
    p.add_argument("username")
    p.set_defaults(func=_cmd_remove)

    p = leaf("renew-server", "issue a new broker certificate from the same CA")
    p.add_argument("--hostname", action="append", default=[], help="replace the hostnames")
    p.set_defaults(func=_cmd_renew_server)

    p = leaf("list", "list the accounts and their topic rules")
    p.set_defaults(func=_cmd_list)
    return creds


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``creds`` on its own: ``python -m cipherface.agents.deploy creds ...``.

    Returns:
        The exit status (2 with a message on a :class:`LocalError`).
    """
    parser = argparse.ArgumentParser(prog="cipherface")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LocalError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "ENV_HELP",
    "ENV_VARS",
    "HEALTH_USERNAME",
    "PASSWORD_ITERATIONS",
    "Account",
    "AccountFiles",
    "AclRule",
    "CertKey",
    "Deployment",
    "cloud_username",
    "create_ca",
    "gateway_username",
    "generate_password",
    "hash_password",
    "integrator_username",
    "issue_client_cert",
    "issue_server_cert",
    "main",
    "parse_password_file",
    "register_cli",
    "render_acl",
    "render_password_file",
    "server_names",
    "verify_password",
]
