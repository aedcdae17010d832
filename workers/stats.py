"""Runtime statistics: traffic per MoE layer and time per phase, per step and cumulative.

Counts are exact: collectives and bytes come from the tallies of ``workers/dispatch/collectives.py``
(counted at the call), rows and pairs from the routing; times are wall clock seconds
measured where the work happens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from raymoe.workers.dispatch.collectives import Tally

PHASES = ("attention", "dispatch", "experts", "combine", "coherence")


@dataclass
class LayerTraffic:
    """One MoE layer of one step (bytes count what crosses ranks).

    Disaggregated layout: as seen by the front-end. Coherent layout: each rank reports
    its own part and the coordinator adds them up.
    """

    pairs_per_rank: list[int]  # (token, expert) pairs each expert rank computed
    rows_per_rank: list[int]  # token rows each expert rank received (a token is sent once per rank)
    dispatch_bytes: int  # token rows sent to expert ranks
    combine_bytes: int  # disaggregated: partial outputs sent back to the front-end
    metadata_bytes: int  # split sizes exchanged
    token_collectives: int  # all-to-alls that carry tokens (disaggregated: 2; coherent: 1 top-1, 2 top-k)
    metadata_collectives: int  # small split-size exchanges (1)
    merge_bytes: int = 0  # coherent, top-k > 1: partial outputs sent to the token's next home
    hosted_tokens: int = 0  # coherent: tokens routed at this layer
    stayed_tokens: int = 0  # coherent: of those, tokens whose next home is the rank they were on

    def followed_by(self, later: "LayerTraffic") -> "LayerTraffic":
        """This rank's part of the layer and its later part (another micro-batch's
        collectives of the same layer): bytes, counts and collectives all add."""
        summed = self.add(later)
        summed.pairs_per_rank = _sum_lists(self.pairs_per_rank, later.pairs_per_rank)
        summed.rows_per_rank = _sum_lists(self.rows_per_rank, later.rows_per_rank)
        summed.token_collectives = self.token_collectives + later.token_collectives
        summed.metadata_collectives = self.metadata_collectives + later.metadata_collectives
        return summed

    @classmethod
    def of(cls, pairs_per_rank: list[int], rows_per_rank: list[int], moved: Tally, **coherent) -> "LayerTraffic":
        """One rank's view of a layer: its routing counts and what its collectives tallied
        during the layer (``moved``); ``coherent``: ``hosted_tokens``, ``stayed_tokens``."""
        return cls(pairs_per_rank, rows_per_rank, dispatch_bytes=moved.bytes["dispatch"],
                   combine_bytes=moved.bytes["combine"], metadata_bytes=moved.bytes["metadata"],
                   token_collectives=moved.calls["dispatch"] + moved.calls["combine"] + moved.calls["merge"],
                   metadata_collectives=moved.calls["metadata"], merge_bytes=moved.bytes["merge"], **coherent)

    def add(self, other: "LayerTraffic") -> "LayerTraffic":
        """Element-wise sum (the ranks' parts of one layer, or steps); collective counts are
        per layer, the same on every rank, so they are kept, not added."""
        return LayerTraffic(
            [a + b for a, b in zip(self.pairs_per_rank, other.pairs_per_rank)],
            [a + b for a, b in zip(self.rows_per_rank, other.rows_per_rank)],
            self.dispatch_bytes + other.dispatch_bytes, self.combine_bytes + other.combine_bytes,
            self.metadata_bytes + other.metadata_bytes, self.token_collectives, self.metadata_collectives,
            self.merge_bytes + other.merge_bytes, self.hosted_tokens + other.hosted_tokens,
            self.stayed_tokens + other.stayed_tokens,
        )


def _sum_lists(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)] if a and b else list(a or b)


@dataclass
class StepStats:
    tokens: int
    sequences: int
    layers: list[LayerTraffic]
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    messages: int = 0  # step messages the coordinator sent its actors (over their channels; no Ray call)
    coherence_bytes: int = 0  # coherent layout: KV rows all-gathered to keep every rank's context
    coherence_collectives: int = 0
    micro_batches: int = 1  # 2: run as two interleaved micro-batches (workers/overlap.py)

    def as_dict(self) -> dict:
        return asdict(self)


class RuntimeStats:
    """Cumulative view over steps; ``per_step`` keeps every step."""

    def __init__(self):
        self.per_step: list[StepStats] = []

    def add(self, step: StepStats) -> None:
        self.per_step.append(step)

    @property
    def steps(self) -> int:
        return len(self.per_step)

    def totals(self) -> dict:
        """Sums over all steps; per-layer lists are summed element-wise."""
        if not self.per_step:
            return {}
        num_layers = len(self.per_step[0].layers)
        layers = []
        for index in range(num_layers):
            rows = [s.layers[index] for s in self.per_step]
            layers.append({
                "pairs_per_rank": [sum(v) for v in zip(*(r.pairs_per_rank for r in rows))],
                "rows_per_rank": [sum(v) for v in zip(*(r.rows_per_rank for r in rows))],
                **{key: sum(getattr(r, key) for r in rows) for key in
                   ("dispatch_bytes", "combine_bytes", "merge_bytes", "metadata_bytes", "token_collectives",
                    "metadata_collectives", "hosted_tokens", "stayed_tokens")},
            })
        return {
            "steps": self.steps,
            "tokens": sum(s.tokens for s in self.per_step),
            "messages": sum(s.messages for s in self.per_step),
            "coherence_bytes": sum(s.coherence_bytes for s in self.per_step),
            "coherence_collectives": sum(s.coherence_collectives for s in self.per_step),
            "seconds": {p: sum(s.seconds[p] for s in self.per_step) for p in PHASES},
            "layers": layers,
        }

    def table(self, moe_layers: tuple[int, ...]) -> str:
        from raymoe.workers.tables import format_table

        t = self.totals()
        if not t:
            return "no steps"
        steps = max(t["steps"], 1)
        header = ["layer", "tokens/rank", "rows/rank", "stayed", "dispatch B", "combine B", "merge B", "meta B",
                  "a2a/step", "meta/step"]
        rows = [[layer, "/".join(map(str, L["pairs_per_rank"])), "/".join(map(str, L["rows_per_rank"])),
                 f"{L['stayed_tokens'] / L['hosted_tokens']:.0%}" if L["hosted_tokens"] else "-",
                 L["dispatch_bytes"], L["combine_bytes"], L["merge_bytes"], L["metadata_bytes"],
                 f"{L['token_collectives'] / steps:g}", f"{L['metadata_collectives'] / steps:g}"]
                for layer, L in zip(moe_layers, t["layers"])]
        total = sum(t["seconds"].values()) or 1.0
        times = "  ".join(f"{p} {t['seconds'][p]:.3f}s ({100 * t['seconds'][p] / total:.0f}%)" for p in PHASES)
        moved = sum(L["dispatch_bytes"] + L["combine_bytes"] + L["merge_bytes"] + L["metadata_bytes"]
                    for L in t["layers"]) + t["coherence_bytes"]
        coherence = (f" ({t['coherence_bytes']} for KV coherence in {t['coherence_collectives']} collectives)"
                     if t["coherence_collectives"] else "")
        return (f"runtime stats: {t['steps']} steps, {t['tokens']} tokens, {t['messages']} step messages; "
                f"{moved} bytes across ranks{coherence}\n" + format_table(header, rows) + f"\ntime: {times}")
