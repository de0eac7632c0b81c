"""Context engineering: everything between a thread in storage and the messages sent.

`build_prompt` (in `builder`) is the entry point every tool calls once per provider call. Its
modules: `tokens` (exact counts offline), `stripping` (phase 1: echoes of stored turns cut on
the way in), `scoring` and `compaction` (phase 2: history fitted to a token budget).
"""

from instance.context.builder import Block, BuiltPrompt, ContextPolicy, Turn, build_prompt
from instance.context.tokens import TokenCounter, counter_for

__all__ = ["Block", "BuiltPrompt", "ContextPolicy", "TokenCounter", "Turn", "build_prompt", "counter_for"]
