"""Homomorphic encryption schemes, key files and the encrypted gallery engine (no MQTT)."""
