"""Balancers side by side on an emulated fleet, each on the same arrival trace.

Six emulated llama-servers run in one helper process (this module with
--serve-fleet), olla in another, and the load generator in this one. For each
load level and balancer the fleet and the router start afresh (cold KV caches,
no remembered conversations) and replay the same precomputed trace: multi-turn
chats sharing a long system prompt, and one-shot prompts.

Capacity, per model: the sum over its endpoints of slots / (mean output tokens x
decode_ms + mean uncached prompt tokens x prefill_ms), assuming every chat turn
re-processes only what its conversation's previous turn did not leave in the
KV cache (the first turn: all but the shared system prompt) and one-shots are
processed in full. The fleet's capacity is the arrival rate at which the first
model's pool is full; a load level is a fraction of it.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.routing [--duration 40] [--quick]

Writes bench/results/routing.md and routing.png (--quick writes to a temporary directory).
"""
