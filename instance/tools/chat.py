"""`chat`: ask GLM or Kimi, keeping the conversation as a thread that any instance can continue.

The thread is loaded from storage (Redis cache, then Postgres), the provider is called with the
whole history, and both new turns go to the write-behind spool: the answer returns without
waiting for Postgres, and a Postgres outage delays the write, never loses it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from pydantic import Field

from common.errors import InvalidArgument, StorageUnavailable
from instance.context import Block, BuiltPrompt, Turn, build_prompt, capture, disclosure, notes_block, tokens
from instance.context.policy import policy_for, summarizer_for
from instance.providers import ChatRequest, ChatResult, ModelInfo
from instance.providers.base import OpenAICompatibleProvider
from instance.runtime import Runtime
from instance.storage.models import Message
from instance.timing import chat_stages, current_call
from instance.tools import exai_tool, headers_of
from instance.tools.checks import check_chat_arguments, storable_reply
from instance.tools.files import LoadedFile
from instance.tools.progress import progress_heartbeat

MAX_THREAD_TURNS = 20
"""Default turns a thread may hold, as in EXAI's MAX_CONVERSATION_TURNS (EXAI_THREAD_MAX_TURNS)."""

SYSTEM_PROMPT = (
    "You are a senior engineer consulted by a coding agent for a second opinion. Answer precisely, "
    "say when you are unsure, and refer to files by path and line when you discuss code."
)

ThinkingMode = Literal["minimal", "low", "medium", "high", "max"]


@dataclass
class Consultation:
    """What one model call returned, and the prompt that was sent (what was stripped/compacted)."""

    result: ChatResult
    built: BuiltPrompt

    @property
    def dropped(self) -> int:
        """Thread turns left out of the prompt entirely."""
        return self.built.history.turns_omitted


async def consult(
    ctx: Context,
    runtime: Runtime,
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
    history_tokens: int | None = None,
    recent_turns: int | None = None,
    extras: Sequence[Block] = (),
    disclosed: disclosure.Disclosure | None = None,
) -> Consultation:
    """The one place a tool turns a thread, a prompt and files into a provider call.

    chat and every workflow tool call this, so prompt assembly (instance/context: stripping,
    compaction, token budgets), progress notifications and cancellation behave the same everywhere.
    """
    blocks = list(extras)
    if files:
        blocks.append(Block("files", "\n\n".join(f.as_prompt() for f in files)))
    built = await build_prompt(
        # Stored turns as the prompt carries them: file copies superseded by newer ones become markers.
        [
            Turn(m.id, m.role, content)
            for m, content in zip(thread, disclosure.rendered_contents(thread, disclosed), strict=True)
        ],
        prompt,
        model,
        system=system_prompt,
        policy=policy_for(runtime.settings, model, history_tokens=history_tokens, recent_turns=recent_turns),
        extras=blocks,
        **summarizer_for(runtime, provider, model),
    )
    thinking = None if thinking_mode is None else thinking_mode != "minimal"
    request = ChatRequest(
        model=model,
        messages=built.messages,
        temperature=temperature,
        thinking=thinking,
        web_search=use_websearch,
    )
    async with progress_heartbeat(ctx, label or f"waiting for {model.name}") as progress:
        result = await provider.chat(request, on_delta=progress.on_delta)
    return Consultation(result, built)


