import pytest
import torch

from chatapp.engine.state import CompositeState, ContextFull, ConvState, KVState, RecurrentState, StateList


def _kv(max_len=8):
    return KVState(max_len, n_kv_heads=2, head_dim=4, device="cpu", dtype=torch.float32)


def test_kv_update_returns_filled_cache_and_tracks_bytes():
    kv = _kv()
    k1, v1 = torch.randn(1, 3, 2, 4), torch.randn(1, 3, 2, 4)
    k, v = kv.update(k1, v1)
    assert k.shape == (1, 2, 3, 4) and torch.equal(k, k1.transpose(1, 2)) and torch.equal(v, v1.transpose(1, 2))
    assert kv.length == 0  # writing does not advance: the forward's StateList.advance does
    kv.advance(3)
    k2 = torch.randn(1, 1, 2, 4)
    k, _ = kv.update(k2, k2)
    kv.advance(1)
    assert k.shape[2] == 4 and torch.equal(k[:, :, 3], k2[:, 0])
    per_token = 2 * 2 * 4 * 4  # k and v, 2 heads, 4 dims, fp32
    assert kv.nbytes() == 8 * per_token and kv.used_nbytes() == 4 * per_token


def test_kv_overflow_raises_context_full():
    kv = _kv(4)
    kv.update(torch.zeros(1, 4, 2, 4), torch.zeros(1, 4, 2, 4))
    kv.advance(4)
    with pytest.raises(ContextFull):
        kv.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))


def test_snapshot_restore_copies_into_the_same_buffers():
    kv = _kv()
    kv.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4))
    kv.advance(2)
    ptr = kv.k.data_ptr()
    snap = kv.snapshot()
    kv.update(torch.full((1, 3, 2, 4), 7.0), torch.full((1, 3, 2, 4), 7.0))
    kv.advance(3)
    kv.restore(snap)
    assert kv.length == 2 and kv.k.data_ptr() == ptr
    k, _ = kv.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    assert torch.equal(k[:, :, :2], torch.ones(1, 2, 2, 4)) and torch.equal(k[:, :, 2], torch.zeros(1, 2, 4))


def test_recurrent_state_is_fp32_and_cannot_trim():
    r = RecurrentState((1, 2, 3, 3), device="cpu")
    assert r.state.dtype == torch.float32 and r.nbytes() == 18 * 4 and not r.can_trim
    with pytest.raises(NotImplementedError):
        r.trim(0)


def test_statelist_bytes_by_kind_and_trim_rules():
    comp = CompositeState(rec=RecurrentState((1, 2, 2, 2), device="cpu"),
                          conv=ConvState(4, 4, device="cpu", dtype=torch.float32))
    sl = StateList([_kv(), comp], max_len=8)
    b = sl.bytes()
    assert b.allocated == {"kv": 8 * 64, "recurrent": 32, "conv": 4 * 3 * 4}
    assert b.used["kv"] == 0 and b.used["recurrent"] == 32
    assert not sl.can_trim and StateList([_kv()]).can_trim
    sl.advance(5)
    with pytest.raises(ContextFull):
        sl.check_room(4)
    sl.check_room(3)


def test_statelist_snapshot_restore_roundtrip():
    rec = RecurrentState((1, 1, 2, 2), device="cpu")
    sl = StateList([rec], max_len=4)
    rec.state.fill_(3.0)
    sl.advance(2)
    snap = sl.snapshot()
    rec.state.fill_(9.0)
    sl.advance(1)
    sl.restore(snap)
    assert sl.length == 2 and torch.all(rec.state == 3.0)
    sl.reset()
    assert sl.length == 0 and torch.all(rec.state == 0)


def test_every_state_kind_advances_with_the_list():
    # One rule for every kind: StateList.advance moves each layer's length, composites' parts included.
    kv = _kv()
    comp = CompositeState(rec=RecurrentState((1, 2, 2, 2), device="cpu"),
                          conv=ConvState(4, 4, device="cpu", dtype=torch.float32))
    sl = StateList([kv, comp], max_len=8)
    kv.update(torch.ones(1, 3, 2, 4), torch.ones(1, 3, 2, 4))
    sl.advance(3)
    assert [sl.length, kv.length, comp.length, comp.rec.length, comp.conv.length] == [3] * 5
    assert sl.bytes().used["kv"] == 3 * 64
    snap = sl.snapshot()
    sl.advance(2)
    sl.restore(snap)
    assert [sl.length, kv.length, comp.length, comp.rec.length] == [3] * 4
