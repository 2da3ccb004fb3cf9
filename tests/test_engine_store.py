"""The block store: the longest stored run, eviction by kvern's policies, the disk tier."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="the engine extra (torch) is not installed")

from kvern.engine.disk_tier import DiskTier  # noqa: E402
from kvern.engine.kv_codec import BlockShape, EncodedBlock, decode, encode  # noqa: E402
from kvern.engine.store import BlockStore  # noqa: E402
from kvern.routing.block_chains import chain_hashes, token_bytes  # noqa: E402
from kvern.trie.policies import make_policy  # noqa: E402

B = 4
SHAPE = BlockShape(num_layers=1, num_kv_heads=1, block_tokens=B, head_dim=2)
BLOCK_BYTES = encode(torch.zeros(SHAPE.dims), torch.zeros(SHAPE.dims), 32).num_bytes


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def block_for(tokens: list[int], i: int) -> EncodedBlock:
    """A block whose keys spell its tokens, so a test can see which block came back."""
    keys = torch.tensor(tokens[i * B : (i + 1) * B], dtype=torch.float32)
    keys = keys.view(1, 1, B, 1).expand(SHAPE.dims).contiguous()
    return encode(keys, -keys, 32)


def tokens_of(block: EncodedBlock) -> list[int]:
    keys, _ = decode(block, torch.float32)
    return [int(t) for t in keys[0, 0, :, 0]]


def store_with(capacity_blocks: int, policy: str = "lru", **kw: object) -> tuple[BlockStore, Clock]:
    clock = Clock()
    store = BlockStore(B, capacity_blocks * BLOCK_BYTES, make_policy(policy), clock=clock, **kw)
    return store, clock


def put(store: BlockStore, tokens: list[int]) -> int:
    added = store.put(hashes(tokens), tokens, lambda i: block_for(tokens, i))
    store.check_invariants()
    return added


def hashes(tokens: list[int]) -> list:
    return chain_hashes(token_bytes(tokens), B)


def reused(store: BlockStore, tokens: list[int]) -> list[list[int]]:
    found = store.lookup(hashes(tokens), tokens)
    store.check_invariants()
    return [tokens_of(b) for b in found]


def test_a_lookup_returns_the_longest_stored_run_of_leading_blocks() -> None:
    store, _ = store_with(100)
    put(store, list(range(12)))  # three blocks
    assert reused(store, list(range(8)) + [99, 99, 99, 99]) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert reused(store, [0, 1, 2, 9] + list(range(4, 12))) == []  # the first block differs
    assert store.stats.hit_blocks == 2 and store.stats.lookup_blocks == 6


def test_only_blocks_not_stored_yet_are_encoded() -> None:
    store, _ = store_with(100)
    put(store, list(range(8)))
    encoded: list[int] = []
    tokens = list(range(16))
    store.put(hashes(tokens), tokens, lambda i: encoded.append(i) or block_for(tokens, i))
    assert encoded == [2, 3] and store.num_blocks == 4


def test_the_budget_evicts_least_recently_used_leaves_first_and_never_a_parent() -> None:
    store, clock = store_with(4, low_watermark=1.0)
    a = list(range(100, 112))  # blocks a0 a1 a2
    put(store, a)
    clock.now = 1
    put(store, [7, 7, 7, 7])  # block b0, now 4 blocks: full
    clock.now = 2
    reused(store, a[:4] + [0] * 8)  # a0 touched; a1, a2 older than b0
    clock.now = 3
    put(store, [8, 8, 8, 8])  # a fifth block: one must go
    # Leaves are a2, b0, c0; a2 (t=0) is the least recent. a0 (t=2) is a parent: kept.
    assert reused(store, a) == [a[0:4], a[4:8]]
    assert store.num_blocks == 4 and store.stats.evicted_blocks == 1


@pytest.mark.parametrize(
    ("policy", "survivor"),
    [("cost_aware", "system"), ("lru", "one-off")],
)
def test_cost_aware_keeps_a_shared_system_prompt_that_lru_drops(policy: str, survivor: str) -> None:
    store, clock = store_with(6, policy, low_watermark=1.0)
    system = [1] * 4 + [2] * 4  # two blocks three chats start with
    for user in range(3):
        clock.now = float(user)
        put(store, system + [50 + user] * 4)  # and one block of their own each
    for i, one_off in enumerate((9, 8, 7)):  # chains of two blocks, newer than every chat
        clock.now = 3.0 + i
        put(store, [one_off] * 8)
    kept_system = len(reused(store, system + [0]))
    kept_first_one_off = len(reused(store, [9] * 8 + [0]))
    # cost_aware: the system prompt's last block was reused by three chats
    # (F = 2 once its first chat's credit moved down), a one-off's tail by
    # one, so the oldest one-off goes before it; LRU drops the system prompt,
    # the least recent, though every chat would reuse it.
    assert (kept_system, kept_first_one_off) == ((2, 0) if survivor == "system" else (0, 2))
    assert len(reused(store, [7] * 8 + [0])) == 2  # the newest is kept by both


def test_an_evicted_block_is_promoted_back_from_the_disk_tier(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "m", SHAPE, 32, disk_bytes=10 * BLOCK_BYTES)
    store, clock = store_with(2, cold=disk, low_watermark=1.0)
    a = list(range(8))
    put(store, a)
    clock.now = 1
    put(store, [5] * 12)  # 5 blocks for 2: a's leaf, then a's first block, then the new tail go
    assert store.stats.evicted_to_disk == 3 and hashes(a)[0] not in store
    clock.now = 2
    assert reused(store, a + [0]) == [a[:4], a[4:]]
    assert store.stats.promoted_blocks == 2 and disk.reads == 2


def test_the_disk_tier_keeps_its_blocks_across_a_restart(tmp_path: Path) -> None:
    folder = tmp_path / "fingerprint-b4-k32"
    disk = DiskTier(folder, SHAPE, 32, disk_bytes=10 * BLOCK_BYTES)
    tokens = list(range(8))
    hs = hashes(tokens)
    disk.put(hs[0], None, block_for(tokens, 0))
    disk.put(hs[1], hs[0], block_for(tokens, 1))
    disk.close()
    again = DiskTier(folder, SHAPE, 32, disk_bytes=10 * BLOCK_BYTES)
    assert len(again) == 2
    store, _ = store_with(10, cold=again)
    assert reused(store, tokens + [0]) == [tokens[:4], tokens[4:]]
    # Another size of file is another layout: it starts empty rather than misread.
    other = DiskTier(tmp_path / "x", SHAPE, 32, disk_bytes=3 * BLOCK_BYTES)
    assert len(other) == 0


def test_a_full_disk_tier_reuses_its_least_recently_used_slot(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "d", SHAPE, 32, disk_bytes=2 * BLOCK_BYTES)
    blocks = [[i] * 4 for i in range(3)]
    hs = [hashes(b)[0] for b in blocks]
    disk.put(hs[0], None, block_for(blocks[0], 0))
    disk.put(hs[1], None, block_for(blocks[1], 0))
    assert disk.take(hs[0]) is not None  # block 0 used: block 1 is now the oldest
    disk.put(hs[2], None, block_for(blocks[2], 0))
    assert hs[1] not in disk and hs[0] in disk
    assert tokens_of(disk.take(hs[2])) == blocks[2]
