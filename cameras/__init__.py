"""Camera integrations: where captures come from and where decisions go.

The edge agent (:mod:`cipherface.agents.edge`) knows how to embed, encrypt, ask the cloud
and decrypt. This room puts it between the camera stack people already run and the
automations that consume names:

* :mod:`.capture` -- a :class:`~.capture.Capture` (one sighting, one or more frames) and
  the two interfaces: a :class:`~.capture.Source` yields captures, an
  :class:`~.capture.Output` consumes outcomes.
* :mod:`.sources` -- folder watch, Frigate events, JPEG over MQTT, OpenCV (RTSP/HTTP/file).
* :mod:`.outputs` -- integrator JSON topics, Frigate ``sub_label`` write-back,
  Double Take-compatible topics, Home Assistant MQTT discovery.
* :mod:`.decide` -- per-camera thresholds, consensus over frames, the coarse confidence.
* :mod:`.events` -- the flat JSON integrator event and its topics.
* :mod:`.gateway` -- the daemon that ties sources, the edge client and outputs together.
* :mod:`.config` -- the TOML configuration file (``cipherface edge --config FILE``).

docs/integrations.md documents every topic and payload.
"""
