"""OpenAI-compatible HTTP API over an EngineClient, as three module-level routers: generation
(/v1/completions, /v1/chat/completions), the tokenizer (/tokenize, /detokenize,
/tokenizer_info when enabled) and the rest (/health, /version, /metrics, /v1/models, and
/openapi.json and /docs, which document the request models of afd.entrypoints.protocol). Each route
reads the engine and settings from `app.state.afd` (an AppState); `build_app` assembles the
routers behind the HTTP guard of afd.entrypoints.serving. Errors have OpenAI's shape (never
FastAPI's 422), and a request whose client went away is aborted in the engine so its KV blocks
are freed."""

from __future__ import annotations

import dataclasses
import hmac
import logging
from collections.abc import Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from afd.comm.net import listen_socket
from afd.entrypoints.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EngineClient,
    TokenizeRequest,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_json_body,
    parse_tokenize_request,
    tokenizer_info,
)
from afd.entrypoints.serving import HTTPGuard, ServerConfig, ServerState, make_server
from afd.entrypoints.serving_base import AppState, auth_digest
from afd.entrypoints.serving_chat import ChatServing
from afd.entrypoints.serving_completion import CompletionServing
from afd.version import __version__

logger = logging.getLogger("afd.entrypoints.server")


async def app_state(request: Request) -> AppState:
    """The AppState of the app serving `request` (async: FastAPI runs sync ones in a thread)."""
    return request.app.state.afd


App = Annotated[AppState, Depends(app_state)]


def check_api_key(request: Request, app: AppState) -> None:
    """Every Authorization header must be exactly 'Bearer KEY' (compared in constant time,
    through digests so the length leaks nothing either)."""
    if app.api_key_digest is None:
        return
    given = [value for name, value in request.scope["headers"] if name == b"authorization"]
    ok = bool(given)
    for value in given:
        ok &= hmac.compare_digest(auth_digest(value), app.api_key_digest)
    if not ok:
        raise APIError(
            401,
            "invalid or missing API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            None,
            "invalid_api_key",
        )


def check_healthy(app: AppState) -> None:
    """503 unless the engine can serve."""
    ok, reason = app.engine.health()
    if not ok:
        raise APIError(503, f"the engine is not healthy: {reason}", "service_unavailable")


async def parse_body(request: Request, app: AppState, parser: Callable) -> Any:
    """Parse the body and run `parser(body, engine, names)` in a worker thread."""
    raw = await request.body()

    def run():
        return parser(parse_json_body(raw), app.engine, app.names)

    return await anyio.to_thread.run_sync(run, limiter=app.parse_limiter)


# the routes parse their bodies themselves (OpenAI-shaped errors, checks beyond the schema), so
# FastAPI cannot see the request models: each POST route names its model for the OpenAPI page
REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest,
    ChatCompletionRequest,
    TokenizeRequest,
    DetokenizeRequest,
)
_SCHEMA_REF = "#/components/schemas/{model}"


