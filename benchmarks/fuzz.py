"""`afd bench fuzz`: schemathesis against a served model, every operation of /openapi.json.

Starts `afd launch` with the given engine flags, reads the server's own OpenAPI document, and
sends each operation `--max-examples` generated requests per generation mode (positive: what
the schema accepts; negative: what it refuses), seeded. Reports per operation and mode the
examples sent and the status codes seen; any 5xx is a failure (exit 1). Writes the result with
`afd.results.write_result` (command, commit, machine, date inside).
"""

from __future__ import annotations

import argparse
import collections
import copy
from typing import Any

from afd.comm.net import free_port


def add_arguments(p: argparse.ArgumentParser) -> None:
    from afd.entrypoints.flags import add_engine_args

    add_engine_args(p, workers=0)
    p.add_argument("--max-examples", type=int, default=200, help="requests per operation and mode")
    p.add_argument(
        "--startup-timeout", type=float, default=300.0, help="seconds for the server to start"
    )
    p.add_argument("--result-name", default="fuzz", help="results/<machine>/<name>.json")
    p.add_argument("--output", default=None, help="write the JSON here instead")
    p.add_argument(
        "--launch-arg",
        action="append",
        default=[],
        help="extra `afd launch` argument, e.g. --launch-arg=--api-key=sk-x",
    )


