"""KV page allocator and KV pool capacity planning.

The KV pool is `num_pages` fixed-size pages. Page 0 is never handed out: the jitted steps
write the K/V of padding tokens there, so real pages are never clobbered by bucket padding.
Pages are owned by one sequence at a time (no prefix sharing); `free` returns them at once.

Capacity: `plan_num_pages` divides (free device memory x fraction) by the bytes one page
costs over all layers, keeping at least `step_bytes` (the largest step's working memory) out
of the pool when the fraction's headroom is smaller than that; `kv_bytes_per_token` gives
that cost for a bf16 cache (2 bytes per element) and an INT4 cache (half a byte per element
plus an f32 scale and zero per group).
"""

from __future__ import annotations

import dataclasses
import os

from comet_jax.engine.kv_cache import KVCacheConfig

SCRATCH_PAGE = 0


class OutOfPagesError(RuntimeError):
    """Raised when an allocation asks for more pages than are free."""


class BlockAllocator:
    """Free list of KV pages 1..num_pages-1 with ownership tracking.

    `allocate(n, owner)` returns n page ids (LIFO free list, so recently freed pages are
    reused first); `free(pages, owner)` checks that each page is owned by `owner`.
    """

    def __init__(self, num_pages: int):
        if not isinstance(num_pages, int) or num_pages < 2:
            raise ValueError(f"num_pages={num_pages!r} must be an int >= 2 (page 0 is scratch)")
        self.num_pages = num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._owner: dict[int, object] = {}

    @property
    def capacity(self) -> int:
        """Pages that can ever be allocated (all but the scratch page)."""
        return self.num_pages - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int, owner: object) -> list[int]:
        if n < 0:
            raise ValueError(f"n={n} pages; expected >= 0")
        if n > len(self._free):
            raise OutOfPagesError(f"asked for {n} pages, {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        for p in pages:
            self._owner[p] = owner
        return pages

    def free(self, pages: list[int], owner: object) -> None:
        for p in pages:
            if self._owner.get(p, None) is not owner:
                raise ValueError(f"page {p} is not owned by {owner!r} (double free?)")
        for p in pages:
            del self._owner[p]
            self._free.append(p)

    def owners(self) -> set[object]:
        return set(self._owner.values())


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def free_device_memory(device=None) -> int:
    """Free bytes on `device` (accelerator memory stats; host RAM on CPU)."""
    import jax

    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 4 << 30


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
    free_bytes: int
    fraction: float
    page_size: int
    bytes_per_token: int
    num_pages: int  # including the scratch page
    tokens_bf16: int  # tokens that would fit with a bf16 cache in the same budget
    tokens_int4: int  # ... with an INT4 cache
    window_bytes: int = 0  # recent-window rings reserved out of the budget
    recent_window: int = 0
    step_bytes: int = 0  # working memory of the largest step, kept out of the pool

    @property
    def step_bound(self) -> bool:
        """Whether the step's working memory, not the fraction, set the pool's budget."""
        return self.free_bytes - self.step_bytes < int(self.free_bytes * self.fraction)

    @property
    def tokens(self) -> int:
        return (self.num_pages - 1) * self.page_size

    def describe(self) -> str:
        return (
            f"KV pool: {self.num_pages - 1} pages x {self.page_size} tokens = {self.tokens} tokens "
            f"({self.bytes_per_token} B/token, {self.fraction:.0%} of "
            f"{self.free_bytes / 2**30:.2f} GiB free); same budget holds {self.tokens_bf16} "
            f"tokens in bf16 vs {self.tokens_int4} in KV4"
            + (
                f"; {self.window_bytes / 2**20:.1f} MiB reserved for the {self.recent_window}-token "
                "float recent window"
                if self.window_bytes
                else ""
            )
            + (
                f"; {self.step_bytes / 2**30:.2f} GiB kept for the largest step's working "
                "memory, which set the budget"
                if self.step_bound
                else ""
            )
        )


def plan_num_pages(
    *, free_bytes: int, fraction: float, cache_config: KVCacheConfig, step_bytes: int = 0
) -> CapacityPlan:
    """Pages (incl. scratch) of a KV pool filling `fraction` of `free_bytes`, or less where
    that would leave under `step_bytes` (the working memory of the engine's largest step:
    its activations and the sampler's [batch, vocab] temporaries) for everything else.

    cache_config gives the layout (layers, heads, page size, dtype); its num_pages is ignored.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r} must be in (0, 1]")
    if step_bytes < 0:
        raise ValueError(f"step_bytes={step_bytes!r} must be >= 0")
    # The recent-window rings (fixed per running sequence) come out of the budget first.
    budget = min(int(free_bytes * fraction), free_bytes - step_bytes) - cache_config.window_bytes
    page = cache_config.page_size
    per_tok = {
        d: dataclasses.replace(cache_config, dtype=d, recent_window=0).bytes_per_token
        for d in ("bf16", "int4")
    }
    bpt = cache_config.bytes_per_token
    num_pages = cache_config.pages_for_budget(budget)
    if num_pages < 2:
        raise ValueError(
            f"{budget} bytes hold {num_pages} KV pages of {page} tokens at {bpt} B/token; "
            "need at least 2 (give more memory or a smaller model)"
        )
    return CapacityPlan(
        free_bytes=free_bytes,
        fraction=fraction,
        page_size=page,
        bytes_per_token=bpt,
        num_pages=int(num_pages),
        tokens_bf16=budget // per_tok["bf16"] // page * page,
        tokens_int4=budget // per_tok["int4"] // page * page,
        window_bytes=cache_config.window_bytes,
        recent_window=cache_config.recent_window,
        step_bytes=step_bytes,
    )
