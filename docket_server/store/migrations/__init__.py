"""The metadata schema's Alembic migrations, run by ``SqlMetadataStore.open()``.

A new revision (after changing the tables in docket_server/store/sql.py)::

    alembic -c docket_server/store/migrations/alembic.ini revision --autogenerate \
        -x url=sqlite+aiosqlite:///path/to/a/current.db -m "what changes"

Alembic writes it under versions/; read it, name it ``revNNNN_what.py``, and keep it working
on both SQLite (batch mode: ALTER goes through a copy of the table) and PostgreSQL.
"""

from pathlib import Path

DIRECTORY = Path(__file__).parent
