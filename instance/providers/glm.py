"""GLM on Z.ai's OpenAI-compatible endpoint: adds thinking mode and the built-in web search."""

from __future__ import annotations

from typing import Any

from instance.providers.base import ChatRequest, OpenAICompatibleProvider


class GLMProvider(OpenAICompatibleProvider):
    name = "glm"
    label = "GLM (Z.ai)"

    def payload(self, request: ChatRequest) -> tuple[dict[str, Any], list[str]]:
        body, notes = super().payload(request)
        if request.thinking is not None and request.model.thinking:
            body["thinking"] = {"type": "enabled" if request.thinking else "disabled"}
        if request.web_search:
            if request.model.web_search:
                body["tools"] = [
                    {"type": "web_search", "web_search": {"enable": True, "search_result": True}}
                ]
            else:
                notes.append(f"web search is not available for {request.model.name}; answered without it")
        return body, notes
