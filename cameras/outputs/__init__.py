"""Decision outputs: each module is one consumer behind :class:`~..capture.Output`.

* :mod:`.integrator` -- flat JSON on ``cipherface/v1/<site>/json/<gateway>/...``.
* :mod:`.frigate` -- ``POST /api/events/<id>/sub_label`` on Frigate.
* :mod:`.double_take` -- Double Take-compatible ``double-take/...`` topics.
* :mod:`.homeassistant` -- Home Assistant MQTT discovery (event + presence entities).
"""
