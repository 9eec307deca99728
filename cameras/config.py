"""The gateway's configuration file (TOML), with environment overrides.

``cipherface edge --config gateway.toml`` reads it; docs/integrations.md shows a full
example. Shape::

    site = "home"                 # or CIPHERFACE_SITE
    gateway = "gw1"               # or CIPHERFACE_GATEWAY
    keys = "/etc/cipherface/keys" # or CIPHERFACE_KEYS

    [cloud]        # broker the cloud agent is reached through (CIPHERFACE_BROKER...)
    url = "mqtts://cloud.example.org:8883"
    [mqtt]         # the LAN broker of Frigate and Home Assistant (default: [cloud])
    url = "mqtt://192.168.1.10:1883"

    [defaults]     # every camera (see cipherface.cameras.decide.Policy)
    max_age_s = 5
    [cameras.front_door]
    match_distance = 0.06
    consensus = 2

    [frigate]      # Frigate in (events + snapshots) and out (sub_label)
    url = "http://frigate:5000"
    [double_take]  # Double Take-compatible topics
    enabled = true
    [homeassistant]
    people = ["alice", "bob"]
    [unknown_faces]
    path = "/var/lib/cipherface/unknown"

    [[sources]]
    type = "opencv"  # or "mqtt_jpeg", "folder"
    camera = "porch"
    url = "rtsp://user:pass@192.168.1.20:554/stream1"

Environment overrides: ``CIPHERFACE__<SECTION>__<KEY>=value`` (double underscores,
case-insensitive; the value is read as a TOML value when it parses, else as a string),
e.g. ``CIPHERFACE__MQTT__PASSWORD``; ``CIPHERFACE_SITE``, ``CIPHERFACE_GATEWAY``,
``CIPHERFACE_KEYS`` and ``CIPHERFACE_BROKER`` / ``_USERNAME`` / ``_PASSWORD`` / ``_CA``
(the cloud broker) work as for every other command. Secrets belong in the environment.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cipherface.agents.mqtt import DEFAULT_BROKER, BrokerConfig
from cipherface.errors import InvalidArgumentError

from .capture import Output, Source
from .decide import Policy
from .events import validate_camera
from .unknown import UnknownFaces

_BROKER_KEYS = frozenset(f.name for f in fields(BrokerConfig))
_POLICY_KEYS = frozenset(f.name for f in fields(Policy))


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """A parsed configuration file (see the module docstring)."""

    site: str
    gateway: str
    keys: str
    cloud: BrokerConfig
    mqtt: BrokerConfig
    defaults: Policy
    cameras: Mapping[str, Policy]
    raw: Mapping[str, Any] = field(default_factory=dict)

    def sources(self) -> list[Source]:
        """The configured sources (Frigate's first)."""
        from .sources.folder import FolderSource
        from .sources.frigate import FrigateSource
        from .sources.mqtt_jpeg import MqttJpegSource
        from .sources.opencv import OpenCVSource

        out: list[Source] = []
        frigate = self.raw.get("frigate")
        if frigate and frigate.get("events", True):
            out.append(
                FrigateSource(
                    url=_need(frigate, "url", "frigate"),
                    topic_prefix=frigate.get("topic_prefix", "frigate"),
                    cameras=frigate.get("cameras"),
                    labels=tuple(frigate.get("labels", ["person"])),
                    snapshot_height=int(frigate.get("snapshot_height", 500)),
                    crop=bool(frigate.get("crop", True)),
                    use_latest=bool(frigate.get("use_latest", True)),
                    captures_per_event=int(frigate.get("captures_per_event", 2)),
                )
            )
        for i, src in enumerate(self.raw.get("sources", [])):
            kind = src.get("type")
            where = f"sources[{i}]"
            if kind == "opencv":
                out.append(
                    OpenCVSource(
                        camera=_need(src, "camera", where),
                        url=_need(src, "url", where),
                        interval_s=float(src.get("interval_s", 1.0)),
                        loop=bool(src.get("loop", False)),
                    )
                )
            elif kind == "mqtt_jpeg":
                out.append(
                    MqttJpegSource(
                        topic=_need(src, "topic", where),
                        camera_level=src.get("camera_level", 1),
                        camera=src.get("camera"),
                    )
                )
            elif kind == "folder":
                out.append(
                    FolderSource(
                        path=_need(src, "path", where),
                        camera=src.get("camera", "folder"),
                        poll=float(src.get("poll", 0.5)),
                    )
                )
            else:
                raise InvalidArgumentError(
                    f"{where}.type must be opencv, mqtt_jpeg or folder, got {kind!r}"
                )
        return out

    def outputs(self) -> list[Output]:
        """The configured outputs (integrator JSON always first)."""
        from .outputs.double_take import DoubleTakeOutput
        from .outputs.frigate import FrigateSubLabelOutput
        from .outputs.homeassistant import HomeAssistantOutput
        from .outputs.integrator import JsonEventsOutput

        out: list[Output] = [JsonEventsOutput()]
        frigate = self.raw.get("frigate")
        if frigate and frigate.get("sub_label", True):
            out.append(FrigateSubLabelOutput(url=_need(frigate, "url", "frigate")))
        dt = self.raw.get("double_take")
        if dt and dt.get("enabled", True):
            out.append(DoubleTakeOutput(topic_prefix=dt.get("topic_prefix", "double-take")))
        ha = self.raw.get("homeassistant")
        if ha is not None and ha.get("enabled", True):
            out.append(
                HomeAssistantOutput(
                    site=self.site,
                    gateway=self.gateway,
                    cameras=list(self.cameras),
                    people=ha.get("people", []),
                    discovery_prefix=ha.get("discovery_prefix", "homeassistant"),
                    presence_s=int(ha.get("presence_s", 60)),
                )
            )
        return out

    def unknown_faces(self) -> UnknownFaces | None:
        """The unknown-face keeper, when ``[unknown_faces]`` has a ``path``."""
        uf = self.raw.get("unknown_faces")
        if not uf or not uf.get("path"):
            return None
        return UnknownFaces(
            path=uf["path"],
            retention_s=float(uf.get("retention_days", 7)) * 86400,
            max_files=int(uf.get("max_files", 500)),
        )


def _need(table: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in table:
        raise InvalidArgumentError(f"config: [{where}] needs {key!r}")
    return table[key]


def _value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    """Apply ``CIPHERFACE__SECTION__KEY`` overrides (and the usual CIPHERFACE_* ones)."""
    for name, value in env.items():
        if not name.startswith("CIPHERFACE__"):
            continue
        path = [p.lower() for p in name[len("CIPHERFACE__") :].split("__") if p]
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidArgumentError(f"{name}: {part} is not a table")
        if path:
            node[path[-1]] = _value(value)
    for key, var in (
        ("site", "CIPHERFACE_SITE"),
        ("gateway", "CIPHERFACE_GATEWAY"),
        ("keys", "CIPHERFACE_KEYS"),
    ):
        if env.get(var) and key not in raw:
            raw[key] = env[var]
    cloud = raw.setdefault("cloud", {})
    for key, var in (
        ("url", "CIPHERFACE_BROKER"),
        ("username", "CIPHERFACE_USERNAME"),
        ("password", "CIPHERFACE_PASSWORD"),
        ("ca_file", "CIPHERFACE_CA"),
    ):
        if env.get(var) and key not in cloud:
            cloud[key] = env[var]
    return raw


def _broker(table: Mapping[str, Any], where: str) -> BrokerConfig:
    unknown = set(table) - _BROKER_KEYS
    if unknown:
        raise InvalidArgumentError(f"config: unknown keys in [{where}]: {sorted(unknown)}")
    return BrokerConfig(**{"url": DEFAULT_BROKER, **table})


def _policy(table: Mapping[str, Any], base: Policy | None, where: str) -> Policy:
    unknown = set(table) - _POLICY_KEYS
    if unknown:
        raise InvalidArgumentError(f"config: unknown keys in [{where}]: {sorted(unknown)}")
    start = {f.name: getattr(base, f.name) for f in fields(Policy)} if base else {}
    try:
        return Policy(**{**start, **table})
    except TypeError as exc:
        raise InvalidArgumentError(f"config: [{where}]: {exc}") from exc


def parse(raw: dict[str, Any], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Build a :class:`GatewayConfig` from a TOML document's dict.

    Raises:
        InvalidArgumentError: a missing or malformed setting (the message names it).
    """
    raw = apply_env(raw, os.environ if env is None else env)
    for key in ("site", "gateway", "keys"):
        if not raw.get(key):
            raise InvalidArgumentError(f"config: {key!r} is required (or CIPHERFACE_{key.upper()})")
    cloud = _broker(raw.get("cloud", {}), "cloud")
    mqtt = _broker(raw["mqtt"], "mqtt") if raw.get("mqtt") else cloud
    defaults = _policy(raw.get("defaults", {}), None, "defaults")
    cameras = {
        validate_camera(name): _policy(table, defaults, f"cameras.{name}")
        for name, table in raw.get("cameras", {}).items()
    }
    return GatewayConfig(
        site=str(raw["site"]),
        gateway=str(raw["gateway"]),
        keys=str(raw["keys"]),
        cloud=cloud,
        mqtt=mqtt,
        defaults=defaults,
        cameras=cameras,
        raw=raw,
    )


def load(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read and parse a TOML configuration file.

    Raises:
        InvalidArgumentError: unreadable, not TOML, or a bad setting.
    """
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgumentError(f"cannot read the config file {path}: {exc}") from exc
    return parse(raw, env)


__all__ = ["GatewayConfig", "apply_env", "load", "parse"]
