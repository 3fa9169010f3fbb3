"""Figures derived from committed result files (counts, ranges, best rows, ratios), so that a
claim such as "22 of the 28 rows are within ±20%" is computed, not typed. check_docs renders
them: a results comment line `derive NAME: PATH [PATH ...]` makes `DERIVES[NAME](files)` the
data of the templates after it (docs/results.md)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Result = dict[str, Any]
WITHIN = 0.2  # the accuracy band the docs report: |prediction error| <= 20%


def rows(result: Result) -> list[Result]:
    """A pipeline result's measured configurations: its disaggregated runs, then its colocated
    rows, each with a `label` (`1A1F, m = 2, K = 4`, `colocated, K = 1`)."""
    topo = result.get("topology", {})
    a, f = topo.get("attention_workers", 1), topo.get("expert_workers", 1)
    out = [{**r, "label": f"{a}A{f}F, m = {r['m']}, K = {r['num_scheduler_steps']}"}
           for r in result["runs"]]  # fmt: skip
    out += [{**r, "label": f"colocated, K = {r['num_scheduler_steps']}", "m": None}
            for r in result.get("colocated", [])]  # fmt: skip
    return out


def _span(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "max": max(values)}


def _words(values) -> str:
    """`63 and 384`, `1, 2 and 4`: a short list as prose."""
    text = [str(v) for v in sorted(set(values))]
    return text[0] if len(text) == 1 else ", ".join(text[:-1]) + " and " + text[-1]


def _errors(own: list[Result]) -> Result:
    """One model's prediction errors: over all rows, the disaggregated and colocated ones, and
    per number of micro-batches."""
    err = lambda rs: _span([r["prediction_error"] for r in rs]) if rs else None  # noqa: E731
    by_m = {str(m): err([r for r in own if r["m"] == m]) for m in {r["m"] for r in own} if m}
    return {
        "error": err(own),
        "disaggregated": err([r for r in own if r["m"] is not None]),
        "colocated": err([r for r in own if r["m"] is None]),
        "by_m": by_m,
        "rows": len(own),
        "within_20pct": sum(abs(r["prediction_error"]) <= WITHIN for r in own),
    }


def accuracy(files: list[Result]) -> Result:
    """Predicted against measured over the rows of pipeline results run with `--profile`: how
    many rows are within ±20%, the ranges they cover, and each model's error ranges."""
    every = [(res, r) for res in files for r in rows(res)]
    errors = [r["prediction_error"] for _, r in every]
    return {
        "band": WITHIN,
        "rows": len(every),
        "within_20pct": sum(abs(e) <= WITHIN for e in errors),
        "error": _span(errors),
        "models": {res["model"]: _errors(rows(res)) for res in files},
        "model_count": len(files),
        "m": _span([r["m"] for _, r in every if r["m"] is not None]),
        "k_text": _words(r["num_scheduler_steps"] for _, r in every),
        "batch": _span([res["batch_size_per_attention_worker"] for res, _ in every]),
        "contexts_text": _words(round(r["predicted"]["context"]) for _, r in every),
    }


def best(files: list[Result]) -> Result:
    """One pipeline result's best rows (over all, disaggregated, colocated), how many
    configurations it measured, and how uneven its two sides are."""
    (result,) = files
    measured = rows(result)
    fastest = lambda rs: max(rs, key=lambda r: r["decode_tokens_per_s"])  # noqa: E731
    disaggregated = [r for r in measured if r["m"] is not None]
    colocated = [r for r in measured if r["m"] is None]
    out = {
        "model": result["model"],
        "batch": result["batch_size_per_attention_worker"],
        "configurations": len(measured),
        "best": fastest(measured),
        "best_disaggregated": fastest(disaggregated),
        "balance": balance(result),
    }
    if colocated:
        out["best_colocated"] = fastest(colocated)
        out["colocated_over_disaggregated"] = (
            out["best_colocated"]["decode_tokens_per_s"]
            / out["best_disaggregated"]["decode_tokens_per_s"]
        )
    return out


def _plan_key(plan: Result) -> tuple[bool, int, int]:
    colocated = int(plan.get("num-attention-workers", 1)) == 0
    m = 1 if colocated else int(plan.get("num-micro-batches", 1))
    return colocated, m, int(plan.get("num-scheduler-steps", 1))


def _row_key(row: Result) -> tuple[bool, int, int]:
    return row["m"] is None, row["m"] or 1, row["num_scheduler_steps"]


def choice(files: list[Result]) -> Result:
    """Pairs (plan YAML, pipeline result measured at its batch): the planned configuration's
    measured row against the best measured row, per model and over all."""
    if len(files) % 2:
        raise ValueError("choice: give (plan YAML, pipeline result) pairs")
    models = []
    for plan, result in zip(files[::2], files[1::2], strict=True):
        planned = [r for r in rows(result) if _row_key(r) == _plan_key(plan)]
        if not planned:
            raise KeyError(f"the pipeline result has no row for the plan's {_plan_key(plan)}")
        summary = best([result])
        ratio = planned[0]["decode_tokens_per_s"] / summary["best"]["decode_tokens_per_s"]
        models.append({**summary, "plan": planned[0], "plan_over_best": ratio})
    shortfall = [1 - m["plan_over_best"] for m in models]
    counts = {m["configurations"] for m in models}
    return {
        "models": models,
        "shortfall": _span(shortfall),
        "configurations": counts.pop() if len(counts) == 1 else None,
    }


def balance(result: Result) -> Result:
    """How uneven the two sides of a pipeline result are: the heavier side's compute over the
    lighter's (a factor >= 1), the attention/expert ratio, and the light side's bubble at m = 1
    and at m >= 2."""
    runs = result["runs"]
    ratio = [r["attention_expert_balance"] for r in runs]
    light = "expert" if sum(ratio) / len(ratio) > 1 else "attention"
    return {
        "attention_over_expert": _span(ratio),
        "heavier_factor": _span([max(x, 1 / x) for x in ratio]),
        "light_side": light,
        "light_bubble_m1": _span([r["bubble_fraction"][light] for r in runs if r["m"] == 1]),
        "light_bubble_m2_up": _span([r["bubble_fraction"][light] for r in runs if r["m"] >= 2]),
    }


def sides(files: list[Result]) -> Result:
    """Per side, how far each worker's measured compute per decode step is from the predicted
    busy time (measured / predicted - 1) over the disaggregated runs of pipeline results: at
    m = 1 (the sides never overlap) and at m >= 2."""
    runs = [r for res in files for r in res["runs"]]
    off = lambda side, rs: _span(  # noqa: E731
        [r[side]["compute_s"] / r["predicted"]["stages_s"][side] - 1 for r in rs]
    )
    return {
        side: {"m1": off(side, [r for r in runs if r["m"] == 1]),
               "m2_up": off(side, [r for r in runs if r["m"] >= 2])}
        for side in ("attention", "expert")
    }  # fmt: skip


def published(files: list[Result]) -> Result:
    """The published operating points' residuals (afd plan --published): their size range."""
    points = [p for res in files for p in res["points"]]
    return {"points": len(points), "abs_residual": _span([abs(p["residual"]) for p in points])}


DERIVES: dict[str, Callable[[list[Result]], Result]] = {
    "accuracy": accuracy,
    "best": best,
    "choice": choice,
    "published": published,
    "sides": sides,
}
