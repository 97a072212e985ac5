"""Generate the tool-calling example dataset: weather, unit conversion and calculator calls in messages format.

Each row is one OpenAI-style conversation: the user asks a question, the assistant calls one of three
functions (``get_weather``, ``convert_units``, ``calculate``), the tool returns a JSON result and the
assistant answers from it. Every row carries the three schemas in its ``tools`` column, so the files
train with any chat template that renders tools (``data.chat_template: chatml-tools`` for SmolLM2).

The held-out split tests generalisation, not recall: its questions use phrasings that never occur in
train, and its cities, numbers and expressions are drawn from pools that train never uses. The metric
is objective: the call's name and arguments must equal the reference as parsed JSON.

Output is deterministic for a given ``--seed``; the eval split has its own random stream, so changing
``--train-size`` never changes it.

Usage::

    python scripts/make_tool_data.py --seed 0 --out data/tools
"""

from __future__ import annotations

import argparse
import json
import operator
import random
from pathlib import Path

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"}, "from_unit": {"type": "string"}, "to_unit": {"type": "string"}},
            "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "calculate", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}},
]

# Disjoint pools: eval arguments never appear in train.
TRAIN_CITIES = ["Paris", "Berlin", "Madrid", "Tokyo", "Toronto", "Cairo", "Sydney", "Chicago", "Mumbai", "Lisbon",
                "Vienna", "Dublin", "Seoul", "Denver", "Nairobi", "Prague", "Boston", "Athens", "Lagos", "Austin",
                "Helsinki", "Warsaw", "Bogota", "Manila", "Havana", "Zagreb", "Quito", "Osaka", "Perth", "Geneva"]
EVAL_CITIES = ["Oslo", "Rome", "Lima", "Hanoi", "Dallas", "Munich", "Kyoto", "Accra", "Porto", "Seattle",
               "Budapest", "Santiago"]
UNITS = {  # unit code -> (words users write, factor to the base unit of its kind, kind)
    "km": (["kilometers", "km", "kilometres"], 1000.0, "length"),
    "mi": (["miles", "mi"], 1609.344, "length"),
    "m": (["meters", "metres", "m"], 1.0, "length"),
    "ft": (["feet", "ft"], 0.3048, "length"),
    "kg": (["kilograms", "kg", "kilos"], 1.0, "mass"),
    "lb": (["pounds", "lb", "lbs"], 0.45359237, "mass"),
    "l": (["liters", "litres", "l"], 1.0, "volume"),
    "gal": (["gallons", "gal"], 3.785411784, "volume"),
}
UNIT_WORDS = {"celsius": ["Celsius", "degrees Celsius", "°C"], "fahrenheit": ["Fahrenheit", "degrees Fahrenheit", "°F"]}
APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
OPERATORS = {"+": ["plus", "+", "added to"], "-": ["minus", "-"], "*": ["times", "*", "multiplied by"], "/": ["divided by", "/"]}

TRAIN_PHRASINGS = {
    "weather": ["What's the weather in {city} in {unit}?", "How warm is it in {city}? Give it in {unit}.",
                "Tell me the temperature in {city} in {unit}.", "Is it cold in {city} right now? Use {unit}.",
                "Weather for {city}, please, in {unit}."],
    "convert": ["Convert {value} {from_word} to {to_word}.", "How many {to_word} is {value} {from_word}?",
                "What is {value} {from_word} in {to_word}?", "Please turn {value} {from_word} into {to_word}."],
    "calculate": ["What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "Can you work out {a} {op} {b}?",
                  "Compute {a} {op} {b} for me."],
}
EVAL_PHRASINGS = {
    "weather": ["I'm flying to {city} tomorrow; what's it like there now, in {unit}?",
                "Could you check the current temperature for {city} ({unit})?"],
    "convert": ["I have {value} {from_word}. How much is that in {to_word}?", "Express {value} {from_word} as {to_word}."],
    "calculate": ["Quick sum: {a} {op} {b} equals what?", "I need the result of {a} {op} {b}."],
}


def weather_row(rng: random.Random, phrasings: list[str], cities: list[str]) -> dict:
    city, unit = rng.choice(cities), rng.choice(["celsius", "fahrenheit"])
    celsius = rng.randint(-10, 35)
    temperature = celsius if unit == "celsius" else round(celsius * 9 / 5 + 32)
    question = rng.choice(phrasings).format(city=city, unit=rng.choice(UNIT_WORDS[unit]))
    result = {"city": city, "temperature": temperature, "unit": unit, "conditions": rng.choice(["sunny", "cloudy", "rainy", "windy"])}
    symbol = "°C" if unit == "celsius" else "°F"
    answer = f"It is {temperature}{symbol} and {result['conditions']} in {city}."
    return conversation(question, "get_weather", {"city": city, "unit": unit}, result, answer)


def convert_row(rng: random.Random, phrasings: list[str], values: list[int]) -> dict:
    from_unit = rng.choice(list(UNITS))
    kind = UNITS[from_unit][2]
    to_unit = rng.choice([u for u in UNITS if UNITS[u][2] == kind and u != from_unit])
    value = rng.choice(values)
    converted = round(value * UNITS[from_unit][1] / UNITS[to_unit][1], 2)
    question = rng.choice(phrasings).format(value=value, from_word=rng.choice(UNITS[from_unit][0]), to_word=rng.choice(UNITS[to_unit][0]))
    answer = f"{value} {from_unit} is {converted} {to_unit}."
    return conversation(question, "convert_units", {"value": value, "from_unit": from_unit, "to_unit": to_unit},
                        {"result": converted, "unit": to_unit}, answer)


def calculate_row(rng: random.Random, phrasings: list[str], values: list[int]) -> dict:
    a, b, op = rng.choice(values), rng.choice(values), rng.choice(list(OPERATORS))
    expression = f"{a} {op} {b}"
    result = round(APPLY[op](a, b), 4)
    question = rng.choice(phrasings).format(a=a, b=b, op=rng.choice(OPERATORS[op]))
    return conversation(question, "calculate", {"expression": expression}, {"result": result}, f"{expression} = {result}.")


def conversation(question: str, name: str, arguments: dict, result: dict, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "content": json.dumps(result)},
            {"role": "assistant", "content": answer},
        ],
        "tools": TOOLS,
    }


def make_rows(rng: random.Random, count: int, phrasings: dict, cities: list[str], values: list[int]) -> list[dict]:
    makers = [lambda: weather_row(rng, phrasings["weather"], cities), lambda: convert_row(rng, phrasings["convert"], values),
              lambda: calculate_row(rng, phrasings["calculate"], values)]
    return [makers[index % 3]() for index in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--eval-size", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("data/tools"))
    args = parser.parse_args()
    numbers = list(range(2, 200))
    random.Random(args.seed).shuffle(numbers)
    eval_values, train_values = sorted(numbers[:40]), sorted(numbers[40:])
    train = make_rows(random.Random(args.seed), args.train_size, TRAIN_PHRASINGS, TRAIN_CITIES, train_values)
    held_out = make_rows(random.Random(args.seed + 1), args.eval_size, EVAL_PHRASINGS, EVAL_CITIES, eval_values)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", held_out)):
        (args.out / name).write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(train)} train and {len(held_out)} eval rows to {args.out}")


if __name__ == "__main__":
    main()
