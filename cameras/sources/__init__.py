"""Frame sources: each module is one kind of camera behind :class:`~..capture.Source`.

* :mod:`.folder` -- photos dropped in a folder (moved to ``done/`` or ``failed/``).
* :mod:`.frigate` -- Frigate ``person`` events, snapshots fetched from Frigate's API.
* :mod:`.mqtt_jpeg` -- raw JPEG payloads on MQTT topics (``frigate/<camera>/person/snapshot``).
* :mod:`.opencv` -- RTSP streams, HTTP snapshot URLs and video files through OpenCV.
"""
