"""Synthetic tool-calling dialogues: the demo's agent domain.

A dialogue is: a system message listing a few tools (one JSON schema per line), a user request,
one or two assistant tool calls each answered by a tool result, and a final assistant answer
that reads the numbers back from the results. Calls are JSON inside `<tool_call>` tags:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Lima", "unit": "celsius"}}
    </tool_call>

Tool results are computed (the calculator is exact, currency rates are fixed per dialogue), so
the final answer is always consistent with what the tools returned.
"""

from __future__ import annotations

import json
import random

from bebop_spec.demo.chat import Message

CITIES = [
    "Paris", "Tokyo", "Lima", "Cairo", "Oslo", "Lagos", "Sydney", "Toronto", "Mumbai", "Berlin",
    "Madrid", "Seoul", "Nairobi", "Denver", "Hanoi", "Dublin", "Quito", "Perth", "Vienna", "Austin",
]  # fmt: skip
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "clear"]
CURRENCIES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "INR": 83.0, "CAD": 1.36}
TOPICS = [
    "the tallest mountain in Africa", "how bees make honey", "the history of chess",
    "why the sky is blue", "the largest desert", "how vaccines work", "the speed of sound",
    "who invented the printing press", "the deepest lake", "how tides work",
]  # fmt: skip
EVENTS = ["Team sync", "Dentist", "Lunch with Ana", "Project review", "Gym", "Call with Raj"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

TOOLS = {
    "get_weather": {"description": "Current weather for a city",
                    "parameters": {"city": "string", "unit": "celsius|fahrenheit"}},
    "calculator": {"description": "Evaluate an arithmetic expression",
                   "parameters": {"expression": "string"}},
    "web_search": {"description": "Search the web and return the top result",
                   "parameters": {"query": "string"}},
    "create_event": {"description": "Add an event to the calendar",
                     "parameters": {"title": "string", "day": "string", "time": "HH:MM"}},
    "convert_currency": {"description": "Convert an amount between currencies",
                         "parameters": {"amount": "number", "from": "string", "to": "string"}},
}  # fmt: skip


def tool_call(name: str, arguments: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"


def system_prompt(tool_names: list[str]) -> str:
    lines = [json.dumps({"name": n, **TOOLS[n]}) for n in tool_names]
    return (
        "You are a helpful assistant. You can call these tools:\n" + "\n".join(lines) + "\n"
        'To call a tool, reply with <tool_call>{"name": ..., "arguments": ...}</tool_call>.'
    )


def _weather(rng: random.Random, city: str, unit: str) -> dict:
    celsius = rng.randint(-10, 35)
    temp = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    return {"city": city, "temperature": temp, "unit": unit, "condition": rng.choice(CONDITIONS)}


def _weather_one(rng: random.Random) -> tuple[str, list[tuple[str, dict, dict]], str]:
    city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
    ask = rng.choice(["What's the weather in {c}?", "Is it cold in {c} right now?",
                      "How warm is it in {c} today?"]).format(c=city)  # fmt: skip
    r = _weather(rng, city, unit)
    deg = "°C" if unit == "celsius" else "°F"
    answer = f"It is {r['temperature']}{deg} and {r['condition']} in {city} right now."
    return ask, [("get_weather", {"city": city, "unit": unit}, r)], answer


def _weather_two(rng: random.Random) -> tuple[str, list[tuple[str, dict, dict]], str]:
    a, b = rng.sample(CITIES, 2)
    ra, rb = _weather(rng, a, "celsius"), _weather(rng, b, "celsius")
    ask = f"Which is warmer right now, {a} or {b}?"
    ta, tb = ra["temperature"], rb["temperature"]
    verdict = f"{a} is warmer" if ta > tb else f"{b} is warmer" if tb > ta else "both are as warm"
    answer = f"{a} is {ta}°C and {b} is {tb}°C, so {verdict}."
    calls = [("get_weather", {"city": a, "unit": "celsius"}, ra),
             ("get_weather", {"city": b, "unit": "celsius"}, rb)]  # fmt: skip
    return ask, calls, answer


def _calculator(rng: random.Random) -> tuple[str, list[tuple[str, dict, dict]], str]:
    x, y = rng.randint(2, 999), rng.randint(2, 99)
    op = rng.choice(["+", "-", "*"])
    expr = f"{x} {op} {y}"
    value = eval(expr)  # expr is built from two ints and one operator above
    ask = rng.choice(["What is {e}?", "Can you compute {e} for me?", "Calculate {e}."]).format(
        e=expr
    )
    return ask, [("calculator", {"expression": expr}, {"result": value})], f"{expr} = {value}."


def _search(rng: random.Random) -> tuple[str, list[tuple[str, dict, dict]], str]:
    topic = rng.choice(TOPICS)
    n = rng.randint(1, 9)
    ask = rng.choice(["Tell me about {t}.", "Can you look up {t}?", "I want to know {t}."])
    ask = ask.format(t=topic)
    title = f"{topic[0].upper()}{topic[1:]} - Encyclopedia"
    result = {"title": title, "snippet": f"An overview of {topic}.", "minutes": n}
    answer = f'I found an article titled "{title}" ({n} min read). {result["snippet"]}'
    return ask, [("web_search", {"query": topic}, result)], answer


def _event(rng: random.Random) -> tuple[str, list[tuple[str, dict, dict]], str]:
    title, day = rng.choice(EVENTS), rng.choice(DAYS)
    time = f"{rng.randint(7, 19):02d}:{rng.choice(['00', '15', '30', '45'])}"
    ask = f"Put '{title}' in my calendar on {day} at {time}."
    event_id = rng.randint(1000, 9999)
    args = {"title": title, "day": day, "time": time}
    answer = f"Done: '{title}' is booked for {day} at {time} (event {event_id})."
    return ask, [("create_event", args, {"status": "created", "id": event_id})], answer


def _currency(rng: random.Random) -> tuple[str, list[tuple[str, dict, dict]], str]:
    src, dst = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([5, 10, 20, 50, 100, 250, 1000]) * rng.randint(1, 4)
    value = round(amount * CURRENCIES[dst] / CURRENCIES[src], 2)
    ask = f"How much is {amount} {src} in {dst}?"
    args = {"amount": amount, "from": src, "to": dst}
    return ask, [("convert_currency", args, {"result": value})], f"{amount} {src} is {value} {dst}."


SCENARIOS = (_weather_one, _weather_two, _calculator, _search, _event, _currency)


def make_agent_dialogue(rng: random.Random) -> list[Message]:
    """One dialogue: system (tools), user, (assistant call, tool result)+, assistant answer."""
    ask, calls, answer = rng.choice(SCENARIOS)(rng)
    needed = sorted({name for name, _, _ in calls})
    others = [n for n in TOOLS if n not in needed]
    tools = needed + rng.sample(others, rng.randint(1, 2))
    rng.shuffle(tools)
    messages = [
        {"role": "system", "content": system_prompt(tools)},
        {"role": "user", "content": ask},
    ]
    for name, args, result in calls:
        messages.append({"role": "assistant", "content": tool_call(name, args)})
        messages.append({"role": "tool", "content": json.dumps(result)})
    messages.append({"role": "assistant", "content": answer})
    return messages
