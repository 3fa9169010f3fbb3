"""OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, /v1/models, /health,
/metrics. Errors use OpenAI's shape; invalid requests are 400, never FastAPI's 422."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from afd.sampling_params import SamplingParams


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "max_tokens": (int,),
    "max_completion_tokens": (int,),
    "n": (int,),
    "seed": (int,),
    "stream": (bool,),
    "ignore_eos": (bool,),
    "stop_token_ids": (list,),
    "model": (str,),
}


def _check_types(body: dict) -> None:
    for name, kinds in _FIELD_TYPES.items():
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) and bool not in kinds:
            raise APIError(400, f"'{name}' must be a number, got {json.dumps(v)}", param=name)
        if not isinstance(v, kinds):
            raise APIError(400, f"'{name}' has the wrong type: {json.dumps(v)[:40]}", param=name)


def sampling_params(body: dict, default_max: int, chat: bool) -> SamplingParams:
    _check_types(body)
    max_tokens = body.get("max_completion_tokens") if chat else None
    max_tokens = max_tokens if max_tokens is not None else body.get("max_tokens")
    logprobs = None
    if chat:
        if body.get("logprobs"):
            logprobs = int(body.get("top_logprobs") or 0)
    elif body.get("logprobs") is not None:
        logprobs = body["logprobs"]
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str | list):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop")
    try:
        return SamplingParams(
            n=body.get("n", 1),
            temperature=body.get("temperature", 1.0),
            top_p=body.get("top_p", 1.0),
            top_k=body.get("top_k", 0),
            min_p=body.get("min_p", 0.0),
            seed=body.get("seed"),
            stop=stop,
            stop_token_ids=body.get("stop_token_ids"),
            max_tokens=max_tokens if max_tokens is not None else default_max,
            ignore_eos=body.get("ignore_eos", False),
            logprobs=logprobs,
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, str(e)) from e


def build_app(engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="AFD", docs_url=None, redoc_url=None)
    metrics = ServerMetrics()

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {e}", "internal_error"), status_code=500)

    async def parse(request: Request) -> dict:
        if api_key is not None:
            auth = request.headers.get("authorization", "")
            if auth != f"Bearer {api_key}":
                raise APIError(
                    401, "invalid API key", "authentication_error", code="invalid_api_key"
                )
        ok, reason = engine.health()
        if not ok:
            raise APIError(503, f"engine is not healthy: {reason}", "service_unavailable")
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != engine.model_name:
            raise APIError(
                404, f"the model '{model}' does not exist", param="model", code="model_not_found"
            )
        return body

    @app.get("/health")
    async def health():
        ok, reason = engine.health()
        return JSONResponse({"status": "ok" if ok else reason}, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": engine.model_name, "object": "model", "created": 0, "owned_by": "afd"}],
        }

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(engine.stats()))

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise APIError(400, "the prompt is empty", param="prompt")
            ids = engine.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            ids = prompt
        else:
            raise APIError(
                400, "'prompt' must be a non-empty string or list of token ids", param="prompt"
            )
        params = sampling_params(body, 16, chat=False)
        return await respond(request, body, ids, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await parse(request)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise APIError(
                400,
                "'messages' must be a non-empty list of {role, content} objects",
                param="messages",
            )
        try:
            text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        params = sampling_params(body, max(1, engine.max_model_len - len(ids)), chat=True)
        return await respond(request, body, ids, params, chat=True)

    async def respond(
        request: Request, body: dict, ids: list[int], params: SamplingParams, chat: bool
    ):
        if len(ids) + (params.max_tokens or 0) > engine.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {engine.max_model_len} tokens; "
                f"the request "
                f"has {len(ids)} prompt tokens and asks for {params.max_tokens} more",
                param="max_tokens" if len(ids) < engine.max_model_len else "prompt",
                code="context_length_exceeded",
            )
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        stream = bool(body.get("stream", False))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        created = int(time.time())
        gen = engine.generate(rid, ids, params)
        start = time.monotonic()
        if not stream:
            final = None
            try:
                async for out in gen:
                    final = out
                    if await request.is_disconnected():
                        await engine.abort(rid)
                        return JSONResponse(
                            error_body("client disconnected", "aborted"), status_code=499
                        )
            except ValueError as e:
                raise APIError(400, str(e)) from e
            except RuntimeError as e:
                raise APIError(500, str(e), "internal_error") from e
            metrics.observe_request(final, start, time.monotonic())
            return full_response(engine, rid, created, final, len(ids), chat)

        async def events():
            sent_text = ["" for _ in range(params.n)]
            sent_tokens = [0] * params.n
            finished = [False] * params.n
            last_t = time.monotonic()
            first = True
            final = None
            try:
                if chat:
                    for i in range(params.n):
                        yield sse(
                            chunk(
                                engine,
                                rid,
                                created,
                                chat,
                                i,
                                {"role": "assistant", "content": ""},
                                None,
                            )
                        )
                async for out in gen:
                    final = out
                    now = time.monotonic()
                    metrics.observe_token(first, now - (start if first else last_t))
                    first, last_t = False, now
                    for c in out.outputs:
                        delta = c.text[len(sent_text[c.index]) :]
                        new_tokens = c.token_ids[sent_tokens[c.index] :]
                        done = c.finish_reason is not None and not finished[c.index]
                        if not delta and not done:
                            continue
                        lp = None
                        if c.logprobs is not None and new_tokens:
                            lp = logprobs_json(
                                engine, c.logprobs[sent_tokens[c.index] :], new_tokens, chat
                            )
                        sent_text[c.index] = c.text
                        sent_tokens[c.index] = len(c.token_ids)
                        finished[c.index] = finished[c.index] or done
                        payload = {"content": delta} if chat else delta
                        yield sse(
                            chunk(
                                engine,
                                rid,
                                created,
                                chat,
                                c.index,
                                payload,
                                c.finish_reason if done else None,
                                lp,
                            )
                        )
                if include_usage and final is not None:
                    yield sse(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created,
                            "model": engine.model_name,
                            "choices": [],
                            "usage": usage(final, len(ids)),
                        }
                    )
                metrics.observe_request(final, start, time.monotonic())
                yield "data: [DONE]\n\n"
            except (ValueError, RuntimeError) as e:
                yield sse(error_body(str(e), "internal_error"))
            finally:
                await gen.aclose()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def chunk(engine, rid, created, chat, index, delta, finish, logprobs=None) -> dict:
    choice = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    choice["delta" if chat else "text"] = delta
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": engine.model_name,
        "choices": [choice],
    }


def usage(out, prompt_tokens: int) -> dict:
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def logprobs_json(engine, entries: list[dict], tokens: list[int], chat: bool):
    tok = engine.tokenizer

    def text(t: int) -> str:
        return tok.decode([t], skip_special_tokens=False)

    if chat:
        return {
            "content": [
                {
                    "token": text(t),
                    "logprob": e.get(t, float("-inf")),
                    "bytes": list(text(t).encode()),
                    "top_logprobs": [
                        {"token": text(i), "logprob": v, "bytes": list(text(i).encode())}
                        for i, v in e.items()
                        if i != t or len(e) == 1
                    ][: max(0, len(e) - 1)],
                }
                for t, e in zip(tokens, entries, strict=False)
            ]
        }
    return {
        "tokens": [text(t) for t in tokens],
        "token_logprobs": [e.get(t) for t, e in zip(tokens, entries, strict=False)],
        "top_logprobs": [{text(i): v for i, v in e.items()} for e in entries],
        "text_offset": [],
    }


def full_response(engine, rid, created, out, prompt_tokens: int, chat: bool) -> dict:
    choices = []
    for c in out.outputs:
        lp = (
            logprobs_json(engine, c.logprobs, c.token_ids, chat) if c.logprobs is not None else None
        )
        choice = {"index": c.index, "finish_reason": c.finish_reason, "logprobs": lp}
        if chat:
            choice["message"] = {"role": "assistant", "content": c.text}
        else:
            choice["text"] = c.text
        choices.append(choice)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": engine.model_name,
        "choices": choices,
        "usage": usage(out, prompt_tokens),
    }


class ServerMetrics:
    """Prometheus text: afd:-prefixed twins of vLLM's metric names."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self):
        self.hist = {
            n: [0] * (len(self.BUCKETS) + 1) + [0.0]
            for n in (
                "time_to_first_token_seconds",
                "inter_token_latency_seconds",
                "e2e_request_latency_seconds",
            )
        }
        self.counters = {
            "prompt_tokens_total": 0,
            "generation_tokens_total": 0,
            "request_success_total": 0,
        }

    def _observe(self, name: str, v: float) -> None:
        h = self.hist[name]
        for i, b in enumerate(self.BUCKETS):
            if v <= b:
                h[i] += 1
        h[len(self.BUCKETS)] += 1
        h[-1] += v

    def observe_token(self, first: bool, dt: float) -> None:
        self._observe("time_to_first_token_seconds" if first else "inter_token_latency_seconds", dt)

    def observe_request(self, out, start: float, end: float) -> None:
        if out is None:
            return
        self._observe("e2e_request_latency_seconds", end - start)
        self.counters["prompt_tokens_total"] += len(out.prompt_token_ids)
        self.counters["generation_tokens_total"] += sum(len(c.token_ids) for c in out.outputs)
        self.counters["request_success_total"] += 1

    def render(self, stats: dict[str, float]) -> str:
        lines = []
        for name, h in self.hist.items():
            lines.append(f"# TYPE afd:{name} histogram")
            for i, b in enumerate(self.BUCKETS):
                lines.append(f'afd:{name}_bucket{{le="{b}"}} {h[i]}')
            lines.append(f'afd:{name}_bucket{{le="+Inf"}} {h[len(self.BUCKETS)]}')
            lines.append(f"afd:{name}_count {h[len(self.BUCKETS)]}")
            lines.append(f"afd:{name}_sum {h[-1]}")
        for name, v in self.counters.items():
            lines += [f"# TYPE afd:{name} counter", f"afd:{name} {v}"]
        for name, v in stats.items():
            if name.startswith("afd_stage_"):
                stage = name.removeprefix("afd_stage_").removesuffix("_seconds")
                lines.append(f'afd:stage_seconds_total{{stage="{stage}"}} {v}')
            else:
                lines += [f"# TYPE afd:{name} gauge", f"afd:{name} {v}"]
        return "\n".join(lines) + "\n"