def body_of(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    ref = {"$ref": _SCHEMA_REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


# -- OpenAI generation ------------------------------------------------------------------------

# routes returning a dict carry no return annotation: FastAPI would take it for a response
# model and validate every body against it

openai_router = APIRouter()


@openai_router.post("/v1/completions", openapi_extra=body_of(CompletionRequest))
async def create_completion(request: Request, app: App) -> Response:
    check_api_key(request, app)
    check_healthy(app)
    req = await parse_body(request, app, parse_completion_request)
    return await CompletionServing(app, request, req).respond()


@openai_router.post("/v1/chat/completions", openapi_extra=body_of(ChatCompletionRequest))
async def create_chat_completion(request: Request, app: App) -> Response:
    check_api_key(request, app)
    check_healthy(app)
    req = await parse_body(request, app, parse_chat_request)
    return await ChatServing(app, request, req).respond()


# -- tokenizer --------------------------------------------------------------------------------

tokenizer_router = APIRouter()


@tokenizer_router.post("/tokenize", openapi_extra=body_of(TokenizeRequest))
async def tokenize(request: Request, app: App):
    check_api_key(request, app)
    return await parse_body(request, app, parse_tokenize_request)


@tokenizer_router.post("/detokenize", openapi_extra=body_of(DetokenizeRequest))
async def detokenize(request: Request, app: App):
    check_api_key(request, app)
    return await parse_body(request, app, parse_detokenize_request)


@tokenizer_router.get("/tokenizer_info")
async def get_tokenizer_info(request: Request, app: App):
    if not app.config.enable_tokenizer_info_endpoint:
        raise APIError(
            404,
            "GET /tokenizer_info is off: start the server with "
            "--enable-tokenizer-info-endpoint (it shows the tokenizer's configuration and "
            "chat template)",
            code="not_found",
        )
    check_api_key(request, app)
    return tokenizer_info(app.engine.tokenizer)


# -- health, version, metrics, models ---------------------------------------------------------

admin_router = APIRouter()


@admin_router.get("/health")
async def health(app: App) -> JSONResponse:
    ok, reason = app.engine.health()
    if ok and reason == "ok":
        return JSONResponse({"status": "ok"})
    if ok:  # a worker is being replaced: requests wait a little, nothing is lost
        return JSONResponse({"status": "recovering", "reason": reason})
    return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)


@admin_router.get("/version")
async def version():
    return {"version": __version__}


@admin_router.get("/metrics")
async def metrics_page(request: Request, app: App) -> Response:
    if app.config.protect_metrics:
        check_api_key(request, app)
    app.metrics.refresh(app.engine)
    return Response(app.metrics.render(), media_type=app.metrics.content_type)


def model_card(app: AppState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": app.created,
        "owned_by": "afd",
        "root": app.engine.model_root,
        "parent": None,
        "max_model_len": app.engine.max_model_len,
        "permission": [],
    }


@admin_router.get("/v1/models")
async def list_models(request: Request, app: App):
    check_api_key(request, app)
    return {"object": "list", "data": [model_card(app, n) for n in app.names]}


@admin_router.get("/v1/models/{model:path}")
async def get_model(request: Request, app: App, model: str):
    check_api_key(request, app)
    if model not in app.names:
        raise APIError(
            404, f"the model '{model}' does not exist", param="model", code="model_not_found"
        )
    return model_card(app, model)


# -- the API's own description --------------------------------------------------------------

docs_router = APIRouter()


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's OpenAPI document with the request models the routes name (built once)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=__version__, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            model_schema = model.model_json_schema(ref_template=_SCHEMA_REF)
            components.update(model_schema.pop("$defs", {}))
            components[model.__name__] = model_schema
        app.openapi_schema = schema
    return app.openapi_schema


@docs_router.get("/openapi.json", include_in_schema=False)
async def openapi_page(request: Request, app: App) -> JSONResponse:
    check_api_key(request, app)
    return JSONResponse(openapi_schema(request.app))


@docs_router.get("/docs", include_in_schema=False)
async def docs_page(request: Request, app: App) -> HTMLResponse:
    check_api_key(request, app)
    return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} API")


# -- errors -----------------------------------------------------------------------------------


def error_response(request: Request, e: APIError) -> JSONResponse:
    """OpenAI's error body for `e`, counted in the metrics."""
    app: AppState = request.app.state.afd
    app.metrics.count_error(e.status)
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(request, e)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errors = e.errors()
    where = ".".join(str(x) for x in errors[0].get("loc", ())) if errors else None
    message = errors[0].get("msg", "invalid request") if errors else "invalid request"
    return error_response(request, APIError(400, f"{where}: {message}" if where else message))


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(request, APIError(e.status_code, str(e.detail), code=code))


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    logger.exception("unhandled error in a request")
    return error_response(request, APIError(500, f"internal server error: {e}", "server_error"))


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: no FastAPI 422, no HTML, no traceback."""
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)


# -- the app ----------------------------------------------------------------------------------

ROUTERS = (openai_router, tokenizer_router, admin_router, docs_router)


def build_app(
    engine: EngineClient,
    config: ServerConfig | None = None,
    *,
    disconnect_poll_s: float = 0.1,
    state: ServerState | None = None,
    **settings: Any,
) -> FastAPI:
    """The FastAPI app behind AFD's HTTP guard (afd.entrypoints.serving); `config` (or its
    fields as keywords, e.g. api_key="...") sets the limits, the key and the served names."""
    config = dataclasses.replace(config or ServerConfig(), **settings)
    shared = AppState.create(engine, config, state, disconnect_poll_s)
    # FastAPI's own /openapi.json and /docs would skip the API key: docs_router serves them
    app = FastAPI(
        title="AFD",
        description="OpenAI-compatible API of AFD (attention-FFN disaggregated MoE serving)",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.openapi = lambda: openapi_schema(app)
    app.state.afd = shared
    app.add_middleware(
        HTTPGuard, config=config, state=shared.server, on_error=shared.metrics.count_error
    )
    add_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    return app


def serve(engine: EngineClient, host: str = "127.0.0.1", port: int = 8000, **settings) -> None:
    """Serve the API with uvicorn until SIGINT/SIGTERM (ServerConfig fields as keywords)."""
    config = ServerConfig(host=host, port=port, **settings)
    state = ServerState()
    app = build_app(engine, config, state=state)
    sock = listen_socket(config.host, config.port)
    try:
        make_server(app, config, state).run(sockets=[sock])
    finally:
        sock.close()
