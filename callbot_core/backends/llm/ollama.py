"""The Ollama backend: the native `/api/chat` stream, keeping the server-side timings Ollama reports."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx

from callbot_core.backends.llm import _http
from callbot_core.backends.llm.base import ChatMessage, GenerationParams, Health, Token, Usage
from callbot_core.errors import BackendError, BackendResponseError
from callbot_core.settings import Settings

NS_PER_MS = 1_000_000


class OllamaBackend(_http.RemoteBackend):
    label = "Ollama"
    no_models_hint = "pull one (`ollama pull smollm2:135m`) or set CALLBOT_LLM_MODEL"
    name = "ollama"

    @classmethod
    def from_settings(cls, settings: Settings) -> OllamaBackend:
        return cls(
            settings.ollama_url,
            default_model=settings.llm_model,
            connect_timeout_s=settings.llm_connect_timeout_s,
            read_timeout_s=settings.llm_read_timeout_s,
            context_window=settings.remote_context_window,
        )

    def _payload(self, messages: list[ChatMessage], params: GenerationParams, model: str) -> dict[str, Any]:
        options: dict[str, Any] = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "num_predict": params.max_tokens,
            # Ollama's own default context is smaller than what we budget prompts for; without this
            # it would silently cut the start of a long conversation.
            "num_ctx": self._context_window,
        }
        if params.stop:
            options["stop"] = list(params.stop)
        if params.seed is not None:
            options["seed"] = params.seed
        return {
            "model": model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "stream": True,
            "options": options,
        }

    def stream(
        self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
    ) -> Iterator[Token]:
        payload = self._payload(messages, params, model or self.default_model)
        tokens = 0
        with _http.open_stream(self._client, self._ep, "POST", "/api/chat", json_body=payload) as response:
            lines = response.iter_lines()
            while True:
                try:
                    line = next(lines, None)
                except httpx.HTTPError as exc:
                    raise _http.transport_error(exc, self._ep, self._client, tokens=tokens) from exc
                if line is None:
                    break
                if not line.strip():
                    continue
                chunk = _http.json_object(self._ep, line, "a stream line", tokens)
                text = (chunk.get("message") or {}).get("content") or ""
                if text:
                    tokens += 1
                    yield Token(text)
                if chunk.get("done"):
                    yield Token("", usage=_usage(chunk))
                    return
        raise BackendResponseError(
            f"Ollama at {self._base_url} ended the stream after {tokens} tokens without a final `done` line",
            backend=self.name,
            where=self._base_url,
        )

    def list_models(self) -> list[str]:
        data = _http.get_json(self._client, self._ep, "/api/tags")
        models = data.get("models") if isinstance(data, dict) else None
        if not isinstance(models, list):
            raise _http.bad_data(self._ep, "an /api/tags answer without a model list", json.dumps(data))
        return [str(m.get("name") or m.get("model")) for m in models if isinstance(m, dict)]

    def health(self) -> Health:
        try:
            models = self.list_models()
        except BackendError as exc:
            return Health(False, self.name, self._base_url, str(exc))
        if not models:
            return Health(False, self.name, self._base_url, "reachable, but no models are pulled")
        wanted = self._configured_model
        if wanted and not _has_model(models, wanted):
            return Health(
                False, self.name, self._base_url, f"model {wanted!r} is not pulled; have: {', '.join(models)}"
            )
        return Health(True, self.name, self._base_url, f"{len(models)} models: {', '.join(models)}")


def _has_model(models: list[str], wanted: str) -> bool:
    # Ollama accepts "llama3.2" for the tag "llama3.2:latest".
    return wanted in models or (":" not in wanted and f"{wanted}:latest" in models)


def _ms(value: Any) -> float | None:
    return value / NS_PER_MS if isinstance(value, int | float) else None


def _usage(chunk: dict[str, Any]) -> Usage:
    """Usage from Ollama's final chunk; its durations are nanoseconds."""
    return Usage(
        prompt_tokens=chunk.get("prompt_eval_count"),
        completion_tokens=chunk.get("eval_count"),
        backend_prompt_eval_ms=_ms(chunk.get("prompt_eval_duration")),
        backend_eval_ms=_ms(chunk.get("eval_duration")),
        backend_load_ms=_ms(chunk.get("load_duration")),
        backend_total_ms=_ms(chunk.get("total_duration")),
        finish_reason=chunk.get("done_reason"),
    )
