"""One exception hierarchy for the whole project.

Every error raised on purpose derives from :class:`CipherFaceError` and is one of
two kinds, in the spirit of h11's Local/RemoteProtocolError:

* :class:`LocalError` -- *you misused it*: a bad argument, a missing key or weight
  file, a photo with no face. Fix the call or the files.
* :class:`RemoteError` -- *the peer sent garbage*: a malformed, oversized,
  wrong-version or wrong-key message, or a result that fails validation. The
  agent reports it to the peer and keeps serving.

Each class carries a stable ``code`` string; the wire protocol puts it in error
messages (see docs/protocol.md), so a client in another language can branch on it.
"""

from __future__ import annotations

import builtins


class CipherFaceError(Exception):
    """Base class of every error this project raises on purpose."""

    code: str = "error"


# --------------------------------------------------------------------------- local
class LocalError(CipherFaceError):
    """The caller misused the library or its local files are wrong."""

    code = "local_error"


class InvalidArgumentError(LocalError, ValueError):
    """An argument has the wrong type, shape or value."""

    code = "invalid_argument"


class InsecureParametersError(LocalError, ValueError):
    """Encryption parameters below the security level they claim."""

    code = "insecure_parameters"


class KeyFileError(LocalError):
    """A key file is missing, unreadable, of the wrong kind or the wrong scheme."""

    code = "key_file"


class PublicKeyOnlyError(KeyFileError):
    """A secret-key operation (decrypt, restore) was asked of a public-only key."""

    code = "public_key_only"


class OutdatedFormatError(KeyFileError):
    """A key file or gallery written by an earlier format; the message names the command
    that replaces it."""

    code = "outdated_format"


class InsecurePermissionsError(KeyFileError):
    """A secret key file that group or others can read (``chmod 600`` it)."""

    code = "insecure_permissions"


class MissingWeightsError(LocalError, FileNotFoundError):
    """A face model's weight file is not on disk (we never download at run time)."""

    code = "missing_weights"


class FaceError(LocalError):
    """The photo cannot give exactly one face embedding."""

    code = "face_error"


class ImageReadError(FaceError):
    """The image file or bytes cannot be decoded."""

    code = "image_unreadable"


class NoFaceError(FaceError):
    """No face was detected in the photo."""

    code = "no_face"


class MultipleFacesError(FaceError):
    """More than one face was detected where exactly one is required."""

    code = "multiple_faces"


class GalleryError(LocalError):
    """A gallery operation cannot be done (unknown identity, wrong dimension...)."""

    code = "gallery_error"


class UnknownIdentityError(GalleryError, KeyError):
    """The identity is not enrolled in this site's gallery."""

    code = "unknown_identity"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else self.code


class GatewayHaltedError(LocalError):
    """The gateway halted after forged results: rotate the key, or clear the halt
    (``cipherface guard --reset``)."""

    code = "gateway_halted"


class DecisionBudgetError(LocalError):
    """The key has made its budget of decisions; rotate it (new keygen and re-enrollment)."""

    code = "decision_budget"


class StorageError(CipherFaceError):
    """Gallery storage cannot be read or written (disk full, permissions, locked)."""

    code = "storage_error"


class StorageCorruptError(StorageError):
    """A file on disk (gallery, key) fails its integrity check."""

    code = "storage_corrupt"


class StorageFullError(StorageError):
    """No space left for a gallery write; nothing was changed, the same write may succeed later."""

    code = "storage_full"


class StorageConflictError(StorageError):
    """Another worker changed the gallery first; nothing was changed, retry the request."""

    code = "storage_busy"


class AlreadyAnsweredError(StorageConflictError):
    """The write was carried out before (another worker, or this one before a crash):
    nothing was changed now; ``reply`` is the reply stored with that change.

    The cloud answers with ``reply`` instead; should it ever reach a peer, it reads as
    ``storage_busy`` (retryable) and the retry is answered from the store.
    """

    def __init__(self, message: str, *, reply: bytes) -> None:
        super().__init__(message)
        self.reply = reply


