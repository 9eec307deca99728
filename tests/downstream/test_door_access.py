"""A downstream project's access-control tests: only the cipherface_* fixtures."""

from __future__ import annotations


def test_enrolled_person_is_let_in(cipherface_faces, cipherface_gateway, cipherface_events):
    cipherface_faces.enroll("alice")
    photo = cipherface_gateway.drop(cipherface_faces.capture("alice"))

    event = cipherface_events.wait_for_event(lambda e: e["event_id"] == photo)

    assert event["event_type"] == "match"
    assert event["identity"] == "alice" and event["match"] is True
    assert event["camera"] == "door"
    assert cipherface_gateway.wait(photo).event_type == "match"
    assert (cipherface_gateway.inbox / "done" / photo).exists()


def test_stranger_is_refused(cipherface_faces, cipherface_gateway, cipherface_events):
    cipherface_faces.enroll("alice")
    photo = cipherface_gateway.drop(cipherface_faces.capture("mallory"))

    event = cipherface_events.wait_for_event(lambda e: e["event_id"] == photo)

    assert event["event_type"] == "unknown"
    assert event["identity"] is None and event["match"] is False


def test_capture_without_a_face_is_an_error_not_a_decision(
    cipherface_faces, cipherface_gateway, cipherface_events
):
    cipherface_faces.enroll("alice")
    empty = cipherface_gateway.drop(cipherface_faces.capture(""))
    after = cipherface_gateway.drop(cipherface_faces.capture("alice"))

    error = cipherface_events.wait_for_event(lambda e: e["event_id"] == empty)
    cipherface_events.wait_for_event(lambda e: e["event_id"] == after)
    # The protocol's msgpack decision (label camera/event_id) exists for decided captures only.
    cipherface_events.wait_for_decision(lambda d: d["photo"] == f"door/{after}")

    assert (error["event_type"], error["error"], error["match"]) == ("error", "no_face", False)
    assert [d["photo"] for d in cipherface_events.decisions()] == [f"door/{after}"]


def test_home_assistant_sees_the_door_and_the_person(
    cipherface_faces, cipherface_gateway, cipherface_events
):
    cipherface_faces.enroll("alice")
    photo = cipherface_gateway.drop(cipherface_faces.capture("alice"))
    event = cipherface_events.wait_for_event(lambda e: e["event_id"] == photo)

    door = cipherface_events.wait_for_discovery(
        lambda c: c.get("state_topic") == cipherface_gateway.event_topic
    )
    presence = cipherface_events.wait_for_discovery(lambda c: c.get("device_class") == "presence")
    person = cipherface_events.wait_for(topic=presence["state_topic"])

    assert event["event_type"] in door["event_types"]
    assert door["availability_topic"] == cipherface_gateway.availability_topic
    assert person.data["identity"] == "alice" and person.retain is False


def test_verify_at_the_door(cipherface_edge, cipherface_faces, cipherface_events):
    cipherface_faces.enroll("bob")

    assert cipherface_edge.verify("bob", vector=cipherface_faces.vector("bob")).match
    assert not cipherface_edge.verify("bob", vector=cipherface_faces.vector("eve")).match

    cipherface_events.wait_for_decision(lambda d: d["match"] is False)
    published = [(d["op"], d["identity"], d["match"]) for d in cipherface_events.decisions()]
    assert published == [("verify", "bob", True), ("verify", "bob", False)]