GROUP_CONTEXT_CHARS = 8000  # budget of include_group_context, in characters (~2k tokens)


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
        files: Annotated[
            list[str] | None,
            Field(
                description="Absolute paths of files to include; a new file arrives as an outline (small "
                "files whole), 'PATH:START-END' sends exactly those lines, an unchanged file is sent once "
                "per thread."
            ),
        ] = None,
        temperature: Annotated[
            float | None, Field(ge=0.0, le=2.0, description="Sampling temperature.")
        ] = None,
        thinking_mode: Annotated[
            ThinkingMode | None, Field(description="Reasoning depth; 'minimal' turns thinking off.")
        ] = None,
        use_websearch: Annotated[bool, Field(description="Let the model search the web (GLM).")] = False,
        history_tokens: Annotated[
            int | None,
            Field(ge=0, description="Most tokens of thread history to send (older turns compacted)."),
        ] = None,
        recent_turns: Annotated[
            int | None, Field(ge=0, le=1000, description="Most recent turns always sent verbatim.")
        ] = None,
        include_group_context: Annotated[
            str | None,
            Field(
                max_length=100,
                description="A link group you are in: add its notes, in-progress tasks and recent "
                "messages to the prompt (within a budget; the result says what was included). "
                "Omitted: the groups you opted into (link_join chat_context=true); '' for none.",
            ),
        ] = None,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        clock = current_call.get()
        if clock is not None:
            clock.started = started
        if not prompt.strip():
            raise InvalidArgument("prompt is empty", hint="Say what you want to ask.")
        check_chat_arguments(prompt, continuation_id, files)
        providers = runtime.providers
        assert providers is not None, "providers are opened by the lifespan"
        info, provider = providers.resolve(model)
        storage = runtime.require_storage()
        session_id = runtime.session_for(headers_of(ctx))

        max_turns = runtime.settings.thread_max_turns
        loaded_at = time.perf_counter()
        # The thread, its access check, the notes and the group context are independent reads:
        # all at once, so the call waits for the slowest one, not for their sum.
        thread_part, notes_part, group_part = await asyncio.gather(
            _thread_for(runtime, continuation_id, headers_of(ctx), session_id),
            _notes_for(runtime, thread_id=continuation_id, session_id=session_id, model=info.name),
            _group_context_for(runtime, include_group_context, session_id),
            return_exceptions=True,
        )
        for part in (thread_part, group_part, notes_part):
            if isinstance(part, BaseException):
                raise part
        assert not isinstance(thread_part, BaseException)
        assert not isinstance(notes_part, BaseException)
        assert not isinstance(group_part, BaseException)
        history_records = thread_part
        notes = notes_part
        group_blocks, group_context = group_part
        if continuation_id and len(history_records) + 2 > max_turns:
            raise InvalidArgument(
                f"thread {continuation_id} has reached its limit of {max_turns} turns",
                hint="Start a new thread (call chat without continuation_id) and summarise what matters.",
            )
        # [context phase 4] files: outline first, exact ranges on request, once per thread.
        disclosed = await disclosure.disclose(
            history_records,
            files or [],
            roots=runtime.settings.allowed_file_roots,
            model=info.name,
            full_below_tokens=runtime.settings.file_full_tokens,
        )
        if continuation_id:
            cid = continuation_id
        consult_at = time.perf_counter()
        chat_stages.add("reads", consult_at - loaded_at)

        # [context phase 3] the thread's and session's notes, within budget, in the new turn.
        extras = [Block("notes", notes.text)] if notes.text else []
        if disclosed.block:
            extras.append(Block("files", disclosed.block, stored=True))
        # Linked sessions: the group's notes, in-progress tasks and recent messages, this call only.
        extras.extend(Block("group", block) for block in group_blocks)
        consultation = await consult(
            ctx,
            runtime,
            thread=history_records,
            prompt=prompt,
            files=[],
            extras=extras,
            disclosed=disclosed,
            model=info,
            provider=provider,
            system_prompt=SYSTEM_PROMPT,
            temperature=temperature,
            thinking_mode=thinking_mode,
            use_websearch=use_websearch,
            history_tokens=history_tokens,
            recent_turns=recent_turns,
        )
        result, built = consultation.result, consultation.built
        appending_at = time.perf_counter()
        chat_stages.add("provider", result.seconds)
        chat_stages.add("context", max(0.0, appending_at - consult_at - result.seconds))
        content = storable_reply(result.content)

        user_metadata = dict(built.user_metadata)
        if disclosed.entries:  # where each file block sits in the stored turn (after the prompt)
            offset = len(built.user_content) - len(disclosed.block) - 2
            user_metadata[disclosure.META_KEY] = disclosed.metadata(offset)
        # Both turns as one exchange: one position in the thread (nothing another session appends
        # comes between them), one Redis round trip, one spool fsync; a new thread (created only
        # now: a refused or failed call leaves no empty thread) is in that same round trip and fsync.
        exchange: list[dict[str, Any]] = [
            {
                "role": "user",
                "content": built.user_content,
                "session_id": session_id,
                "tool_name": "chat",
                "model": result.model,
                "files": disclosed.paths,
                "metadata": user_metadata,
            },
            {
                "role": "assistant",
                "content": content,
                "session_id": session_id,
                "tool_name": "chat",
                "model": result.model,
                "tokens_in": result.tokens_in,
                "tokens_out": result.tokens_out,
                "metadata": {"provider": result.provider, "finish_reason": result.finish_reason},
            },
        ]
        if continuation_id:
            user_turn, answer_turn = await storage.history.append_exchange(cid, exchange)
        else:
            cid, (user_turn, answer_turn) = await storage.history.start_thread(
                exchange,
                session_id=session_id,
                tool_name="chat",
                model=info.name,
                principal=runtime.principal_for(headers_of(ctx)),
            )
            if storage.notes.cache is not None:  # nobody knows the id yet: it has no notes
                runtime.background(
                    storage.notes.cache.seed_empty("thread", cid), what="recording a new thread's notes"
                )
        answering_at = time.perf_counter()
        chat_stages.add("storage_append", answering_at - appending_at)

        # [context phase 3] notes captured from this exchange (written in the background).
        captured = _capture(
            runtime, provider, info, cid, built.strip.text, content, user_turn.id, answer_turn.id
        )
        turns = len(history_records) + 2
        remaining = max(0, max_turns - turns)
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
                "history_turns_dropped": built.history.turns_omitted,
                "tokens_sent": built.tokens_sent,
                "context": built.report(),
                "files": disclosed.paths,
                "files_disclosed": disclosed.report,
                "notes_injected": notes.report(),
                "notes_omitted": notes.report_omitted(),
                "notes_captured": captured,
                "notes": result.notes,
                "instance_id": runtime.identity.id,
            },
        }
        if group_context is not None:
            out["metadata"]["group_context"] = group_context
        if remaining:
            out["continuation_offer"] = {
                "continuation_id": cid,
                "remaining_turns": remaining,
                "note": f"You can continue this conversation for {remaining} more turns "
                f"({remaining // 2} chat calls: each adds two) by passing this continuation_id to chat.",
            }
        finished = time.perf_counter()
        chat_stages.add("answer", finished - answering_at)
        chat_stages.add("total", finished - started)
        if clock is not None:  # `fleet` is counted once the answer is written (timing.finish_request)
            clock.provider = result.seconds
        else:  # called without the instance's HTTP layer: the tool's own share
            chat_stages.add("fleet", max(0.0, finished - started - result.seconds))
        return out


