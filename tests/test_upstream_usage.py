"""Reading usage and cache figures from a backend's answer."""

from __future__ import annotations

import json

from kvern.upstream.usage import parse_response


def answer(cached: object, completion: object = 3) -> bytes:
    return json.dumps(
        {
            "choices": [{"index": 0, "message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": 10,
                "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": cached},
            },
        }
    ).encode()


def test_reported_counts_are_read_as_given() -> None:
    facts = parse_response(answer(8), "application/json")
    assert (facts.reported_cached_tokens, facts.completion_tokens) == (8, 3)
    assert facts.finish_reason == "stop" and facts.completion_text == "hi"


def test_a_negative_or_huge_count_is_no_figure_at_all() -> None:
    for broken in (-5, 2**63, 2**70, True, "8"):
        facts = parse_response(answer(broken, completion=broken), "application/json")
        assert facts.reported_cached_tokens is None, broken
        assert facts.completion_tokens is None, broken


def test_one_event_nested_past_the_parser_loses_only_itself() -> None:
    deep = "[" * 5000 + "]" * 5000
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}}
    body = f"data: {deep}\n\ndata: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode()
    facts = parse_response(body, "text/event-stream")
    assert (facts.upstream_prompt_tokens, facts.completion_tokens) == (7, 2)
    assert parse_response(deep.encode(), "application/json").completion_tokens is None
