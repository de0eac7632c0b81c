"""The models EXAI offers, which provider serves each, and how `model="auto"` picks one.

Context windows are the providers' published figures; they bound how much history and how
many files a call may carry. Names not listed here but with a known family prefix are passed
through to their provider, so a newly released model works before this table learns of it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from common.errors import InvalidArgument, ProviderNotConfigured

ProviderName = Literal["glm", "kimi"]

KEY_ENV: dict[ProviderName, str] = {"glm": "GLM_API_KEY", "kimi": "KIMI_API_KEY"}
URL_ENV: dict[ProviderName, str] = {"glm": "GLM_API_URL", "kimi": "KIMI_API_URL"}
FLAGSHIP: dict[ProviderName, str] = {"glm": "glm-4.6", "kimi": "kimi-k2-0905-preview"}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    provider: ProviderName
    context_window: int
    max_output_tokens: int
    description: str
    thinking: bool = False
    web_search: bool = False
    aliases: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["aliases"] = list(self.aliases)
        return out


MODELS: tuple[ModelInfo, ...] = (
    ModelInfo(
        "glm-4.6",
        "glm",
        200_000,
        128_000,
        "Z.ai flagship: coding, reasoning, agents",
        thinking=True,
        web_search=True,
        aliases=("glm", "glm-4"),
    ),
    ModelInfo("glm-4.5", "glm", 128_000, 96_000, "GLM-4.5: hybrid reasoning", thinking=True, web_search=True),
    ModelInfo(
        "glm-4.5-air",
        "glm",
        128_000,
        96_000,
        "GLM-4.5 Air: lighter and cheaper",
        thinking=True,
        web_search=True,
    ),
    ModelInfo("glm-4.5-x", "glm", 128_000, 96_000, "GLM-4.5 X: low latency", thinking=True, web_search=True),
    ModelInfo(
        "glm-4.5-airx", "glm", 128_000, 96_000, "GLM-4.5 AirX: fast Air", thinking=True, web_search=True
    ),
    ModelInfo(
        "glm-4.5-flash", "glm", 128_000, 96_000, "GLM-4.5 Flash: free tier", thinking=True, web_search=True
    ),
    ModelInfo(
        "kimi-k2-0905-preview",
        "kimi",
        262_144,
        32_768,
        "Kimi K2 (2025-09): long context, agentic coding",
        aliases=("kimi", "kimi-k2"),
    ),
    ModelInfo("kimi-k2-0711-preview", "kimi", 131_072, 32_768, "Kimi K2 (2025-07)"),
    ModelInfo("kimi-k2-turbo-preview", "kimi", 262_144, 32_768, "Kimi K2 Turbo: faster output"),
    ModelInfo("kimi-k2-thinking", "kimi", 262_144, 32_768, "Kimi K2 Thinking: long reasoning", thinking=True),
)

_FAMILY_PREFIXES: dict[str, ProviderName] = {"glm-": "glm", "kimi-": "kimi", "moonshot-": "kimi"}


def lookup(name: str) -> ModelInfo | None:
    wanted = name.strip().lower()
    for model in MODELS:
        if wanted == model.name or wanted in model.aliases:
            return model
    for prefix, provider in _FAMILY_PREFIXES.items():
        if wanted.startswith(prefix):
            return ModelInfo(wanted, provider, 128_000, 32_768, "not in EXAI's model table; passed through")
    return None


def resolve(name: str | None, *, configured: Collection[ProviderName], default_model: str) -> ModelInfo:
    """The model to call for `name` ("auto" or empty: the default if usable, else any configured)."""
    if not configured:
        raise ProviderNotConfigured(
            "no LLM provider is configured on this instance",
            hint="Set GLM_API_KEY (Z.ai) and/or KIMI_API_KEY (Moonshot) in the environment or .env "
            "of the fleet, then restart it.",
        )
    if not name or name.strip().lower() == "auto":
        default = lookup(default_model)
        if default is not None and default.provider in configured:
            return default
        for provider in ("glm", "kimi"):
            if provider in configured:
                found = lookup(FLAGSHIP[provider])
                assert found is not None
                return found
    model = lookup(name or "")
    if model is None:
        known = ", ".join(m.name for m in MODELS)
        raise InvalidArgument(
            f"unknown model {name!r}",
            hint=f"Use one of: auto, {known} (see the listmodels tool).",
        )
    if model.provider not in configured:
        raise ProviderNotConfigured(
            f"model {model.name} needs the {model.provider.upper()} provider, which has no API key here",
            hint=f"Set {KEY_ENV[model.provider]} (and {URL_ENV[model.provider]} for a non-default endpoint), "
            "or pick a model of a configured provider (listmodels).",
        )
    return model