# -------------------------------------------------------------------------- remote
class RemoteError(CipherFaceError):
    """The peer sent something we refuse: the fault is on the other side.

    ``header`` holds the readable envelope fields of the offending message (set by the
    protocol codec) so that the receiver can answer on the sender's error topic.
    """

    code = "remote_error"
    header: object | None = None


class DecodeError(RemoteError):
    """The bytes are not a well-formed message of the protocol."""

    code = "malformed"


class UnsupportedVersionError(RemoteError):
    """The message's schema version is not one we speak."""

    code = "unsupported_version"


class UnknownMessageTypeError(RemoteError):
    """The message type is not defined by the protocol."""

    code = "unknown_type"


class ValidationError(RemoteError):
    """A field is missing, of the wrong type, or out of range."""

    code = "invalid_field"


class PayloadTooLargeError(RemoteError):
    """The message or one of its fields exceeds the protocol's size limits."""

    code = "too_large"


class ExpiredError(RemoteError):
    """The message arrived after its expiry time."""

    code = "expired"


class KeyMismatchError(RemoteError):
    """The message was made for another key (key id / scheme / parameters differ)."""

    code = "key_mismatch"


class KeyInUseError(RemoteError):
    """A ``key.retire`` would leave the site without a working key: it names the site's
    current key, or its successor is not registered and current."""

    code = "key_in_use"


class KeyRetiredError(RemoteError):
    """The key was retired (``cipherface rotate-key``): its gallery is destroyed and it
    may never be published again; the gateway must load the site's new key."""

    code = "key_retired"


class ResultRejectedError(RemoteError):
    """A result fails the edge's checks (shape, count, scheme) and is never decrypted."""

    code = "result_rejected"


class ResultForgedError(ResultRejectedError):
    """A well-formed result fails the edge's integrity checks (its canaries are off, or a
    label was never sealed by this site): the cloud is cheating or broken. Never decided
    on; counted, and the gateway halts after a few (see docs/security.md)."""

    code = "result_forged"


class RateLimitedError(RemoteError):
    """The gateway asked more than its quota allows (cloud side; see agents/quota.py)."""

    code = "rate_limited"


class PeerReportedError(RemoteError):
    """The peer answered our request with an error message."""

    code = "peer_error"

    def __init__(self, code: str, message: str, *, retry: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.remote_code = code
        self.message = message
        self.retry = retry  # the peer says the same request may succeed later


# ----------------------------------------------------------------- transport/time
class RequestTimeoutError(CipherFaceError, builtins.TimeoutError):
    """No answer arrived in time (after the configured retries)."""

    code = "timeout"


class PartialResultError(CipherFaceError):
    """Some shards of a sharded gallery did not answer: the result covers only part of
    the gallery, so "nobody matched" cannot be concluded (edge-local).

    Args:
        message: what happened.
        missing: the shards that did not answer.
    """

    code = "partial_result"

    def __init__(self, message: str, *, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.missing = missing


class BrokerConnectionError(CipherFaceError, ConnectionError):
    """The MQTT broker refused us or cannot be reached (no answer in time)."""

    code = "broker_unreachable"


class BrokerAuthError(BrokerConnectionError):
    """The broker refused our credentials (bad username or password, not authorised)."""

    code = "broker_auth"


class BrokerTlsError(BrokerConnectionError):
    """TLS failed: the broker's certificate does not verify, or a CA/certificate file
    cannot be loaded."""

    code = "broker_tls"


class BrokerDnsError(BrokerConnectionError):
    """The broker's host name does not resolve."""

    code = "broker_dns"


class BrokerRefusedError(BrokerConnectionError):
    """Nothing listens at the broker's address (TCP connection refused)."""

    code = "broker_refused"


class SessionTakenOverError(BrokerConnectionError):
    """Another process connected under our client id (agent id) and took its broker
    session over while we were away: we stood down instead of taking it back."""

    code = "session_taken_over"


class PublishDeniedError(CipherFaceError):
    """The broker refused a publish (MQTT 5 PUBACK reason: not authorised by its ACL,
    too large, quota exceeded)."""

    code = "publish_denied"


class NoCloudError(RequestTimeoutError):
    """No reply, and no cloud agent announces itself online on the broker."""

    code = "no_cloud"


__all__ = [name for name in dir() if name.endswith("Error")]
