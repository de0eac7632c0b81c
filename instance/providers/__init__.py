"""The LLM providers of one instance, opened and closed with it.

`Providers.open(settings)` creates one client per provider that has an API key; a provider
without a key simply is not there, and asking for one of its models raises
ProviderNotConfigured naming the variable to set.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from common.settings import Settings
from instance.providers.base import ChatRequest, ChatResult, OpenAICompatibleProvider, tls_context
from instance.providers.glm import GLMProvider
from instance.providers.kimi import KimiProvider
from instance.providers.models import MODELS, ModelInfo, ProviderName, resolve

__all__ = ["ChatRequest", "ChatResult", "ModelInfo", "Providers"]


class Providers:
    def __init__(self, settings: Settings, clients: dict[ProviderName, OpenAICompatibleProvider]) -> None:
        self.settings = settings
        self.clients = clients

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings) -> AsyncIterator[Providers]:
        clients: dict[ProviderName, OpenAICompatibleProvider] = {}
        tls = await asyncio.to_thread(tls_context) if settings.glm_api_key or settings.kimi_api_key else None
        if settings.glm_api_key:
            clients["glm"] = GLMProvider(
                base_url=settings.glm_api_url, api_key=settings.glm_api_key, settings=settings, tls=tls
            )
        if settings.kimi_api_key:
            clients["kimi"] = KimiProvider(
                base_url=settings.kimi_api_url, api_key=settings.kimi_api_key, settings=settings, tls=tls
            )
        try:
            yield cls(settings, clients)
        finally:
            for client in clients.values():
                await client.aclose()

    def resolve(self, model: str | None) -> tuple[ModelInfo, OpenAICompatibleProvider]:
        info = resolve(model, configured=tuple(self.clients), default_model=self.settings.default_model)
        return info, self.clients[info.provider]

    def models(self) -> list[dict[str, Any]]:
        out = []
        for model in MODELS:
            entry = model.to_dict()
            entry["available"] = model.provider in self.clients
            out.append(entry)
        return out

    def limits(self) -> dict[str, Any]:
        return {
            name: (
                self.clients[name].limits()
                if name in self.clients
                else {"provider": name, "configured": False}
            )
            for name in ("glm", "kimi")
        }
