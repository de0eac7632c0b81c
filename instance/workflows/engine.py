"""One engine answers a step of any workflow tool described in the catalog.

A step is validated, recorded in the thread (storage, so any instance can take the next step),
and answered. Intermediate steps get guidance for the next step and no model call. The last
step (next_step_required=false) calls the expert model once with the accumulated work and the
relevant files, through the same `consult` seam as chat, unless confidence is 'certain' or
use_assistant_model is false; consensus instead consults all its models concurrently.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import anyio
from mcp.server.mcpserver import Context
from pydantic import BaseModel

from common.errors import ExaiError, InvalidArgument, ProviderError
from instance.providers import ModelInfo
from instance.providers.base import OpenAICompatibleProvider
from instance.providers.models import FLAGSHIP
from instance.runtime import Runtime
from instance.storage.models import Message
from instance.tools import describe_error, headers_of
from instance.tools.chat import Consultation, consult
from instance.tools.files import LoadedFile, read_files
from instance.workflows import state
from instance.workflows.catalog.deliberation import (
    CHALLENGE_SYSTEM,
    STANCES,
    challenge_prompt,
)
from instance.workflows.git import GitChanges, read_changes
from instance.workflows.spec import WorkflowSpec

log = logging.getLogger(__name__)

Arguments = dict[str, Any]


def _plain(value: Any) -> Any:
    """Arguments as JSON values (consensus `models` arrive as pydantic models)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


