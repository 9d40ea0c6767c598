"""The metadata schema's Alembic migrations, run by ``SqlMetadataStore.open()``.

A new revision, after changing the tables in docket_server/store/sql.py (``-x url=`` names a
database at the current head, e.g. one a server just made)::

    alembic -c docket_server/store/migrations/alembic.ini -x url=sqlite+aiosqlite:///x.db \
        revision --autogenerate --rev-id 0003 -m "what changes"

Alembic writes versions/rev0003_what_changes.py: read it, and keep it working on SQLite (batch
mode: an ALTER goes through a copy of the table) and on PostgreSQL. ``alembic ... check`` says
whether a database matches the tables; tests/test_sql_store.py checks both databases.
"""

from pathlib import Path

DIRECTORY = Path(__file__).parent
