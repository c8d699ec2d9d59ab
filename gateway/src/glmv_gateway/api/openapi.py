"""The OpenAPI document completed with what the routes read by hand: the turn and job request
bodies (audio media types, multipart, JSON), every error answer with its schema, the API key scheme
and the links a client follows from a created session (turn, history, delete)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from glmv_gateway.api.audio_input import FILE_TYPES
from glmv_gateway.schemas import SessionSettings, TextTurn

ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["status", "message"],
            "properties": {
                "status": {"type": "integer", "minimum": 400, "maximum": 599},
                "message": {"type": "string"},
                "component": {"type": "string", "description": "redis, tokenizer, lm or decoder"},
            },
        }
    },
}
WHY = {
    "400": "Bad input (malformed audio, JSON, parameters); the message says what is wrong",
    "401": "Missing or invalid API key",
    "404": "No such session or job for this API key",
    "409": "The session is running another turn, or the job is not in a state for this",
    "410": "The job's results have expired",
    "413": "The body or the audio is over the configured limit",
    "415": "Unsupported Content-Type, or a body that is not what its Content-Type says",
    "422": "The body does not match the schema",
    "429": "This API key already runs its maximum number of concurrent turns",
    "502": "A model service failed during the turn (non-streamed answer)",
    "503": "Redis or a model service is unavailable; retry (Retry-After)",
}
RAW_AUDIO = ("audio/pcm", "audio/basic", "audio/pcmu", "audio/pcma")
BINARY = {"schema": {"type": "string", "format": "binary"}}


def _errors(*codes: str) -> dict[str, Any]:
    return {
        code: {"description": WHY[code], "content": {"application/json": {"schema": ERROR}}} for code in codes
    }


def _turn_body() -> dict[str, Any]:
    audio = {media: BINARY for media in (*FILE_TYPES, *RAW_AUDIO)}
    return {
        "required": True,
        "description": "User audio as the whole body (WAV/FLAC/Ogg files; raw audio/pcm needs "
        "`;rate=<Hz>;encoding=pcm16|float32|mulaw|alaw`, audio/basic is 8 kHz mu-law), a multipart "
        "form with an `audio` file part or a `text` field, or JSON text. At least 80 ms of audio.",
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/TextTurn"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "audio": {"type": "string", "format": "binary"},
                        "text": {"type": "string", "minLength": 1, "maxLength": 20000},
                    },
                }
            },
            **audio,
        },
    }


def _job_body() -> dict[str, Any]:
    options = {"anyOf": [{"$ref": "#/components/schemas/SessionSettings"}, {"type": "null"}]}
    webhook = {
        "type": ["string", "null"],
        "maxLength": 2048,
        "description": "http(s) URL notified when done",
    }
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["text"],
                    "properties": {
                        "text": {"type": "string", "minLength": 1},
                        "options": options,
                        "webhook_url": webhook,
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "audio": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                        "options": {"type": "string", "description": "SessionSettings as a JSON object"},
                        "webhook_url": {"type": "string", "maxLength": 2048},
                    },
                }
            },
        },
    }


SESSION_LINKS = {
    "GetSession": {"operationId": "get_session", "parameters": {"session_id": "$response.body#/id"}},
    "PatchSession": {"operationId": "patch_session", "parameters": {"session_id": "$response.body#/id"}},
    "CreateTurn": {"operationId": "create_turn", "parameters": {"session_id": "$response.body#/id"}},
    "History": {"operationId": "history", "parameters": {"session_id": "$response.body#/id"}},
    "DeleteSession": {"operationId": "delete_session", "parameters": {"session_id": "$response.body#/id"}},
}
JOB_LINKS = {
    name: {"operationId": operation, "parameters": {"job_id": "$response.body#/id"}}
    for name, operation in (
        ("GetJob", "get_job"),
        ("CancelJob", "cancel_job"),
        ("JobAudio", "job_audio"),
        ("JobTranscript", "job_transcript"),
    )
}

# per (method, path): the error answers it can give besides 401 and 503
ERRORS: dict[tuple[str, str], tuple[str, ...]] = {
    ("post", "/v1/sessions"): ("400", "404", "409", "413", "422"),
    ("post", "/v1/realtime/client_secrets"): ("400", "422"),
    ("get", "/v1/sessions/{session_id}"): ("404",),
    ("patch", "/v1/sessions/{session_id}"): ("400", "404", "413", "422"),
    ("delete", "/v1/sessions/{session_id}"): ("404",),
    ("get", "/v1/sessions/{session_id}/history"): ("404",),
    ("post", "/v1/sessions/{session_id}/turns"): ("400", "404", "409", "413", "415", "422", "429", "502"),
    ("post", "/v1/jobs"): ("400", "413", "415", "422"),
    ("get", "/v1/jobs/{job_id}"): ("404",),
    ("delete", "/v1/jobs/{job_id}"): ("404", "409"),
    ("get", "/v1/jobs/{job_id}/audio"): ("404", "409", "410"),
    ("get", "/v1/jobs/{job_id}/transcript"): ("404", "409", "410"),
}
OPERATION_IDS = {
    ("post", "/v1/sessions"): "create_session",
    ("get", "/v1/sessions/{session_id}"): "get_session",
    ("patch", "/v1/sessions/{session_id}"): "patch_session",
    ("delete", "/v1/sessions/{session_id}"): "delete_session",
    ("get", "/v1/sessions/{session_id}/history"): "history",
    ("post", "/v1/sessions/{session_id}/turns"): "create_turn",
    ("post", "/v1/jobs"): "submit_job",
    ("get", "/v1/jobs/{job_id}"): "get_job",
    ("delete", "/v1/jobs/{job_id}"): "cancel_job",
    ("get", "/v1/jobs/{job_id}/audio"): "job_audio",
    ("get", "/v1/jobs/{job_id}/transcript"): "job_transcript",
}
ID_PATTERN = "^[0-9a-f]{32}$"


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    for model in (TextTurn, SessionSettings):
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in definition.pop("$defs", {}).items():
            schemas.setdefault(name, sub)
        schemas.setdefault(model.__name__, definition)
    components["securitySchemes"] = {"ApiKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            key = (method, path)
            if key in OPERATION_IDS:
                operation["operationId"] = OPERATION_IDS[key]
            for parameter in operation.get("parameters", []):
                if parameter["name"] in ("session_id", "job_id"):
                    parameter["schema"] = {"type": "string", "pattern": ID_PATTERN}
            if not path.startswith("/v1/"):
                continue
            if path.startswith("/v1/telephony/"):  # called by the carrier: its signature, not our key
                operation["security"] = []
                for parameter in operation.get("parameters", []):
                    if parameter["in"] == "header":
                        parameter["required"] = False
                for answer in operation.get("responses", {}).values():
                    if "content" in answer:
                        answer["content"] = {"application/xml": {"schema": {"type": "string"}}}
                continue
            operation["security"] = [{"ApiKey": []}]
            responses = operation.setdefault("responses", {})
            generated_422 = ("422",) if "422" in responses else ()  # FastAPI's, in our error schema
            responses.update(_errors("401", "503", *generated_422, *ERRORS.get(key, ())))
    paths = schema["paths"]
    paths["/metrics"]["get"]["responses"]["200"] = {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    ready = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}
    paths["/readyz"]["get"]["responses"] = {
        "200": {"description": "Redis and every model service ready and compatible",
                "content": {"application/json": {"schema": ready}}},
        "503": {"description": "Not ready: the body says which part is not",
                "content": {"application/json": {"schema": ready}}},
    }
    audio = paths["/v1/jobs/{job_id}/audio"]["get"]["responses"]
    audio["200"] = {"description": "The reply as WAV", "content": {"audio/wav": BINARY}}
    turn = paths["/v1/sessions/{session_id}/turns"]["post"]
    turn["requestBody"] = _turn_body()
    turn["responses"]["200"] = {
        "description": "NDJSON events (stream=true, the default) or one JSON answer (stream=false)",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
    paths["/v1/jobs"]["post"]["requestBody"] = _job_body()
    paths["/v1/sessions"]["post"]["responses"]["201"]["links"] = SESSION_LINKS
    paths["/v1/jobs"]["post"]["responses"]["202"]["links"] = JOB_LINKS
    return schema


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