class Engine:
    """Runs steps for every workflow tool of one instance."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    # --- the step ---------------------------------------------------------------------------
    async def _check_thread(self, ctx: Context, cid: str) -> None:
        """With several principals, a thread is continued by the principal that owns it (or one
        whose session shares a link group with the owner's: HistoryStore.check_access)."""
        if (owner := self.runtime.owner_for(headers_of(ctx))) is not None:
            await self.runtime.require_storage().history.check_access(
                cid, owner, session=self.runtime.session_for(headers_of(ctx))
            )

    async def step(self, spec: WorkflowSpec, ctx: Context, arguments: Arguments) -> dict[str, Any]:
        args = {name: _plain(value) for name, value in arguments.items()}
        extras = {f.name: args.get(f.name) for f in spec.extra_fields}
        self._validate(spec, args, extras)
        final = not args["next_step_required"]
        consult_models = final and bool(args["use_assistant_model"])
        if spec.final == "expert" and args["confidence"] == "certain":
            consult_models = False

        storage = self.runtime.require_storage()
        session_id = self.runtime.session_for(headers_of(ctx))
        # Everything that can be refused is checked before the step is recorded.
        cid = args.get("continuation_id")
        if cid:
            await self._check_thread(ctx, cid)
        messages: list[Message] = list(await storage.history.load(cid)) if cid else []
        record = state.step_record(args, extras)
        work = state.fold(spec.name, messages)
        work.add(record)
        settings = work.settings({f.name: f.default for f in spec.extra_fields})
        experts = self._experts(spec, args, settings) if consult_models else []
        git = await self._git(spec, settings)
        files = []
        if consult_models:
            files = await read_files(work.relevant_files, self.runtime.settings.allowed_file_roots)

        if not cid:
            cid = await storage.history.new_thread(
                session_id=session_id,
                tool_name=spec.name,
                model=experts[0][0].name if experts else None,
                principal=self.runtime.principal_for(headers_of(ctx)),
            )
        await storage.history.append(
            cid,
            "user",
            state.step_text(spec.name, record),
            session_id=session_id,
            tool_name=spec.name,
            files=list(args.get("relevant_files") or []),
            metadata={state.STEP_KEY: record},
        )

        out = self._base(spec, args, work, cid)
        if git is not None:
            out["git_changes"] = git.summary()
        if not final:
            return self._pause(spec, args, out, cid)
        if not consult_models:
            return self._finish_locally(spec, args, work, out)
        history = state.conversation(messages)
        if spec.final == "consensus":
            return await self._consensus(ctx, spec, args, work, files, experts, out, cid, session_id)
        return await self._expert(
            ctx, spec, args, work, files, history, experts[0], git, out, cid, session_id
        )

    def _validate(self, spec: WorkflowSpec, args: Arguments, extras: Arguments) -> None:
        if not str(args["step"]).strip():
            raise InvalidArgument("step is empty", hint="Describe what this step does.")
        if spec.findings_required and not str(args.get("findings") or "").strip():
            raise InvalidArgument("findings is empty", hint="Say what this step found (or 'nothing yet').")
        if args["step_number"] > args["total_steps"]:
            args["total_steps"] = args["step_number"]  # as EXAI does: the estimate grows
        back = args.get("backtrack_from_step")
        if back is not None and back >= args["step_number"]:
            raise InvalidArgument(
                f"backtrack_from_step ({back}) must be lower than step_number ({args['step_number']})",
                hint="Backtracking discards earlier steps; name the first step to discard.",
            )
        if args["step_number"] == 1:
            for name in spec.first_step_requires:
                if not (args.get(name) or extras.get(name)):
                    raise InvalidArgument(
                        f"step 1 of {spec.name} needs {name}",
                        hint=f"Pass {name} in the first step (see the tool's schema for its meaning).",
                    )
        if "total_files_to_document" in extras and not args["next_step_required"]:
            done, total = extras["num_files_documented"], extras["total_files_to_document"]
            if done < total:
                raise InvalidArgument(
                    f"only {done} of {total} files are documented, so the work cannot finish yet",
                    hint="Document the remaining files (one per step), then set next_step_required=false.",
                )
        if spec.final == "consensus":
            seen: set[tuple[str, str]] = set()
            for entry in extras.get("models") or []:
                pair = (entry["model"].strip().lower(), entry.get("stance") or "neutral")
                if pair in seen:
                    raise InvalidArgument(
                        f"model {entry['model']} appears twice with stance {pair[1]!r} in models",
                        hint="Each model+stance pair may appear once; change the stance or drop the copy.",
                    )
                seen.add(pair)

    def _experts(
        self, spec: WorkflowSpec, args: Arguments, extras: Arguments
    ) -> list[tuple[ModelInfo, OpenAICompatibleProvider, dict[str, Any]]]:
        """The models the last step will call, resolved now so a bad name fails before recording."""
        providers = self.runtime.providers
        assert providers is not None, "providers are opened by the lifespan"
        if spec.final != "consensus":
            info, provider = providers.resolve(args["model"])
            return [(info, provider, {})]
        entries = extras.get("models") or [
            {"model": FLAGSHIP[name], "stance": "neutral", "stance_prompt": None}
            for name in ("glm", "kimi")
            if name in providers.clients
        ]
        if not entries:
            providers.resolve("auto")  # raises ProviderNotConfigured with the variables to set
        resolved = []
        for entry in entries:
            info, provider = providers.resolve(entry["model"])
            resolved.append((info, provider, entry))
        return resolved

    async def _git(self, spec: WorkflowSpec, extras: Arguments) -> GitChanges | None:
        if not spec.reads_git or not extras.get("path"):
            return None
        return await read_changes(
            extras["path"],
            self.runtime.settings.allowed_file_roots,
            compare_to=extras.get("compare_to"),
            include_staged=extras.get("include_staged", True) is not False,
            include_unstaged=extras.get("include_unstaged", True) is not False,
        )

    # --- answers ----------------------------------------------------------------------------
    def _base(self, spec: WorkflowSpec, args: Arguments, work: state.Work, cid: str) -> dict[str, Any]:
        return {
            "status": f"{spec.name}_in_progress",
            "step_number": args["step_number"],
            "total_steps": args["total_steps"],
            "next_step_required": args["next_step_required"],
            f"{spec.name}_status": work.status(),
            "continuation_id": cid,
            "metadata": {
                "tool_name": spec.name,
                "instance_id": self.runtime.identity.id,
                "steps_recorded": [s["step_number"] for s in work.steps],
                "backtracked_steps": sorted(set(work.backtracked)),
            },
        }

    def _pause(self, spec: WorkflowSpec, args: Arguments, out: dict[str, Any], cid: str) -> dict[str, Any]:
        number, total = args["step_number"], args["total_steps"]
        actions = spec.guidance.actions(number, args["confidence"])
        out["status"] = f"pause_for_{spec.name}"
        out[f"{spec.name}_required"] = True
        out["required_actions"] = actions
        out["next_steps"] = (
            f"Before calling {spec.name} again, do this work yourself: "
            + " ".join(f"({i}) {a}" for i, a in enumerate(actions, 1))
            + f" Then call {spec.name} with step_number={number + 1}, your new findings and "
            f"continuation_id={cid}. Set next_step_required=false on the last step"
            + (" to bring in the expert model." if spec.assistant_default else ".")
        )
        out["next_call"] = {
            "tool": spec.name,
            "arguments": {
                "step": "What the next step examines.",
                "step_number": number + 1,
                "total_steps": max(total, number + 1),
                "next_step_required": number + 1 < total,
                "findings": "What the next step found.",
                "continuation_id": cid,
            },
        }
        return out

    def _complete(self, spec: WorkflowSpec, work: state.Work) -> dict[str, Any]:
        return {
            "initial_request": work.initial_request,
            "steps_taken": len(work.steps),
            "files_examined": work.files_checked,
            "relevant_files": work.relevant_files,
            "relevant_context": work.relevant_context,
            "issues_found": work.issues_found,
            "work_summary": work.summary(),
        }

    def _finish_locally(
        self, spec: WorkflowSpec, args: Arguments, work: state.Work, out: dict[str, Any]
    ) -> dict[str, Any]:
        certain = args["confidence"] == "certain"
        local = certain or not spec.assistant_default
        out["status"] = spec.certain_status if local else "local_work_complete"
        out[f"{spec.name}_complete"] = True
        out["skip_expert_analysis"] = True
        out["expert_analysis"] = {
            "status": "skipped_due_to_certain_confidence" if certain else "skipped_by_request",
            "reason": (
                "confidence is 'certain': the work was finished without the expert model"
                if certain
                else "use_assistant_model is false: the work was finished without the expert model"
            ),
        }
        out[f"complete_{spec.name}"] = {
            **self._complete(spec, work),
            "final_analysis": work.steps[-1].get("findings") or work.steps[-1]["step"],
            "confidence_level": args["confidence"],
        }
        out["next_steps"] = (
            f"The {spec.name} work is complete. Present the findings and recommendations to the user, "
            "and act on them."
        )
        return out

    async def _expert(
        self,
        ctx: Context,
        spec: WorkflowSpec,
        args: Arguments,
        work: state.Work,
        files: list[LoadedFile],
        history: list[Message],
        expert: tuple[ModelInfo, OpenAICompatibleProvider, dict[str, Any]],
        git: GitChanges | None,
        out: dict[str, Any],
        cid: str,
        session_id: str,
    ) -> dict[str, Any]:
        info, provider, _ = expert
        consultation = await consult(
            ctx,
            self.runtime,
            thread=history,
            prompt=expert_prompt(spec, work, git),
            files=files,
            model=info,
            provider=provider,
            system_prompt=spec.system_prompt,
            temperature=args.get("temperature"),
            thinking_mode=args.get("thinking_mode"),
            use_websearch=bool(args.get("use_websearch")),
            label=f"{spec.name}: waiting for the expert model {info.name}",
        )
        result = consultation.result
        await self.runtime.require_storage().history.append(
            cid,
            "assistant",
            result.content,
            session_id=session_id,
            tool_name=spec.name,
            model=result.model,
            tokens_in=result.tokens_in,
            tokens_out=result.tokens_out,
            metadata={state.EXPERT_KEY: True, "provider": result.provider},
        )
        out["status"] = "calling_expert_analysis"
        out[f"{spec.name}_complete"] = True
        out["expert_analysis"] = {"status": "analysis_complete", "raw_analysis": result.content}
        out[f"complete_{spec.name}"] = self._complete(spec, work)
        out["next_steps"] = (
            f"The {spec.name} work is complete and the expert model has reviewed it. Weigh its "
            "analysis against your own evidence (it may be wrong), then present the combined "
            "conclusions to the user and act on them."
        )
        out["metadata"].update(_model_metadata(consultation, files))
        return out

    async def _consensus(
        self,
        ctx: Context,
        spec: WorkflowSpec,
        args: Arguments,
        work: state.Work,
        files: list[LoadedFile],
        experts: list[tuple[ModelInfo, OpenAICompatibleProvider, dict[str, Any]]],
        out: dict[str, Any],
        cid: str,
        session_id: str,
    ) -> dict[str, Any]:
        proposal = work.initial_request

        async def ask(
            info: ModelInfo, provider: OpenAICompatibleProvider, entry: dict[str, Any]
        ) -> dict[str, Any]:
            stance = entry.get("stance") or "neutral"
            voice: dict[str, Any] = {"model": info.name, "stance": stance}
            try:
                consultation = await consult(
                    ctx,
                    self.runtime,
                    thread=[],  # blinded: each model sees the proposal and files, not the others
                    prompt=f"Proposal to evaluate:\n\n{proposal}",
                    files=files,
                    model=info,
                    provider=provider,
                    system_prompt=spec.system_prompt.format(
                        stance=entry.get("stance_prompt") or STANCES[stance]
                    ),
                    temperature=args.get("temperature"),
                    thinking_mode=args.get("thinking_mode"),
                    use_websearch=bool(args.get("use_websearch")),
                    label=f"consensus: waiting for {info.name} ({stance})",
                )
            except ExaiError as exc:
                return {**voice, "status": "error", "error": describe_error(exc), "error_code": exc.code}
            except Exception as exc:  # one voice must not sink the others
                log.exception("consensus: %s failed", info.name)
                return {**voice, "status": "error", "error": f"[internal_error] {type(exc).__name__}: {exc}"}
            result = consultation.result
            return {
                **voice,
                "status": "success",
                "verdict": result.content,
                "metadata": {
                    "provider": result.provider,
                    "model_name": result.model,
                    **_tokens(consultation),
                },
            }

        # An anyio task group, not asyncio.gather: when the SDK cancels the call (its cancel scope),
        # tasks in the group are cancelled by anyio and close their provider requests; plain
        # asyncio children were seen to leave their HTTP requests open.
        voices: list[dict[str, Any]] = [{} for _ in experts]

        async def ask_into(index: int) -> None:
            voices[index] = await ask(*experts[index])

        async with anyio.create_task_group() as group:
            for index in range(len(experts)):
                group.start_soon(ask_into, index)
        succeeded = [v for v in voices if v["status"] == "success"]
        if not succeeded:
            raise ProviderError(
                "every model consulted for consensus failed: "
                + "; ".join(f"{v['model']}: {v['error']}" for v in voices),
                hint="Retry later, or pick other models in `models` (see listmodels).",
            )
        synthesis = consensus_synthesis(proposal, voices)
        await self.runtime.require_storage().history.append(
            cid,
            "assistant",
            synthesis,
            session_id=session_id,
            tool_name=spec.name,
            metadata={
                state.EXPERT_KEY: True,
                "consensus": [{k: v[k] for k in ("model", "stance", "status")} for v in voices],
            },
        )
        out["status"] = "consensus_workflow_complete"
        out["consensus_complete"] = True
        out["accumulated_responses"] = voices
        out["complete_consensus"] = {
            "initial_prompt": proposal,
            "models_consulted": [f"{v['model']}:{v['stance']}" for v in voices],
            "total_responses": len(succeeded),
            "failed_models": [f"{v['model']}:{v['stance']}" for v in voices if v["status"] != "success"],
            "synthesis": synthesis,
        }
        out["next_steps"] = (
            "Consensus gathering is complete. Present to the user: where the models agree, where they "
            "disagree and why, your consolidated recommendation, concrete next steps, and the risks "
            "that must be addressed."
            + (" Some models failed; say which." if len(succeeded) < len(voices) else "")
        )
        out["metadata"]["workflow_type"] = "multi_model_consensus"
        out["metadata"]["models_consulted"] = out["complete_consensus"]["models_consulted"]
        return out

    # --- challenge --------------------------------------------------------------------------
    async def challenge(self, ctx: Context, arguments: Arguments) -> dict[str, Any]:
        statement = str(arguments["prompt"])
        if not statement.strip():
            raise InvalidArgument("prompt is empty", hint="Pass the statement to reassess.")
        storage = self.runtime.require_storage()
        session_id = self.runtime.session_for(headers_of(ctx))
        expert = None
        if arguments.get("use_assistant_model"):
            providers = self.runtime.providers
            assert providers is not None, "providers are opened by the lifespan"
            expert = providers.resolve(arguments.get("model") or "auto")
        cid = arguments.get("continuation_id")
        messages: list[Message] = []
        if cid:
            await self._check_thread(ctx, cid)
            messages = list(await storage.history.load(cid))
        else:
            cid = await storage.history.new_thread(
                session_id=session_id,
                tool_name="challenge",
                model=None,
                principal=self.runtime.principal_for(headers_of(ctx)),
            )
        wrapped = challenge_prompt(statement)
        await storage.history.append(
            cid, "user", wrapped, session_id=session_id, tool_name="challenge", metadata={"challenge": True}
        )
        content = {
            "original_statement": statement,
            "challenge_prompt": wrapped,
            "instructions": (
                "Follow challenge_prompt yourself: reassess the statement critically before you answer. "
                "Disagree or qualify it where the evidence says so, agree where it holds, and give your "
                "reasons either way."
            ),
        }
        out: dict[str, Any] = {
            "status": "success",
            "content": json.dumps(content, ensure_ascii=False),
            "content_type": "text",
            "continuation_id": cid,
            "metadata": {"tool_name": "challenge", "instance_id": self.runtime.identity.id},
        }
        if expert is not None:
            info, provider = expert
            consultation = await consult(
                ctx,
                self.runtime,
                thread=state.conversation(messages),
                prompt=wrapped,
                files=[],
                model=info,
                provider=provider,
                system_prompt=CHALLENGE_SYSTEM,
                temperature=arguments.get("temperature"),
                thinking_mode=arguments.get("thinking_mode"),
                label=f"challenge: waiting for {info.name}",
            )
            result = consultation.result
            await storage.history.append(
                cid,
                "assistant",
                result.content,
                session_id=session_id,
                tool_name="challenge",
                model=result.model,
                tokens_in=result.tokens_in,
                tokens_out=result.tokens_out,
                metadata={state.EXPERT_KEY: True, "provider": result.provider},
            )
            out["expert_analysis"] = {"status": "analysis_complete", "raw_analysis": result.content}
            out["metadata"].update(_model_metadata(consultation, []))
        return out


def _tokens(consultation: Consultation) -> dict[str, Any]:
    result = consultation.result
    return {
        "tokens_in": result.tokens_in,
        "tokens_out": result.tokens_out,
        "duration_ms": round(result.seconds * 1000, 1),
        "attempts": result.attempts,
    }


def _model_metadata(consultation: Consultation, files: Sequence[LoadedFile]) -> dict[str, Any]:
    result = consultation.result
    return {
        "model_used": result.model,
        "provider_used": result.provider,
        **_tokens(consultation),
        "history_turns_dropped": consultation.dropped,
        "files": [f.path for f in files],
        "notes": result.notes,
    }


def expert_prompt(spec: WorkflowSpec, work: state.Work, git: GitChanges | None) -> str:
    """What the expert model reads: the request, the work step by step, and the task."""
    sections = [f"=== {spec.name.upper()} REQUEST ===\n{work.initial_request}"]
    settings = {
        k: v
        for k, v in work.settings({f.name: f.default for f in spec.extra_fields}).items()
        if v not in (None, [], "") and k != "path"
    }
    if settings:
        sections.append(
            "=== SETTINGS ===\n"
            + "\n".join(f"{k}: {json.dumps(v, ensure_ascii=False)}" for k, v in settings.items())
        )
    sections.append("=== WORK, STEP BY STEP ===\n" + work.summary())
    if work.hypotheses:
        sections.append(
            "=== HYPOTHESES ===\n" + "\n".join(f"step {n} ({c}): {h}" for n, c, h in work.hypotheses)
        )
    if work.issues_found:
        sections.append(
            "=== ISSUES FOUND ===\n"
            + "\n".join(
                f"[{str(i.get('severity', 'unknown')).upper()}] {i.get('description', json.dumps(i))}"
                for i in work.issues_found
            )
        )
    if work.relevant_context:
        sections.append("=== RELEVANT CONTEXT ===\n" + "\n".join(work.relevant_context))
    if work.files_checked:
        sections.append("=== FILES EXAMINED ===\n" + "\n".join(work.files_checked))
    if git is not None:
        sections.append("=== GIT CHANGES ===\n" + git.as_prompt())
    sections.append(f"=== YOUR TASK ===\n{spec.expert_task}")
    if work.relevant_files:
        sections.append("The relevant files follow.")
    return "\n\n".join(sections)


def consensus_synthesis(proposal: str, voices: Sequence[dict[str, Any]]) -> str:
    """The verdicts side by side, as stored in the thread for whoever continues it."""
    lines = [f"Consensus on: {proposal}", ""]
    for v in voices:
        head = f"## {v['model']} ({v['stance']})"
        body = v["verdict"] if v["status"] == "success" else f"FAILED: {v['error']}"
        lines += [head, body, ""]
    ok = sum(1 for v in voices if v["status"] == "success")
    lines.append(f"{ok} of {len(voices)} models answered.")
    return "\n".join(lines)
