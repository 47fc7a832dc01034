"""The key and salt rule shared by the engine integrations (pykvshm/integrations/engine_keys.py)."""

from __future__ import annotations

import hashlib

import pytest

from pykvshm.integrations.engine_keys import engine_key, salt_digest


def test_engine_key_is_the_vllm_connectors_rule():
    # The vLLM connector's keys before engine_keys.py existed: blake2b(salt + block hash, 16 bytes).
    salt = salt_digest(["pykvshm-vllm-v1", "model", "float32"])
    h = hashlib.sha256(b"block").digest()
    assert engine_key(salt, h) == hashlib.blake2b(salt + h, digest_size=16).digest()
    assert salt == hashlib.blake2b("\x1f".join(["pykvshm-vllm-v1", "model", "float32"]).encode(),
                                   digest_size=16).digest()


def test_engine_tags_separate_keys():
    h = "ab" * 32
    sglang, lmcache = salt_digest(["pykvshm-sglang-v1", "m"]), salt_digest(["pykvshm-lmcache-v1", "m"])
    assert engine_key(sglang, h) != engine_key(lmcache, h)
    assert len(engine_key(sglang, h)) == 16
    assert engine_key(sglang, -5) != engine_key(sglang, 5)  # LMCache chunk hashes are signed


@pytest.mark.parametrize("bad", [None, 1.5, True, ["x"]])
def test_engine_key_refuses_other_types(bad):
    with pytest.raises(TypeError):
        engine_key(b"\0" * 16, bad)
