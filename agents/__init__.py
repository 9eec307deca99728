"""Thin adapters: paho-mqtt agents, face embedding, the command line."""
