"""The one module that reaches into aiortc/aioice: its pin guard and its patches."""

from __future__ import annotations

import aioice.ice
import pytest
from aiortc import RTCPeerConnection

from media_tracks import aiortc_compat as compat
from media_tracks.jitter import LowDelayJitterBuffer


def test_the_installed_versions_are_the_pinned_ones():
    compat.check_versions()  # importing the module already did; a moved pin raises


def test_a_moved_pin_is_a_clear_error_naming_both_versions():
    with pytest.raises(compat.AiortcVersionError) as e:
        compat.check_versions({"aiortc": "1.17.0", "aioice": compat.PINNED["aioice"]})
    assert "aiortc 1.17.0 (pinned 1.16.0)" in str(e.value)
    assert "requirements.txt" in str(e.value)


def test_host_candidates_are_switched_only_when_asked():
    before = compat.host_candidates_mode()
    try:
        compat.use_host_candidates("loopback")
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
        assert compat.host_candidates_mode() == "loopback"
        compat.use_host_candidates("all")
        assert compat.host_candidates_mode() == "all"
        assert aioice.ice.get_host_addresses is compat._original_get_host_addresses
    finally:
        compat.use_host_candidates(before)


async def test_receiver_prefetch_replaces_the_jitter_buffer_and_keeps_its_capacity():
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("audio", direction="recvonly").receiver
        old = compat.receiver_jitter_buffer(receiver)
        assert old is not None and compat.receiver_prefetch(receiver) == 4
        assert compat.set_receiver_prefetch(receiver, 1)
        new = compat.receiver_jitter_buffer(receiver)
        assert new is not old and new is not None
        assert new.capacity == old.capacity and compat.receiver_prefetch(receiver) == 1
        assert isinstance(new, LowDelayJitterBuffer)  # no standing delay after a loss
    finally:
        await pc.close()


def test_prefetch_on_a_receiver_without_a_buffer_changes_nothing():
    class NoBuffer:
        pass

    assert compat.set_receiver_prefetch(NoBuffer(), 1) is False  # type: ignore[arg-type]


async def test_the_sender_encoder_slot_is_filled_once():
    from aiortc.codecs.vpx import Vp8Encoder

    pc = RTCPeerConnection()
    try:
        sender = pc.addTransceiver("video", direction="sendonly").sender
        assert compat.has_encoder_slot(sender)
        assert compat.sender_encoder(sender) is None
        enc = Vp8Encoder()
        compat.set_sender_encoder(sender, enc)
        assert compat.sender_encoder(sender) is enc
    finally:
        await pc.close()


def test_building_the_app_does_not_switch_host_candidates():
    from config import load_settings
    from rtc_server.app import create_app
    from tests.fakes.tts import ToneTTS

    compat.use_host_candidates("all")
    try:
        create_app(load_settings(overrides={"webrtc.host_candidates": "loopback"}), tts=ToneTTS())
        assert compat.host_candidates_mode() == "all"
    finally:
        compat.use_host_candidates("loopback")
