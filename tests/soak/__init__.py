"""The soak run: a real fleet under a realistic mix of clients for an hour (or two minutes in CI).

    .venv/bin/python -m tests.soak                      # one hour, default mix and fault schedule
    .venv/bin/python -m tests.soak --duration 2m        # what .ci/run does
    .venv/bin/python -m tests.soak --report FILE.json   # verdict and plot again from a saved run

Not part of the pytest run (no test files here). Modules, one concept each:

- `mix.py`      the clients: sessions of both eras running pluggable scenarios, the call log
- `acks.py`     the acknowledgement log of every acknowledged write, checked against Postgres
- `services.py` the servers the soak owns (its Redis, a cuttable path to Postgres) and faults
- `probes.py`   sampling: RSS and fds from /proc, Postgres/Redis connections, keys, spool backlog
- `verdict.py`  slope tests and the other checks that make the run pass or fail
- `report.py`   JSON, PNG (matplotlib, optional) and the summary paragraph
- `run.py`      the command line and the run itself
"""
