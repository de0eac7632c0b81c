"""Kimi K2 on Moonshot's OpenAI-compatible endpoint.

Moonshot accepts temperatures in [0, 1] only, so larger values are clamped rather than
rejected. Its web search is a tool-call round trip (`$web_search`) that this instance does not
run, and thinking is a model (kimi-k2-thinking), not a flag; both are reported as notes.
"""

from __future__ import annotations

from typing import Any

from instance.providers.base import ChatRequest, OpenAICompatibleProvider


class KimiProvider(OpenAICompatibleProvider):
    name = "kimi"
    label = "Kimi (Moonshot)"

    def payload(self, request: ChatRequest) -> tuple[dict[str, Any], list[str]]:
        body, notes = super().payload(request)
        temperature = body.get("temperature")
        if isinstance(temperature, int | float) and temperature > 1.0:
            body["temperature"] = 1.0
            notes.append("Kimi accepts temperature up to 1.0; used 1.0")
        if request.web_search:
            notes.append("web search is not supported for Kimi models here; answered without it")
        if request.thinking and not request.model.thinking:
            notes.append("thinking mode needs kimi-k2-thinking; answered without it")
        return body, notes
