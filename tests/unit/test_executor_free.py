"""The executor frees by request id, including a request freed while its adopt was in flight."""

from __future__ import annotations

import torch

from adrenaline.config import EngineConfig
from adrenaline.engine.attention_service import AttentionService
from adrenaline.model.resolve import resolve_model_dir
from adrenaline.engine.kv_transfer import export_blocks
from adrenaline.engine.tombstones import Tombstones
from adrenaline.model.hf_config import load_model_config


def _service() -> AttentionService:
    model = load_model_config(resolve_model_dir("tiny"))
    return AttentionService(model, EngineConfig(kv_cache_tokens=256), torch.float32,
                            torch.device("cpu"))


def _kv(s: AttentionService, num_tokens: int) -> torch.Tensor:
    return export_blocks(s.pool, s.backend.block_dim,
                         list(range(s.block_manager.blocks_for(num_tokens))))


def test_free_request_after_adopt_frees_pages():
    s = _service()
    h = s.adopt("r1", 20, 19, _kv(s, 19))
    assert h >= 0 and s.block_manager.num_used_blocks == 2
    s.free_request("r1")
    assert s.block_manager.num_used_blocks == 0 and not s.ids and not s.handles


def test_free_before_adopt_drops_the_late_adopt():
    s = _service()
    s.free_request("late")  # the router's cleanup won the race
    assert s.adopt("late", 20, 19, _kv(s, 19)) == -1
    assert s.block_manager.num_used_blocks == 0 and not s.ids
    # The tombstone was consumed: the id is usable again.
    assert s.adopt("late", 20, 19, _kv(s, 19)) >= 0


def test_tombstones_are_bounded():
    t = Tombstones(limit=3)
    for i in range(5):
        t.add(str(i))
    assert len(t) == 3 and not t.consume("0") and t.consume("4") and not t.consume("4")
