"""Conversation builders shared by tokenizer, template and benchmark code."""

from __future__ import annotations

from typing import Any

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"}},
            "required": ["city"],
        },
    },
}


def growing_chat(
    turns: int, *, system: str | None = "You are a helpful assistant."
) -> list[list[dict[str, Any]]]:
    """The request bodies' ``messages`` of a chat, one list per turn, each re-sending history."""
    history: list[dict[str, Any]] = []
    if system is not None:
        history.append({"role": "system", "content": system})
    requests = []
    for turn in range(turns):
        history = history + [
            {
                "role": "user",
                "content": f"Question {turn}: explain step {turn} of the plan, with ünïcödé 🦙 "
                f"and numbers {turn * 1234567}. " * (1 + turn % 3),
            }
        ]
        requests.append(history)
        history = history + [
            {"role": "assistant", "content": f"Answer {turn}: here is step {turn}.\n\n- a\n- b\n"}
        ]
    return requests


def odd_conversations() -> list[dict[str, Any]]:
    """Requests with the shapes that trip renderers: parts, tools, tool calls, unicode, blanks."""
    return [
        {"messages": [{"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " "}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief.\n\n\n"},
                {"role": "user", "content": "  leading spaces and trailing  "},
                {"role": "assistant", "content": "Sure."},
                {"role": "user", "content": "Ünïcödé — 日本語 — 🦙🦙\ttabs\r\nCRLF"},
            ]
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Describe this picture."},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "text", "text": "Briefly."},
                    ],
                }
            ]
        },
        {
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "tools": [WEATHER_TOOL],
        },
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
            ],
            "tools": [WEATHER_TOOL],
        },
        {"messages": [{"role": "user", "content": "<|im_end|> and <|eot_id|> typed by a user"}]},
    ]
