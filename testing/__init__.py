"""Test the access-control flows you build on CipherFace against the real thing.

* :mod:`cipherface.testing.plugin` -- the pytest plugin (fixtures ``cipherface_*``),
  registered through the ``pytest11`` entry point, inert until a test asks for one;
* :mod:`cipherface.testing.containers` -- testcontainers classes (a Mosquitto
  configured from the project's ``mosquitto.conf``, a cloud agent built from its
  Dockerfile) for CI that has Docker;
* :mod:`cipherface.testing.netns` -- several hosts on one Linux machine (network
  namespaces on a private bridge, a private PostgreSQL) for multi-host tests;
* :mod:`~cipherface.testing.services`, :mod:`~cipherface.testing.recorder`,
  :mod:`~cipherface.testing.faces`, :mod:`~cipherface.testing.brokers` -- what the
  fixtures are made of, for tests that compose their own.

Importing this package imports nothing else: each module loads what it needs.
See docs/testing.md.
"""