async def _thread_for(
    runtime: Runtime, continuation_id: str | None, headers: dict[str, str], session_id: str | None
) -> list[Any]:
    """The continued thread's turns (none for a new thread), once the caller may use it."""
    started = time.perf_counter()
    if not continuation_id:
        chat_stages.add("thread_load", 0.0)
        return []
    storage = runtime.require_storage()
    owner = runtime.owner_for(headers)
    reads: list[Awaitable[Any]] = [storage.history.load(continuation_id)]
    if owner is not None:
        reads.append(storage.history.check_access(continuation_id, owner, session=session_id))
    found = await asyncio.gather(*reads, return_exceptions=True)
    for part in reversed(found):  # an access refusal first: it must not tell more than "not found"
        if isinstance(part, BaseException):
            raise part
    chat_stages.add("thread_load", time.perf_counter() - started)
    records = found[0]
    assert not isinstance(records, BaseException)
    return list(records)


async def _group_context_for(
    runtime: Runtime, requested: str | None, session_id: str | None
) -> tuple[list[str], dict[str, Any] | None]:
    """Linked sessions: the group's notes, in-progress tasks and recent messages (this call only).
    None: the groups this member opted into (link_join chat_context); "": none this call."""
    started = time.perf_counter()
    try:
        return await runtime.links.chat_context(requested, session_id, budget_chars=GROUP_CONTEXT_CHARS)
    finally:
        chat_stages.add("group_context", time.perf_counter() - started)


async def _notes_for(
    runtime: Runtime, *, thread_id: str | None, session_id: str | None, model: str
) -> notes_block.NotesBlock:
    """The notes block for a call; without Postgres (and no copy in Redis) it goes on without."""
    started = time.perf_counter()
    try:
        return await _select_notes(runtime, thread_id=thread_id, session_id=session_id, model=model)
    finally:
        chat_stages.add("notes", time.perf_counter() - started)


async def _select_notes(
    runtime: Runtime, *, thread_id: str | None, session_id: str | None, model: str
) -> notes_block.NotesBlock:
    storage = runtime.require_storage()
    try:
        found = await notes_block.load(storage.notes, thread_id=thread_id, session_id=session_id)
    except StorageUnavailable:
        return notes_block.NotesBlock()
    if not found:
        return notes_block.NotesBlock()
    budget = runtime.settings.notes_budget_tokens
    if tokens.ready(model) and sum(len(n.body) for n in found) <= tokens.OFFLOAD_CHARS:
        return notes_block.select(found, budget_tokens=budget, model=model)
    # Counting may load a tokenizer vocabulary on first use, or take long: keep it off the loop.
    return await asyncio.to_thread(notes_block.select, found, budget_tokens=budget, model=model)


def _capture(
    runtime: Runtime,
    provider: Any,
    info: Any,
    thread_id: str,
    prompt: str,
    answer: str,
    user_turn: str,
    answer_turn: str,
) -> list[dict[str, Any]]:
    """Start capturing notes from this exchange; returns what the deterministic extractor found."""
    mode = runtime.settings.note_capture
    storage = runtime.require_storage()
    if mode == "off":
        return []
    if mode == "model":
        runtime.background(
            capture.capture_with_model(
                storage.notes, provider, info, thread_id, prompt, answer, user_turn, answer_turn
            ),
            what="capturing notes with the model",
        )
        return []
    found = capture.extract_turn(prompt, answer, user_turn=user_turn, assistant_turn=answer_turn)
    if found:
        runtime.background(capture.save(storage.notes, thread_id, found), what="saving captured notes")
    return [n.to_dict() for n in found]
