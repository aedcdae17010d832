"""Prometheus metrics of the serving layer, served at ``GET /metrics`` (text format).

State is kept in its own ``CollectorRegistry`` (one per server), fed from two places:
the edges (HTTP and gRPC handlers count requests by route and status) and the engine
loop thread (tokens, latencies, batch sizes and the runtime's per-step MoE traffic,
through the ``EngineLoop`` observer hooks). docs/serving.md lists every metric.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the HTTP layer)
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from raymoe.deploy.admission import WaitTooLongError
from raymoe.workers.engine import Completion, Engine, StepResult

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# steps kept in the engine's RuntimeStats.per_step (it grows by one per step otherwise)
KEEP_STEPS = 1024


class ServingMetrics:
    """All serving metrics; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, model: str, moe_layer_ids: tuple[int, ...] = ()):
        self.registry = r = CollectorRegistry()
        self.model, self.moe_layer_ids = model, tuple(moe_layer_ids)
        self.requests = Counter("raymoe_requests", "Requests answered, by route and HTTP status (gRPC: mapped)",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("raymoe_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generation_tokens = Counter("raymoe_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("raymoe_request_finished", "Engine requests finished, by reason (stop, length, abort)",
                                ["reason"], registry=r)
        self.ttft = Histogram("raymoe_time_to_first_token_seconds", "Arrival at the engine to first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("raymoe_inter_token_latency_seconds", "Time between two tokens of a request",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("raymoe_e2e_request_latency_seconds", "Arrival at the engine to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        self.queue_depth = Gauge("raymoe_queue_depth", "Requests waiting for a KV-cache slot", registry=r)
        self.running = Gauge("raymoe_running_sequences", "Sequences in the running batch", registry=r)
        self.open_streams = Gauge("raymoe_open_streams", "Requests the engine loop holds (queued or running)",
                                  registry=r)
        self.refused = Counter("raymoe_admission_refused", "Requests refused at admission (429), by reason "
                               "(queue_full: batching.max_queue; wait: batching.max_wait_s)", ["reason"], registry=r)
        self.step_sequences = Histogram("raymoe_step_sequences", "Sequences computed together in one engine step",
                                        buckets=BATCH_BUCKETS, registry=r)
        self.step_tokens = Counter("raymoe_step_tokens", "Tokens computed by engine steps (prefill + decode)",
                                   registry=r)
        self.two_batch_steps = Counter("raymoe_two_batch_steps", "Decode steps run as two interleaved micro-batches "
                                       "(batching.overlap)", registry=r)
        self.step_seconds = Histogram("raymoe_step_seconds", "Wall time of one engine step", buckets=ITL_BUCKETS,
                                      registry=r)
        self.engine_up = Gauge("raymoe_engine_up", "1 while the engine loop is stepping", registry=r)
        self.recoveries = Counter("raymoe_recoveries", "Steps recovered after an actor died or hung (RELIABILITY.md)",
                                  registry=r)
        self.recovery_seconds = Histogram("raymoe_recovery_seconds", "From noticing a failed step to the process "
                                          "group being whole again", buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300),
                                          registry=r)
        self._recoveries_seen = 0
        self._kv_metrics(r)
        self._expert_metrics(r)
        self._rank_pairs: dict[int, list[int]] = {}  # MoE layer index -> cumulative pairs per rank
        self._transitions: dict[int, list[int]] = {}  # MoE layer index -> cumulative [hosted, stayed]

    def _kv_metrics(self, r: CollectorRegistry) -> None:
        self.kv_blocks_used = Gauge("raymoe_kv_blocks_used", "KV-cache blocks held by sequences", registry=r)
        self.kv_blocks_total = Gauge("raymoe_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.kv_usage = Gauge("raymoe_kv_cache_usage_perc", "Fraction of the KV-cache blocks held (0 to 1)",
                              registry=r)
        self.prefix_queries = Counter("raymoe_prefix_cache_queries", "Prompt tokens of sequences that joined the "
                                      "batch (looked up in the prefix cache)", registry=r)
        self.prefix_hits = Counter("raymoe_prefix_cache_hits", "Of those, tokens found in cached blocks (their "
                                   "prefill skipped)", registry=r)
        self.preemptions = Counter("raymoe_preemptions", "Sequences preempted when the KV-cache pool ran out "
                                   "(recomputed later)", registry=r)
        self.step_kind_tokens = Histogram("raymoe_step_batched_tokens", "Tokens of one engine step, by kind "
                                          "(prefill: prompt chunks; decode: one per decoding sequence)", ["kind"],
                                          buckets=BATCH_BUCKETS + (2048, 4096, 8192), registry=r)
        self._scheduler_seen = (0, 0, 0)  # (queried, hit, preemptions) already counted

    def _kv_state(self, scheduler) -> None:
        pool, stats = scheduler.pool, scheduler.stats
        self.kv_blocks_used.set(pool.num_used)
        self.kv_blocks_total.set(pool.num_blocks)
        self.kv_usage.set(pool.num_used / pool.num_blocks)
        queried, hit, preempted = self._scheduler_seen
        self.prefix_queries.inc(stats.queried - queried)
        self.prefix_hits.inc(stats.hit - hit)
        self.preemptions.inc(stats.preemptions - preempted)
        self._scheduler_seen = (stats.queried, stats.hit, stats.preemptions)

    def _expert_metrics(self, r: CollectorRegistry) -> None:
        self.rank_load = Counter("raymoe_expert_rank_load", "(token, expert) pairs each expert rank computed",
                                 ["layer", "rank"], registry=r)
        self.rank_rows = Counter("raymoe_expert_rank_rows", "Token rows each expert rank received",
                                 ["layer", "rank"], registry=r)
        self.balancedness = Gauge("raymoe_expert_balancedness",
                                  "mean / max expert-rank load of a MoE layer since start (1.0 = perfect)",
                                  ["layer"], registry=r)
        self.dispatch_bytes = Counter("raymoe_dispatch_bytes", "Bytes of token rows sent to expert ranks",
                                      ["layer"], registry=r)
        self.combine_bytes = Counter("raymoe_combine_bytes", "Bytes of expert outputs sent back", ["layer"],
                                     registry=r)
        self.merge_bytes = Counter("raymoe_merge_bytes", "Coherent layout: bytes of partial outputs sent to a "
                                   "token's next home", ["layer"], registry=r)
        self.hosted = Counter("raymoe_hosted_tokens", "Coherent layout: tokens routed at a MoE layer", ["layer"],
                              registry=r)
        self.stayed = Counter("raymoe_stayed_tokens", "Coherent layout: of those, tokens whose next home is the "
                              "rank they were on", ["layer"], registry=r)
        self.cross_device = Gauge("raymoe_cross_device_fraction",
                                  "Share of tokens whose next home is on another device, since start (coherent "
                                  "layout; the runtime reports no such transitions for the disaggregated one)",
                                  ["layer"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- the edges ------------------------------------------------------------------
    def count_request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def count_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    # -- EngineLoop observer (loop thread) -------------------------------------------
    def on_token(self, stream, now: float) -> None:
        self.generation_tokens.inc()
        if stream.first_token_at is None:
            self.ttft.observe(now - stream.arrived)
        else:
            self.itl.observe(now - stream.last_token_at)

    def on_finish(self, stream, completion: Completion, now: float) -> None:
        self.finished.labels(completion.finish_reason).inc()
        self.e2e.observe(now - stream.arrived)

    def on_abort(self, stream) -> None:
        self.finished.labels("abort").inc()

    def on_load(self, waiting: int, running: int, streams: int | None = None) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)
        if streams is not None:
            self.open_streams.set(streams)

    def on_refuse(self, error: Exception) -> None:
        self.refused.labels("wait" if isinstance(error, WaitTooLongError) else "queue_full").inc()

    def on_step(self, engine: Engine, result: StepResult, seconds: float) -> None:
        self.on_load(len(engine.scheduler.waiting), len(engine.scheduler.running))
        self.step_seconds.observe(seconds)
        self._kv_state(engine.scheduler)
        stats = engine.scheduler.stats  # the last step's prefill and decode tokens
        if stats.prefill or stats.decode:
            for kind in ("prefill", "decode"):
                self.step_kind_tokens.labels(kind).observe(getattr(stats, kind))
        recoveries = getattr(engine, "recoveries", ())
        for record in recoveries[self._recoveries_seen:]:
            self.recoveries.inc()
            self.recovery_seconds.observe(record.seconds)
        self._recoveries_seen = len(recoveries)
        per_step = engine.stats.per_step
        if not per_step:
            return
        step = per_step[-1]
        self.step_sequences.observe(step.sequences)
        self.step_tokens.inc(step.tokens)
        if step.micro_batches == 2:
            self.two_batch_steps.inc()
        for index, layer in enumerate(step.layers):
            self._layer_traffic(index, layer)
        if len(per_step) > 2 * KEEP_STEPS:
            del per_step[:-KEEP_STEPS]

    def _layer_traffic(self, index: int, layer) -> None:
        name = str(self.moe_layer_ids[index]) if index < len(self.moe_layer_ids) else str(index)
        totals = self._rank_pairs.setdefault(index, [0] * len(layer.pairs_per_rank))
        for rank, (pairs, rows) in enumerate(zip(layer.pairs_per_rank, layer.rows_per_rank)):
            totals[rank] += pairs
            if pairs:
                self.rank_load.labels(name, str(rank)).inc(pairs)
            if rows:
                self.rank_rows.labels(name, str(rank)).inc(rows)
        peak = max(totals)
        self.balancedness.labels(name).set(sum(totals) / len(totals) / peak if peak else 1.0)
        self.dispatch_bytes.labels(name).inc(layer.dispatch_bytes)
        self.combine_bytes.labels(name).inc(layer.combine_bytes)
        hosted, stayed = layer.hosted_tokens, layer.stayed_tokens
        if hosted:  # the coherent layout reports where tokens go next
            self.merge_bytes.labels(name).inc(layer.merge_bytes)
            self.hosted.labels(name).inc(hosted)
            self.stayed.labels(name).inc(stayed)
            totals = self._transitions.setdefault(index, [0, 0])
            totals[0], totals[1] = totals[0] + hosted, totals[1] + stayed
            self.cross_device.labels(name).set(1.0 - totals[1] / totals[0])
