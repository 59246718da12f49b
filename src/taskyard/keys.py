"""The Redis key schema: every key taskyard writes, behind one namespace prefix.

All keys of one batch name share a ``{hash tag}`` (``{<namespace>:b:<batch>}``) so the
Lua scripts that touch several of them also run on Redis Cluster. Each method's docstring gives
the structure and its lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace (``Settings.namespace``)."""

    namespace: str = "taskyard"

    # --- batching -------------------------------------------------------------------------
    # Every key of one batch name shares the hash tag ``{<namespace>:b:<batch>}``: the Lua
    # scripts of batching/buffer.py touch several of them atomically (and build the per-group
    # and per-batch names from batch_prefix), which Redis Cluster allows only within one slot.
    def batch_tag(self, batch_name: str) -> str:
        """Hash tag shared by every key of one batch name (all its groups and batches)."""
        return f"{{{self.namespace}:b:{batch_name}}}"

    def batch_prefix(self, batch_name: str) -> str:
        """Prefix of every key of one batch name; the Lua scripts append the suffixes below."""
        return f"{self.batch_tag(batch_name)}:"

    def batch_buffer(self, batch_name: str, group: str = "") -> str:
        """LIST of JSON items of one group waiting to be batched, oldest first. Renamed into a
        batch when full; at rest shorter than batch_size; all groups bounded by max_buffered."""
        return f"{self.batch_prefix(batch_name)}buf:{group}"

    def batch_oldest(self, batch_name: str) -> str:
        """ZSET group -> arrival (ms since epoch, Redis clock) of its oldest buffered item; only
        groups with a non-empty buffer. The age-flush index the reaper scans."""
        return f"{self.batch_prefix(batch_name)}oldest"

    def batch_groups(self, batch_name: str) -> str:
        """SET of the groups (key-function values) that ever buffered items, for inspection.
        Kept; one member per distinct key."""
        return f"{self.batch_prefix(batch_name)}groups"

    def batch_seq(self, batch_name: str) -> str:
        """STRING counter giving batch ids (unique per batch name). Kept."""
        return f"{self.batch_prefix(batch_name)}seq"

    def batch_items(self, batch_name: str, batch_id: str) -> str:
        """LIST of the JSON items of one claimed batch. Deleted when the batch succeeds or is
        purged from the dead letters."""
        return f"{self.batch_prefix(batch_name)}items:{batch_id}"

    def batch_meta(self, batch_name: str, batch_id: str) -> str:
        """HASH of one claimed batch: group, size, reason, created, state (queued, running,
        retry, dead), attempts, deliveries, owner, error. Deleted with the batch's items."""
        return f"{self.batch_prefix(batch_name)}meta:{batch_id}"

    def batch_leases(self, batch_name: str) -> str:
        """ZSET batch id -> lease deadline (ms since epoch) of claimed, unfinished batches; the
        reaper republishes members past their deadline. A member leaves on success or death."""
        return f"{self.batch_prefix(batch_name)}leases"

    def batch_dead(self, batch_name: str) -> str:
        """ZSET batch id -> time it died (ms since epoch) of batches that exhausted their
        retries. Kept until requeued or purged by an operator."""
        return f"{self.batch_prefix(batch_name)}dead"

    def batch_pending(self, batch_name: str) -> str:
        """STRING count of accepted, unfinished items (buffered plus in flight), checked against
        max_buffered. Kept."""
        return f"{self.batch_prefix(batch_name)}pending"

    def batch_stats(self, batch_name: str) -> str:
        """HASH "<counter>:<group>" -> count (processed, failed, dead_items, duplicates,
        flush_size, flush_age, ...). Kept."""
        return f"{self.batch_prefix(batch_name)}stats"

    def batch_conf(self, batch_name: str) -> str:
        """HASH of a batch's definition (task, level, batch_size, max_wait_ms, lease_ms) so any
        process can reap it without importing its code. Rewritten by each producer process."""
        return f"{self.batch_prefix(batch_name)}conf"

    def batch_registry(self) -> str:
        """SET of batch names that ever buffered items, for the reaper and inspection. Kept."""
        return f"{self.namespace}:batches"

    # --- broker-side delays (in the broker's Redis, under kombu's global_keyprefix) ---------
    def delayed(self, queue: str) -> str:
        """ZSET of one queue's messages waiting for their ETA: member "<priority step>:<kombu
        message JSON>", score = due time (ms since epoch). A member leaves when the mover pushes
        it onto its queue's priority sub-list."""
        return f"{self.namespace}:delayed:{queue}"

    def delayed_queues(self) -> str:
        """SET of the queue names that ever had a delayed message, so a mover needs no list of
        queues. Kept; one member per queue."""
        return f"{self.namespace}:delayed"

    # --- workers and guards ---------------------------------------------------------------
    def worker_heartbeat(self, hostname: str) -> str:
        """STRING (JSON) with a worker's readings, paused queues and deferral counts: hostname,
        pid, at (s since epoch), queues, paused_queues, memory_pct, cpu_pct, memory_source
        ("cgroup"|"host"), memory_available_mb, memory_total_mb, state ("ok"|"warning"|
        "critical"), deferred, overdue, limit_exceeded, guards_enabled, interval_s. Rewritten
        every heartbeat interval; expires after interval + slack, so a dead worker disappears;
        deleted on a clean shutdown."""
        return f"{self.namespace}:worker:{hostname}"

    def workers(self) -> str:
        """ZSET hostname -> last heartbeat time, for listing workers. A clean shutdown removes
        its member; members older than the heartbeat TTL are stale and pruned by the readers."""
        return f"{self.namespace}:workers"

    def task_resources(self) -> str:
        """HASH task name -> JSON {runs, cpu_s, cpu_max_s, rss_growth_mb, rss_growth_max_mb,
        memory_limit_exceeded, cpu_limit_exceeded, updated_at}: totals and maxima over every run
        of every worker, merged by a Lua script. Kept."""
        return f"{self.namespace}:resources"

    # --- periodic jobs ----------------------------------------------------------------------
    def lock(self, name: str) -> str:
        """STRING holding the owner token of a single-flight lock. Expires with the lock's TTL."""
        return f"{self.namespace}:lock:{name}"

    def period_claim(self, job: str, period: int) -> str:
        """STRING claiming one period of a periodic job, so duplicated beats run it once.
        Expires after two periods."""
        return f"{self.namespace}:period:{job}:{period}"

    def cache_value(self, cache_namespace: str, key: str) -> str:
        """STRING: one cached value (JSON envelope). Expires with its TTL."""
        return f"{self.namespace}:cache:{cache_namespace}:{key}"

    def cache_tag_version(self, tag: str) -> str:
        """STRING counter: current version of a tag; bumping it invalidates every entry stored
        under older versions. One key per tag, never grows."""
        return f"{self.namespace}:cache-tag:{tag}"

    def cache_recompute(self, cache_namespace: str, key: str) -> str:
        """STRING: token of the one process recomputing a cache entry (stampede protection).
        Expires after ``cache.stampede_wait_s``; deleted when the value is stored."""
        return f"{self.namespace}:cache-lock:{cache_namespace}:{key}"

    def cache_namespaces(self) -> str:
        """SET of cache namespaces that have statistics, for the stats API. Kept; one member per
        namespace."""
        return f"{self.namespace}:cache-namespaces"

    def cache_warm_last(self) -> str:
        """STRING (JSON): report of the last cache-warming run. Kept; overwritten each run."""
        return f"{self.namespace}:cache-warm:last"

    def slow_statements(self) -> str:
        """HASH "<task>" -> count and "<task>\x1fseconds" -> total seconds of SQL statements
        slower than ``maintenance.slow_statement_s``, per task ("-" outside tasks). Kept."""
        return f"{self.namespace}:db:slow"

    def cache_stats(self, cache_namespace: str) -> str:
        """HASH of hit, miss, and latency counters for one cache namespace. Kept."""
        return f"{self.namespace}:cache-stats:{cache_namespace}"

    def maintenance_last(self) -> str:
        """STRING (JSON): the last maintenance run's report. Kept; history lives in the DB."""
        return f"{self.namespace}:maintenance:last"

    # --- monitoring ---------------------------------------------------------------------------
    def task_counts(self) -> str:
        """HASH "<task>\\x1f<queue>\\x1f<event>" -> count, written by workers in batches. Kept."""
        return f"{self.namespace}:stats:counts"

    def task_histogram(self, kind: str) -> str:
        """HASH "<task>\\x1f<queue>\\x1f<bucket>" -> count for runtime or wait histograms. Kept."""
        return f"{self.namespace}:stats:hist:{kind}"

    def series(self, name: str) -> str:
        """LIST of JSON snapshots, newest first, capped at ``series_length`` by LTRIM."""
        return f"{self.namespace}:series:{name}"

    def alerts(self) -> str:
        """HASH alert id -> JSON state (firing since, resolved at). Resolved alerts are pruned
        after the history retention."""
        return f"{self.namespace}:alerts"

    def alert_history(self) -> str:
        """LIST of JSON alert state changes (fired, severity changed, resolved), newest first,
        capped at ``alert_history_length`` by LTRIM: the dashboard's recent alert history."""
        return f"{self.namespace}:alerts:history"

    def stats_state(self) -> str:
        """STRING (JSON): the previous stats collection's cumulative counters and histograms,
        from which the next run derives rates and window percentiles. Overwritten each run."""
        return f"{self.namespace}:stats:state"

    # --- dead letters, delivery counts, timelines ---------------------------------------------
    # Every dead-letter key shares the hash tag ``{<namespace>:dead}``: the Lua scripts of
    # deadletters/store.py change the entries, their indexes and the counts in one step.
    def dead_prefix(self) -> str:
        """Prefix of every dead-letter key; the Lua scripts append the index suffixes."""
        return f"{{{self.namespace}:dead}}:"

    def dead_entries(self) -> str:
        """HASH entry id (the task id) -> JSON entry. Bounded by dead_letters.max_entries and
        retention_s; an entry leaves when trimmed or purged (a replayed one stays, marked)."""
        return f"{self.dead_prefix()}entries"

    def dead_index(self) -> str:
        """ZSET entry id -> time of its last death (s since epoch), every entry: the age and
        count bound, and the time order of listings."""
        return f"{self.dead_prefix()}index"

    def dead_by(self, field: str, value: str) -> str:
        """ZSET entry id -> last death time of the entries whose ``field`` (name, queue, reason,
        exception, state) is ``value``: search without a scan. Kept in step by the scripts."""
        return f"{self.dead_prefix()}by:{field}:{value}"

    def dead_counts(self) -> str:
        """HASH "<queue>\\x1f<name>\\x1f<reason>" -> entries in state "dead", for the
        taskyard_dead_tasks gauge. Kept in step by the scripts; a field at 0 is deleted."""
        return f"{self.dead_prefix()}counts"

    def deliveries(self, task_id: str) -> str:
        """STRING count of redeliveries of one task message (first deliveries are not
        counted). Expires dead_letters.delivery_count_ttl_s after the last redelivery; deleted
        when the message goes to the dead letters."""
        return f"{self.namespace}:deliveries:{task_id}"

    def timeline_pending(self) -> str:
        """LIST of packed task timeline events written by the capture's flush, oldest first,
        capped at dead_letters.timeline_max_pending; drained into the history database by the
        stats collection."""
        return f"{self.namespace}:timeline:pending"

    # --- broker (taskyard's Redis transport; under kombu's global_keyprefix too) ------------
    def wake_stream(self, queue: str) -> str:
        """STREAM of wake entries of one queue: a producer adds one when it makes one of the
        queue's lists non-empty, and idle workers block on XREAD of it. Capped at about 100
        entries (XADD MAXLEN ~); no entry is ever read as data."""
        return f"{self.namespace}:wake:{queue}"

    def script_prefix(self) -> str:
        """Prefix (ARGV[1]) from which the fetch and ack scripts' fragments name their keys
        (``broker/fetch.lua``): flow and job control state, each suffix listed here when a
        fragment adds one: ``flow:`` (flow control, below), ``jobs:`` (job control, below)."""
        return f"{self.namespace}:"

    def dead_upkeep_lock(self) -> str:
        """STRING held (SET NX PX of the upkeep interval) by the worker doing this interval's
        dead-letter upkeep (quarantine ingest, retention); expires by itself."""
        return f"{self.dead_prefix()}upkeep"

    def broker_quarantine(self) -> str:
        """LIST of raw queue items the fetch script could not read as kombu messages (not
        JSON, no delivery tag), newest first, capped at 10,000. Kept for an operator."""
        return f"{self.namespace}:broker:undecodable"

    # --- operators: users, sessions, the audit trail ------------------------------------------
    def users(self) -> str:
        """HASH user name -> JSON {role, password hash (argon2), created}. Kept until
        ``taskyard users remove``."""
        return f"{self.namespace}:users"

    def user_tokens(self) -> str:
        """HASH SHA-256 of an API token -> user name. A token leaves with its user; the token
        itself is never stored."""
        return f"{self.namespace}:users:tokens"

    def session(self, digest: str) -> str:
        """STRING (JSON {user, csrf}) of one browser session, by the SHA-256 of its cookie.
        Expires monitoring.session_ttl_s after login; deleted at logout."""
        return f"{self.namespace}:session:{digest}"

    def notice(self, token: str) -> str:
        """STRING (JSON {user, message}) of what a dashboard form just did, for the page its
        redirect names by ``token``. Expires after monitoring.dashboard.layout.NOTICE_TTL_S."""
        return f"{self.namespace}:notice:{token}"

    def audit(self) -> str:
        """STREAM of operator actions (who, role, action, target, count, detail), oldest
        first, capped at about monitoring.audit_max_entries (XADD MAXLEN ~)."""
        return f"{self.namespace}:audit"

    # --- flow control (taskyard.flow; in the broker's Redis under kombu's global_keyprefix) ----
    # broker/control/flow.lua names every flow key as script_prefix() .. 'flow:' .. suffix (the
    # prefix arrives in ARGV[1]), so the names below and that fragment must agree.
    def flow_prefix(self) -> str:
        """Prefix of every flow-control key (``script_prefix() + "flow:"``)."""
        return f"{self.script_prefix()}flow:"

    def flow_rules(self) -> str:
        """HASH the fetch reads once per call: t:<task> -> compiled limits, p:<pattern> ->
        paused task glob, l:<list key> -> a list of a paused queue, r:<list> -> the list has held
        buckets, lease -> the reservation lease (s) the workers use,
        w:<task>|<value> -> fair-share weight. Rewritten from the declared limits, overrides,
        pauses and weights on every change; r: fields are the fetch's own. Kept."""
        return f"{self.flow_prefix()}rules"

    def flow_declared(self) -> str:
        """HASH task -> JSON limits from its decorator, written by each worker at start. Kept."""
        return f"{self.flow_prefix()}declared"

    def flow_overrides(self) -> str:
        """HASH task -> JSON limits set at run time (``taskyard limits set``); they win over the
        declared ones field by field. Removed by ``limits clear``."""
        return f"{self.flow_prefix()}overrides"

    def flow_pauses(self) -> str:
        """HASH "queue:<name>" or "task:<glob>" -> JSON {key: paused-at, s}; a field is removed
        when its last key resumes. Kept (durable pause)."""
        return f"{self.flow_prefix()}pauses"

    def flow_weights(self) -> str:
        """HASH "<task>|<value>" -> fair-share weight of one partition value. Kept."""
        return f"{self.flow_prefix()}weights"

    def flow_ring(self, list_key: str) -> str:
        """ZSET bucket ("<task>\\0<partition value>") -> virtual time of one queue list's held
        buckets (fair share serves the lowest first). A member leaves when its bucket empties."""
        return f"{self.flow_prefix()}ring:{list_key}"

    def flow_bucket(self, list_key: str, bucket: str) -> str:
        """LIST of the held messages of one bucket of one queue list, oldest at the right (like
        the queue lists). Deleted by Redis when served empty."""
        return f"{self.flow_prefix()}h:{list_key}\0{bucket}"

    def flow_slots(self, scope: str) -> str:
        """ZSET tag -> last lease renewal (s) of the concurrency slots of one scope (a task, or
        "<task>\\0<value>" when partitioned). A member leaves on release or when its lease ends."""
        return f"{self.flow_prefix()}s:{scope}"

    def flow_tags(self) -> str:
        """HASH tag -> scope of every tag holding a concurrency slot; removed with the slot."""
        return f"{self.flow_prefix()}tags"

    def flow_rate(self, scope: str) -> str:
        """STRING theoretical arrival time (s) of one scope's rate limit (GCRA); expires one
        period after it is in the past."""
        return f"{self.flow_prefix()}r:{scope}"

    def flow_started(self, task: str) -> str:
        """HASH ten-second slot -> reservations of a limited task; expires after 130 s idle."""
        return f"{self.flow_prefix()}n:{task}"

    def flow_wake(self) -> str:
        """STREAM (capped near 100) a worker waiting for held work also reads: an entry on a slot
        release and on every rules change."""
        return f"{self.flow_prefix()}wake"

    # --- job control (broker/control/jobs.py; in the broker's Redis, under kombu's
    # global_keyprefix: the fetch script reads them) -----------------------------------------
    # broker/control/jobs.lua names every key as script_prefix() .. 'jobs:' .. suffix, so the
    # names below and that fragment (and publish_unique.lua, publish_bulk.lua) must agree.
    def jobs_prefix(self) -> str:
        """Prefix of every job-control key (``script_prefix() + "jobs:"``)."""
        return f"{self.script_prefix()}jobs:"

    def jobs_lease(self) -> str:
        """STRING: the reservation lease (ms) under which a reserved "active" message holds its
        unique lock; written by each consuming channel at start. Kept."""
        return f"{self.jobs_prefix()}lease"

    def cancel_index(self) -> str:
        """ZSET task id -> time cancelled (s since epoch): the durable cancel records every
        fetch checks (one ZCARD per fetch call, a ZSCORE per message only when non-empty).
        Members older than jobs.cancel_retention_s are pruned by the next cancel."""
        return f"{self.jobs_prefix()}cancel"

    def cancel_info(self) -> str:
        """HASH task id -> JSON {at, by, terminate, grace_s, outcome, outcome_at}: who cancelled
        and what became of the task ("dropped" at reservation, "skipped" before running,
        "stopped" by the task, "terminated"). Pruned with cancel_index."""
        return f"{self.jobs_prefix()}cancel:info"

    def unique_lock(self, task_name: str, digest: str) -> str:
        """STRING holding the id of the task message that owns one unique/throttle key
        (HASH {id, member} for debounce). Unique: set at publish with jobs.unique_ttl_s, then
        leased at reservation ("active") or deleted ("queued"), deleted at ack, dead letter or
        cancel; throttle: expires after the window; debounce: expires after the delay."""
        return f"{self.jobs_prefix()}lock:{task_name}:{digest}"

    def unique_tags(self) -> str:
        """HASH delivery tag -> "<task id> <lock key>" of reserved messages holding a unique
        lock ("active"), written by the fetch, removed by the release hook at ack, reject or
        restore; the lock's own lease expiry bounds a lost entry's effect."""
        return f"{self.jobs_prefix()}tags"

    def jobs_counts(self) -> str:
        """HASH "<task>\x1f<event>" -> count of job-control outcomes (deduplicated, throttled,
        debounced, cancelled) for /metrics. Kept."""
        return f"{self.jobs_prefix()}counts"

    def progress(self, task_id: str) -> str:
        """STRING (JSON {done, total, detail, at}) of a running task's last progress report, in
        the app's Redis. Expires jobs.progress_ttl_s after the last write."""
        return f"{self.namespace}:progress:{task_id}"
