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


def fuzz_all(base: str, max_examples: int, seed: int) -> dict[str, dict[str, dict]]:
    """{"METHOD /path": {mode: fuzz_operation(...)}} over the server's /openapi.json."""
    import schemathesis
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    report: dict[str, dict[str, dict]] = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        report[label] = {
            mode.value: fuzz_operation(operation, mode, base, max_examples, seed)
            for mode in GenerationMode
        }
        print(f"fuzz: {label}: {report[label]}", flush=True)
    return report


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
