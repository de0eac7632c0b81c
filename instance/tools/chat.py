"""`chat`: ask GLM or Kimi, keeping the conversation as a thread that any instance can continue.

The thread is loaded from storage (Redis cache, then Postgres), the provider is called with the
whole history, and both new turns go to the write-behind spool: the answer returns without
waiting for Postgres, and a Postgres outage delays the write, never loses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from common.errors import InvalidArgument
from instance.providers import ChatRequest, ChatResult, ModelInfo
from instance.providers.base import OpenAICompatibleProvider
from instance.runtime import Runtime
from instance.storage.models import Message
from instance.timing import chat_stages
from instance.tools import exai_tool, headers_of
from instance.tools.checks import check_chat_arguments, storable_reply
from instance.tools.files import LoadedFile, read_files
from instance.tools.progress import progress_heartbeat

MAX_THREAD_TURNS = 20
"""Turns (user and assistant messages) a thread may hold, as in EXAI's MAX_CONVERSATION_TURNS."""

SYSTEM_PROMPT = (
    "You are a senior engineer consulted by a coding agent for a second opinion. Answer precisely, "
    "say when you are unsure, and refer to files by path and line when you discuss code."
)

ThinkingMode = Literal["minimal", "low", "medium", "high", "max"]


def _fit(history: list[dict[str, str]], budget_chars: int) -> tuple[list[dict[str, str]], int]:
    """Drop the oldest turns until the history fits; returns (kept, dropped)."""
    kept = list(history)
    dropped = 0
    while kept and sum(len(m["content"]) for m in kept) > budget_chars:
        kept.pop(0)
        dropped += 1
    return kept, dropped


@dataclass
class Consultation:
    """What one model call returned, and how much of the thread had to be left out."""

    result: ChatResult
    dropped: int


async def consult(
    ctx: Context,
    *,
    thread: Sequence[Message],
    prompt: str,
    files: Sequence[LoadedFile],
    model: ModelInfo,
    provider: OpenAICompatibleProvider,
    system_prompt: str,
    temperature: float | None = None,
    thinking_mode: str | None = None,
    use_websearch: bool = False,
    label: str | None = None,
) -> Consultation:
    """The one place a tool turns a thread, a prompt and files into a provider call.

    chat and every workflow tool call this, so prompt assembly (history budget, files) and the
    call's progress notifications and cancellation behave the same everywhere.
    """
    history = [
        {"role": m.role, "content": m.content} for m in thread if m.role in ("user", "assistant", "system")
    ]
    user_text = prompt
    if files:
        user_text = prompt + "\n\n" + "\n\n".join(f.as_prompt() for f in files)
    budget = max(0, (model.context_window - min(model.max_output_tokens, 16_384)) * 3 - len(user_text))
    history, dropped = _fit(history, budget)
    messages = [
        {"role": "system", "content": system_prompt},
        *history,
        {"role": "user", "content": user_text},
    ]

    thinking = None if thinking_mode is None else thinking_mode != "minimal"
    request = ChatRequest(
        model=model,
        messages=messages,
        temperature=temperature,
        thinking=thinking,
        web_search=use_websearch,
    )
    async with progress_heartbeat(ctx, label or f"waiting for {model.name}") as progress:
        result = await provider.chat(request, on_delta=progress.on_delta)
    return Consultation(result, dropped)


