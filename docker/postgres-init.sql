-- Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d), as POSTGRES_USER.
-- MLflow keeps POSTGRES_DB (kiln); Prefect gets its own database: both name their migration table
-- alembic_version, so they cannot share one. The names are the ones `kiln up` derives from KILN_DATABASE_URL.
CREATE DATABASE kiln_prefect;
