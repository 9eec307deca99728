"""A downstream project's access-control tests: only the cipherface_* fixtures."""

from __future__ import annotations


def test_enrolled_person_is_let_in(cipherface_faces, cipherface_gateway, cipherface_events):
    cipherface_faces.enroll("alice")
    photo = cipherface_gateway.drop(cipherface_faces.capture("alice"))

    decision = cipherface_events.wait_for_decision(lambda d: d["photo"] == photo)

    assert decision["match"] is True
    assert decision["identity"] == "alice"
    assert decision["op"] == "identify"
    assert cipherface_gateway.wait(photo).moved_to.endswith(f"done/{photo}")


def test_stranger_is_refused(cipherface_faces, cipherface_gateway, cipherface_events):
    cipherface_faces.enroll("alice")
    photo = cipherface_gateway.drop(cipherface_faces.capture("mallory"))

    decision = cipherface_events.wait_for_decision(lambda d: d["photo"] == photo)

    assert decision["match"] is False
    assert decision["identity"] is None


def test_capture_without_a_face_publishes_no_decision(
    cipherface_faces, cipherface_gateway, cipherface_events
):
    cipherface_faces.enroll("alice")
    empty = cipherface_gateway.drop(cipherface_faces.capture(""))
    after = cipherface_gateway.drop(cipherface_faces.capture("alice"))

    assert cipherface_gateway.wait(empty).error_code == "no_face"
    cipherface_events.wait_for_decision(lambda d: d["photo"] == after)
    assert [d["photo"] for d in cipherface_events.decisions()] == [after]


def test_verify_at_the_door(cipherface_edge, cipherface_faces, cipherface_events):
    cipherface_faces.enroll("bob")

    assert cipherface_edge.verify("bob", vector=cipherface_faces.vector("bob")).match
    assert not cipherface_edge.verify("bob", vector=cipherface_faces.vector("eve")).match
    cipherface_events.wait_for_decision(lambda d: d["match"] is False)
    published = [(d["op"], d["identity"], d["match"]) for d in cipherface_events.decisions()]
    assert published == [("verify", "bob", True), ("verify", "bob", False)]
