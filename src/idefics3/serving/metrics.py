"""The server's Prometheus metrics, in a registry of its own (two servers in one process do not collide).

Counters and histograms are updated where things happen: requests by outcome in the HTTP layer, tokens and
latencies on the engine thread (runner.py). Gauges that are a view of the engine's state (queue length, running
sequences, KV-cache use, cache hit rates) are read when /metrics is scraped, from a snapshot the engine thread
publishes after each step, so a scrape never touches the engine.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, float]]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("idefics3_requests", "Finished requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.prompt_tokens = Counter("idefics3_prompt_tokens", "Prompt tokens of admitted sequences", registry=r)
        self.generated_tokens = Counter("idefics3_generated_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("idefics3_time_to_first_token_seconds", "From a request's arrival at the engine to "
                              "its first token", buckets=_LATENCY, registry=r)
        self.itl = Histogram("idefics3_inter_token_latency_seconds", "Between two tokens of one sequence",
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("idefics3_request_seconds", "From arrival at the engine to the last token",
                             buckets=_LATENCY, registry=r)
        self.prefill_chunk = Histogram("idefics3_prefill_chunk_seconds", "Engine steps that did prefill work "
                                       "(one chunk plus the decode step before it)", buckets=_ITL, registry=r)
        self._snapshot = snapshot
        self._gauges = {
            "waiting": Gauge("idefics3_queue_length", "Requests waiting for a slot", registry=r),
            "running": Gauge("idefics3_running_sequences", "Sequences prefilling or decoding", registry=r),
            "kv_usage": Gauge("idefics3_kv_cache_usage_ratio", "Positions of the KV cache held by running "
                              "sequences / all positions", registry=r),
            "prefix_hit_rate": Gauge("idefics3_prefix_cache_hit_rate", "Admitted prompts that reused a cached "
                                     "prefix / prompts looked up", registry=r),
            "prefix_reused_tokens": Gauge("idefics3_prefix_cache_reused_tokens", "Prompt tokens taken from the "
                                          "prefix cache (total)", registry=r),
            "prefix_token_rate": Gauge("idefics3_prefix_cache_token_hit_rate", "Prompt tokens taken from the "
                                       "prefix cache / prompt tokens looked up", registry=r),
            "encoder_hit_rate": Gauge("idefics3_encoder_cache_hit_rate", "Image frames found in the encoder "
                                      "cache / frames looked up", registry=r),
            "encoder_hits": Gauge("idefics3_encoder_cache_hits", "Image frames found in the encoder cache (total)",
                                  registry=r),
        }

    def render(self) -> bytes:
        for name, value in self._snapshot().items():
            if name in self._gauges:
                self._gauges[name].set(value)
        return generate_latest(self.registry)
