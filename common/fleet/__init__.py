"""The fleet's control plane: what `exai` (and the tests' fleets) use to launch, scale, inspect
and stop the fleet under supervisord.

Blocking code, run from the command line, never on an event loop. The router and the instances
import nothing from here but `supervisor.SupervisorClient` (the router starts spare instances
through supervisord); the shared kernel they do import (settings, errors, keys, protocol, redis)
is the rest of `common`.

- services: where Postgres and Redis are (configured or embedded), generated secrets, the schema
- checks: pre-flight checks of `exai up` (ports, Redis)
- launch: config, supervisord, services, router and instances, and the waits until ready
- scale: `exai scale N`, parking the sessions of the instances that stop
- registry: the control plane's reads and writes of the fleet's Redis
- admin_client: the router's admin API over HTTP (sessions, links, drain, evict)
- supervisor: supervisord's config and its XML-RPC control
- embedded: the pip-installed Postgres and Redis servers
- cli: the `exai` command itself, a thin shell over the above
"""