def register(mcp: MCPServer[Any], runtime: Runtime) -> None:
    @exai_tool(
        mcp,
        runtime,
        description=(
            "Chat with GLM (Z.ai) or Kimi (Moonshot) for a second opinion, brainstorming or review. "
            "Returns content and a continuation_id; pass it back to continue the same thread "
            "(from any session or instance). files: absolute paths under the allowed roots."
        ),
    )
    async def chat(
        prompt: Annotated[str, Field(min_length=1, description="Your question or request, with context.")],
        ctx: Context,
        model: Annotated[str, Field(description="Model name (see listmodels) or 'auto'.")] = "auto",
        continuation_id: Annotated[
            str | None, Field(description="Thread id returned by an earlier call, to continue it.")
        ] = None,
        files: Annotated[list[str] | None, Field(description="Absolute paths of files to include.")] = None,
        temperature: Annotated[
            float | None, Field(ge=0.0, le=2.0, description="Sampling temperature.")
        ] = None,
        thinking_mode: Annotated[
            ThinkingMode | None, Field(description="Reasoning depth; 'minimal' turns thinking off.")
        ] = None,
        use_websearch: Annotated[bool, Field(description="Let the model search the web (GLM).")] = False,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        if not prompt.strip():
            raise InvalidArgument("prompt is empty", hint="Say what you want to ask.")
        check_chat_arguments(prompt, continuation_id, files)
        providers = runtime.providers
        assert providers is not None, "providers are opened by the lifespan"
        info, provider = providers.resolve(model)
        storage = runtime.require_storage()
        session_id = runtime.session_for(headers_of(ctx))
        loaded = await read_files(files or [], runtime.settings.allowed_file_roots)

        history_records: list[Any] = []
        loaded_at = time.perf_counter()
        if continuation_id:
            if (owner := runtime.owner_for(headers_of(ctx))) is not None:
                await storage.history.check_access(continuation_id, owner)
            history_records = list(await storage.history.load(continuation_id))
            if len(history_records) + 2 > MAX_THREAD_TURNS:
                raise InvalidArgument(
                    f"thread {continuation_id} has reached its limit of {MAX_THREAD_TURNS} turns",
                    hint="Start a new thread (call chat without continuation_id) and summarise what matters.",
                )
            cid = continuation_id
        consult_at = time.perf_counter()
        chat_stages.add("thread_load", consult_at - loaded_at)

        consultation = await consult(
            ctx,
            thread=history_records,
            prompt=prompt,
            files=loaded,
            model=info,
            provider=provider,
            system_prompt=SYSTEM_PROMPT,
            temperature=temperature,
            thinking_mode=thinking_mode,
            use_websearch=use_websearch,
        )
        result, dropped = consultation.result, consultation.dropped
        appending_at = time.perf_counter()
        chat_stages.add("provider", result.seconds)
        chat_stages.add("context", max(0.0, appending_at - consult_at - result.seconds))
        content = storable_reply(result.content)
        if not continuation_id:  # created only now: a refused or failed call leaves no empty thread
            cid = await storage.history.new_thread(
                session_id=session_id,
                tool_name="chat",
                model=info.name,
                principal=runtime.principal_for(headers_of(ctx)),
            )

        # Both turns at once: they share one spool fsync and one Redis pipeline (each takes its
        # sequence number when called, so the user turn stays first).
        await asyncio.gather(
            storage.history.append(
                cid,
                "user",
                prompt,
                session_id=session_id,
                tool_name="chat",
                model=result.model,
                files=[f.path for f in loaded],
            ),
            storage.history.append(
                cid,
                "assistant",
                content,
                session_id=session_id,
                tool_name="chat",
                model=result.model,
                tokens_in=result.tokens_in,
                tokens_out=result.tokens_out,
                metadata={"provider": result.provider, "finish_reason": result.finish_reason},
            ),
        )
        chat_stages.add("storage_append", time.perf_counter() - appending_at)

        turns = len(history_records) + 2
        remaining = max(0, MAX_THREAD_TURNS - turns)
        out: dict[str, Any] = {
            "status": "continuation_available" if remaining else "success",
            "content": content,
            "content_type": "text",
            "continuation_id": cid,
            "metadata": {
                "model": result.model,
                "provider": result.provider,
                "tokens_in": result.tokens_in,
                "tokens_out": result.tokens_out,
                "duration_ms": round(result.seconds * 1000, 1),
                "attempts": result.attempts,
                "thread_turns": turns,
                "history_turns_dropped": dropped,
                "files": [f.path for f in loaded],
                "notes": result.notes,
                "instance_id": runtime.identity.id,
            },
        }
        if remaining:
            out["continuation_offer"] = {
                "continuation_id": cid,
                "remaining_turns": remaining,
                "note": f"You can continue this conversation for {remaining} more turns "
                f"({remaining // 2} chat calls: each adds two) by passing this continuation_id to chat.",
            }
        total = time.perf_counter() - started
        chat_stages.add("total", total)
        chat_stages.add("fleet", max(0.0, total - result.seconds))
        return out
