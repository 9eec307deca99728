"""Sans-IO wire protocol: messages, msgpack codec, topics, validation, dedup (no sockets, no HE)."""
