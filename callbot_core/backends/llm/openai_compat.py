"""The OpenAI-compatible backend: `/chat/completions` streamed as server-sent events.

Works with any server that speaks the OpenAI chat API (llama-cpp-python's server, vLLM, LM Studio,
llama.cpp's llama-server, OpenAI itself). `base_url` includes the version prefix, e.g.
http://127.0.0.1:8000/v1.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from callbot_core.backends.llm import _http
from callbot_core.backends.llm.base import ChatMessage, GenerationParams, Health, Token, Usage
from callbot_core.errors import BackendError, BackendResponseError
from callbot_core.settings import Settings

_AUTH_HINTS = {
    401: "the API key was refused; check CALLBOT_OPENAI_API_KEY",
    403: "the API key was refused for this request; check CALLBOT_OPENAI_API_KEY",
}


class OpenAICompatBackend(_http.RemoteBackend):
    label = "OpenAI-compatible server"
    no_models_hint = "set CALLBOT_LLM_MODEL"
    name = "openai"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        default_model: str | None = None,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 60.0,
        context_window: int = 4096,
    ) -> None:
        super().__init__(
            base_url,
            default_model=default_model,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            context_window=context_window,
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAICompatBackend:
        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return cls(
            settings.openai_base_url,
            api_key=key or None,
            default_model=settings.llm_model,
            connect_timeout_s=settings.llm_connect_timeout_s,
            read_timeout_s=settings.llm_read_timeout_s,
            context_window=settings.remote_context_window,
        )

    def _payload(self, messages: list[ChatMessage], params: GenerationParams, model: str) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            # Without this the stream carries no token counts at all.
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.stop:
            payload["stop"] = list(params.stop)
        if params.seed is not None:
            payload["seed"] = params.seed
        return payload

    def stream(
        self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
    ) -> Iterator[Token]:
        payload = self._payload(messages, params, model or self.default_model)
        chunks = 0
        usage: dict[str, Any] | None = None
        finish_reason: str | None = None
        done = False
        with _http.open_stream(
            self._client, self._ep, "POST", "/chat/completions", json_body=payload, hints=_AUTH_HINTS
        ) as response:
            lines = response.iter_lines()
            while not done:
                try:
                    line = next(lines, None)
                except httpx.HTTPError as exc:
                    raise _http.transport_error(exc, self._ep, self._client, tokens=chunks) from exc
                if line is None:
                    break
                # SSE: only `data:` lines matter; blank lines, comments and `event:` lines are framing.
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = _http.json_object(self._ep, data, "an event", chunks)
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text:
                        chunks += 1
                        yield Token(text)
                    if choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
        # Some servers close without `[DONE]`; a finish_reason is as good a sign the reply is whole.
        if not done and finish_reason is None:
            raise BackendResponseError(
                f"OpenAI-compatible server at {self._base_url} ended the stream after {chunks} tokens "
                "without finishing it",
                backend=self.name,
                where=self._base_url,
            )
        yield Token("", usage=_usage(usage, chunks, finish_reason))

    def list_models(self) -> list[str]:
        data = _http.get_json(self._client, self._ep, "/models", hints=_AUTH_HINTS)
        models = data.get("data") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise _http.bad_data(self._ep, "a /models answer without a model list", json.dumps(data))
        return [str(m["id"]) for m in models if isinstance(m, dict) and m.get("id")]

    def health(self) -> Health:
        try:
            models = self.list_models()
        except BackendError as exc:
            return Health(False, self.name, self._base_url, str(exc))
        if not models and not self._configured_model:
            return Health(False, self.name, self._base_url, "reachable, but it lists no models")
        return Health(True, self.name, self._base_url, f"{len(models)} models: {', '.join(models)}")


def _usage(reported: dict[str, Any] | None, chunks: int, finish_reason: str | None) -> Usage:
    if reported is None:
        # The server sent no usage: each content chunk is one token on every server we know of.
        return Usage(prompt_tokens=None, completion_tokens=chunks, finish_reason=finish_reason)
    return Usage(
        prompt_tokens=reported.get("prompt_tokens"),
        completion_tokens=reported.get("completion_tokens"),
        finish_reason=finish_reason,
    )
