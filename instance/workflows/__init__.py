"""EXAI's workflow tools (thinkdeep, debug, codereview, consensus, …) over one step engine.

`spec` says what a tool is made of, `catalog` describes each tool as data, `state` folds the
steps recorded in a thread into the work so far, `engine` answers a step, `git` reads the
working tree for precommit and codereview. instance.tools.workflows registers them.
"""