def fuzz_operation(operation: Any, mode: Any, base: str, max_examples: int, seed: int) -> dict:
    """Send `max_examples` cases of `operation` in `mode`; the status codes seen and the 5xx."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable

    codes: collections.Counter[int] = collections.Counter()
    server_errors: list[dict[str, Any]] = []

    @hseed(seed)
    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: the count stays exact
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Any) -> None:
        response = case.call(base_url=base, timeout=120)
        codes[response.status_code] += 1
        if response.status_code >= 500 and len(server_errors) < 5:
            server_errors.append({"body": repr(case.body)[:500], "answer": response.text[:500]})

    try:
        send()
    except Unsatisfiable:  # negative mode of an operation without parameters: nothing to send
        pass
    return {
        "examples": sum(codes.values()),
        "status_codes": {str(c): n for c, n in sorted(codes.items())},
        "server_errors": sum(n for c, n in codes.items() if c >= 500),
        "server_error_samples": server_errors,
    }


# The served schema bounds integers by int64 and leaves most values free, so nearly every
# example it allows is a 400 (a temperature of -1e300, 10^18 max_tokens) and none generates.
# The "generate" run draws from these ranges instead (what the server accepts, kept short so
# that a CPU server answers hundreds): its examples reach the scheduler and the model.
_BOOL = {"type": "boolean"}
_ID = {"type": "integer", "minimum": 0, "maximum": 99}
_TEXT = {"type": "string", "minLength": 1, "maxLength": 48}
_TOP = {"type": "integer", "minimum": 0, "maximum": 5}
_SAMPLING = {
    "n": {"type": "integer", "minimum": 1, "maximum": 2},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1, "maximum": 50},
    "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "exclusiveMinimum": 0, "maximum": 2},
    "max_tokens": {"type": "integer", "minimum": 1, "maximum": 8},
    "min_tokens": {"type": "integer", "minimum": 0, "maximum": 1},
    "stop": {"type": "array", "items": {**_TEXT, "maxLength": 8}, "maxItems": 4},
    "stop_token_ids": {"type": "array", "items": _ID, "maxItems": 4},
    "stream": _BOOL,
    "ignore_eos": _BOOL,
    "skip_special_tokens": _BOOL,
    "include_stop_str_in_output": _BOOL,
    "user": {"type": "string", "maxLength": 16},
}
_MESSAGE = {
    "type": "object",
    "properties": {"role": {"enum": ["system", "user", "assistant"]}, "content": _TEXT},
    "required": ["role", "content"],
    "additionalProperties": False,
}
_PROMPT = {"anyOf": [_TEXT, {"type": "array", "items": _ID, "minItems": 1, "maxItems": 32}]}
GENERATE = {  # request schema: (properties, required)
    "CompletionRequest": (
        {**_SAMPLING, "prompt": _PROMPT, "echo": _BOOL, "logprobs": _TOP, "prompt_logprobs": _TOP},
        ["prompt", "max_tokens"],
    ),
    "ChatCompletionRequest": (
        {
            **_SAMPLING,
            "messages": {"type": "array", "items": _MESSAGE, "minItems": 1, "maxItems": 3},
            "logprobs": _BOOL,
        },
        ["messages", "max_tokens"],
    ),
    "TokenizeRequest": ({"prompt": _TEXT, "add_special_tokens": _BOOL}, ["prompt"]),
    "DetokenizeRequest": ({"tokens": {"type": "array", "items": _ID, "maxItems": 32}}, ["tokens"]),
}


def pin_model(document: dict, served: str) -> dict:
    """A copy of an OpenAPI document in which every request's `model` (body field or path
    parameter) is the served name: a random name is a 404 before anything else is checked."""
    document = copy.deepcopy(document)
    for schema in document.get("components", {}).get("schemas", {}).values():
        if "model" in schema.get("properties", {}):
            schema["properties"]["model"] = {"enum": [served]}
    for path in document["paths"].values():
        for operation in path.values():
            for param in operation.get("parameters", []):
                if param.get("name") == "model":
                    param["schema"] = {"enum": [served]}
    return document


def generating(document: dict, served: str) -> dict:
    """pin_model, and the request bodies narrowed to GENERATE (fields not named there left out)."""
    document = pin_model(document, served)
    schemas = document["components"]["schemas"]
    for name, (properties, required) in GENERATE.items():
        if name in schemas:
            schemas[name]["properties"] = {"model": {"enum": [served]}, **properties}
            schemas[name]["required"] = required
    return document


def fuzz_all(base: str, max_examples: int, seed: int) -> dict[str, dict[str, dict]]:
    """{"METHOD /path": {run: fuzz_operation(...)}} over the server's /openapi.json, `model`
    pinned to the served name; runs: positive and negative (the served schema), generate
    (positive, from GENERATE)."""
    import httpx
    import schemathesis
    from schemathesis import GenerationMode

    document = httpx.get(f"{base}/openapi.json", timeout=30).json()
    served = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
    served_schema = schemathesis.openapi.from_dict(pin_model(document, served))
    runs = {
        "positive": (served_schema, GenerationMode.POSITIVE),
        "negative": (served_schema, GenerationMode.NEGATIVE),
        "generate": (
            schemathesis.openapi.from_dict(generating(document, served)),
            GenerationMode.POSITIVE,
        ),
    }
    report: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for run_name, (schema, mode) in runs.items():
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            report[label][run_name] = fuzz_operation(operation, mode, base, max_examples, seed)
            print(f"fuzz: {label} {run_name}: {report[label][run_name]}", flush=True)
    return dict(report)


def run(args: argparse.Namespace) -> int:
    """Entry point of `afd bench fuzz`; 0 when no answer was a 5xx."""
    from afd.benchmarks.server import launch_argv, start_server
    from afd.entrypoints.flags import engine_config_from_args
    from afd.results import write_result

    config = engine_config_from_args(args)
    if not 1 <= args.max_examples <= 100_000:
        raise ValueError("--max-examples must be between 1 and 100000")
    port = free_port()
    server = start_server(launch_argv(config, port, args.launch_arg), port)
    try:
        server.wait_healthy(args.startup_timeout)
        report = fuzz_all(server.base, args.max_examples, args.seed or 0)
    finally:
        server.stop()
    errors = sum(m["server_errors"] for modes in report.values() for m in modes.values())
    payload = {
        "fuzz": {
            "tool": "schemathesis",
            "max_examples": args.max_examples,
            "model": args.model,
            "server_errors": errors,
            "operations": report,
        }
    }
    path = write_result(args.result_name, payload, path=args.output, device=args.device)
    print(f"{len(report)} operations, {errors} answers 5xx; results written to {path}")
    return 0 if errors == 0 else 1
