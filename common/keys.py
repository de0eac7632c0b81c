"""Every Redis key, channel and stream the fleet uses, in one place.

Router and instances build names only through `Keys`, so they can never disagree on a spelling,
and an operator can read the whole keyspace here. All names start with the configured prefix
(EXAI_REDIS_PREFIX, default "exai"), which also isolates test runs from one another.

Keyspace (with the default prefix):

    exai:instances                      SET   ids of instances that have registered
    exai:instance:{id}                  HASH  id, host, port, pid, state, session, started_at, heartbeat (TTL)
    exai:lease:{instance_id}            STR   session id holding the instance (SET NX PX, renewed)
    exai:lease-gen:{instance_id}        STR   counter: fencing token of the instance's latest lease
    exai:instance-cap                   STR   `exai scale N`: spares are started only below N running
    exai:routers                        SET   ids of router processes that have beaten (router/routers.py)
    exai:router:{id}                    STR   a router process's heartbeat (pid; TTL EXAI_HEARTBEAT_TTL)
    exai:draining                       SET   instance ids an operator drained (no new sessions)
    exai:sessions                       ZSET  session ids scored by last-seen time (idle sweep)
    exai:session:{sid}                  HASH  the router's session record (instance, principal, era, ...);
                                               instances add `link-header:{group}` once the session
                                               joined that group by its Exai-Link-Group header ("1"),
                                               or the words of its refusal ("refused: ..."); `router`:
                                               the router process that served it last
    exai:session-key:{key}              STR   stateless-era session key -> session id
    exai:links:{sid}                    SET   session ids linked to sid
    exai:link-stats                     HASH  fleet-wide link-group counters (events, notified, catch-ups,
                                               delivery lag sum/count) for the router's /metrics
    exai:events:{sid}                   STREAM server-to-client notifications of sid (bounded, expires
                                               with the session; Last-Event-ID catch-up)
    exai:chan:session:{sid}             PUBSUB "a new event is in exai:events:{sid}" (or "end")
    exai:listen:{token}                 STR   a 2026-07-28 listen stream (session, request id, filter)
    exai:chan:fleet                     PUBSUB fleet control (instance reset/drain notices)
    exai:chan:sessions                  PUBSUB "{sid} {ver} {router}": a session record changed (ver -1:
                                               ended); other routers re-read or drop their copy
    exai:chan:pressure                  PUBSUB "{router}": a session there waits for an instance; the
                                               other routers each park their longest-idle session
    exai:chan:link-members              PUBSUB "{group}": the group's membership changed (admin API, a
                                               session's end, link_leave); instances drop their copy
    exai:thread:{cid}                   LIST  recent turns of a thread (JSON), newest last
    exai:thread-meta:{cid}              HASH  thread metadata cache (`run`: Redis run_id it was checked on)
    exai:thread-pos:{cid}               STR   the thread's last exchange position (its sequencer)
    exai:thread-xids:{cid}              HASH  first turn id -> position of the thread's exchanges, as
                                               long as its counter lives (a re-sent append gets its
                                               first answer)
    exai:notes:{scope}:{scope_id}       STR   a copy of a note scope's rows (JSON; Postgres is the truth)
    exai:notes-gen:{scope}:{scope_id}   STR   counter: bumped after every committed note write of the scope
    (an instance reads the thread and notes keys on its tracking connection, which Redis then tells
     of every change to them: instance/storage/tracking.py)
    exai:cache:{name}:{key}             STR   generic short-lived cache entries
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Keys:
    prefix: str = "exai"

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    # instance registry
    def instances(self) -> str:
        return self._k("instances")

    def instance(self, instance_id: str) -> str:
        return self._k("instance", instance_id)

    def lease(self, instance_id: str) -> str:
        return self._k("lease", instance_id)

    def lease_generation(self, instance_id: str) -> str:
        return self._k("lease-gen", instance_id)

    def instance_cap(self) -> str:
        return self._k("instance-cap")

    def routers(self) -> str:
        """Router processes that have written a heartbeat (set of ids; pruned once adopted)."""
        return self._k("routers")

    def router(self, router_id: str) -> str:
        """A router process's heartbeat key (its pid, expiring after EXAI_HEARTBEAT_TTL)."""
        return self._k("router", router_id)

    def draining(self) -> str:
        return self._k("draining")

    # sessions
    def sessions(self) -> str:
        return self._k("sessions")

    def session(self, session_id: str) -> str:
        return self._k("session", session_id)

    def session_key(self, key: str) -> str:
        return self._k("session-key", key)

    def links(self, session_id: str) -> str:
        return self._k("links", session_id)

    def link_stats(self) -> str:
        return self._k("link-stats")

    @staticmethod
    def link_header_field(group: str) -> str:
        """The field of a session's record (`session(sid)`) that says its Exai-Link-Group header
        already joined it to `group`: the header joins once per session, not once per instance."""
        return f"link-header:{group}"

    def link_ends(self) -> str:
        """Sessions that ended and still have to leave their link groups (hash: id -> reason)."""
        return self._k("link-ends")

    def link_inflight(self, group: str) -> str:
        """A link group's events announced before Postgres stored them (sorted set: uuid, scored
        by the time in ms after which readers stop waiting for it)."""
        return self._k("link-inflight", group)

    def link_stream(self, group: str) -> str:
        """A link group's recent events (Redis stream, bounded; Postgres keeps the whole log)."""
        return self._k("link-stream", group)

    def events(self, session_id: str) -> str:
        return self._k("events", session_id)

    def session_channel(self, session_id: str) -> str:
        return self._k("chan", "session", session_id)

    def listen(self, token: str) -> str:
        return self._k("listen", token)

    def fleet_channel(self) -> str:
        return self._k("chan", "fleet")

    def sessions_channel(self) -> str:
        return self._k("chan", "sessions")

    def pressure_channel(self) -> str:
        """A router's session waits for an instance (its id published): the other routers each
        park one idle session of theirs (router/binding.py `relieve`)."""
        return self._k("chan", "pressure")

    def link_members_channel(self) -> str:
        """A link group's name, published when its members change (common/link_members.py)."""
        return self._k("chan", "link-members")

    # threads and caches
    def thread(self, continuation_id: str) -> str:
        return self._k("thread", continuation_id)

    def thread_meta(self, continuation_id: str) -> str:
        return self._k("thread-meta", continuation_id)

    def thread_pos(self, continuation_id: str) -> str:
        """The thread's turn-position counter (the sequencer of its exchanges; outlives the cache)."""
        return self._k("thread-pos", continuation_id)

    def thread_xids(self, continuation_id: str) -> str:
        """The positions given to the thread's exchanges, by their first turn's id."""
        return self._k("thread-xids", continuation_id)

    def notes(self, scope: str, scope_id: str) -> str:
        """A copy of one note scope (instance/storage/notes_cache.py)."""
        return self._k("notes", scope, scope_id)

    def notes_generation(self, scope: str, scope_id: str) -> str:
        """The scope's write counter: a copy is stored only if no write committed since its read."""
        return self._k("notes-gen", scope, scope_id)

    def cache(self, name: str, key: str) -> str:
        return self._k("cache", name, key)

    def pattern(self) -> str:
        """Glob matching every key of this prefix (for tests and `exai` maintenance)."""
        return self._k("*")
