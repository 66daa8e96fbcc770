"""The local stack's PostgreSQL databases: one URL in settings, two databases on the server.

With ``database_url`` set, MLflow and Prefect use two databases on that PostgreSQL server (both keep their
migrations in a table called ``alembic_version``, so they cannot share one): the database named in the URL
for MLflow, ``<database>_prefect`` beside it for Prefect. ``kiln up`` creates them when missing.

The URLs carry the password: they go to the servers in their environment (``MLFLOW_BACKEND_STORE_URI``,
``PREFECT_SERVER_DATABASE_CONNECTION_URL``), and what is shown of them is redacted.
"""

from __future__ import annotations

from pydantic import SecretStr

from kiln.errors import ConfigError


def database_urls(database_url: str | SecretStr) -> tuple[str, str]:
    """MLflow's URL (the database given) and Prefect's (``<database>_prefect`` on the same server, asyncpg)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if isinstance(database_url, SecretStr):
        database_url = database_url.get_secret_value()
    try:
        url = make_url(database_url.replace("postgres://", "postgresql://", 1))
    except (ArgumentError, ValueError) as exc:  # the text would show the password: say what, not where
        raise ConfigError(f"KILN_DATABASE_URL is not a database URL ({type(exc).__name__}); write "
                          "postgresql://USER:PASSWORD@HOST:5432/DATABASE") from None
    if url.get_backend_name() != "postgresql" or not url.database:
        raise ConfigError("KILN_DATABASE_URL must name a PostgreSQL database: postgresql://USER:PASSWORD@HOST:5432/DB")
    query = dict(url.query)
    if "sslmode" in query:  # asyncpg spells libpq's sslmode "ssl"
        query["ssl"] = query.pop("sslmode")
    prefect = url.set(drivername="postgresql+asyncpg", database=f"{url.database}_prefect", query=query)
    mlflow = url.set(drivername="postgresql+psycopg")  # explicit: SQLAlchemy 2.0 would pick psycopg2, 2.1 psycopg
    return mlflow.render_as_string(hide_password=False), prefect.render_as_string(hide_password=False)


def ensure_databases(database_url: str | SecretStr) -> list[str]:
    """Create MLflow's and Prefect's databases on the server when missing; returns the names created."""
    try:
        import psycopg
        from psycopg import sql
    except ImportError as exc:
        raise ConfigError("KILN_DATABASE_URL needs the PostgreSQL driver: pip install 'kiln-mlops[stores]'") from exc
    from sqlalchemy.engine import make_url

    url = make_url(database_urls(database_url)[0])
    names = [url.database, f"{url.database}_prefect"]
    params = {"host": url.host, "port": url.port or 5432, "user": url.username, "password": url.password,
              "dbname": "postgres", "connect_timeout": 10, **dict(url.query)}
    created = []
    try:
        conn = psycopg.connect(autocommit=True, **{k: v for k, v in params.items() if v is not None})
    except psycopg.Error as exc:
        raise ConfigError(f"cannot reach PostgreSQL at {url.host}:{url.port or 5432} as {url.username} "
                          f"({_first_line(exc, url.password)}); check KILN_DATABASE_URL") from None
    try:  # autocommit: CREATE DATABASE cannot run in a transaction
        with conn.cursor() as cur:
            for name in names:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    created.append(name)
    except psycopg.Error as exc:
        raise ConfigError(f"cannot create database(s) {', '.join(names)} ({_first_line(exc, url.password)}); "
                          f"create them or grant {url.username} CREATEDB") from None
    finally:
        conn.close()
    return created


def _first_line(exc: Exception, password: str | None) -> str:
    """The driver's message, first line, with the password masked should the driver echo it."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line.replace(password, "***") if password else line
