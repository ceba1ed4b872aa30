#!/usr/bin/env bash
# Runs once, when PostgreSQL starts on an empty data volume (docker-entrypoint-initdb.d):
# the databases beside POSTGRES_DB (= mlflow, the runs): basic auth's users, and Optuna's studies.
set -euo pipefail
for database in mlflow_auth optuna; do
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
        -c "CREATE DATABASE ${database} OWNER ${POSTGRES_USER}"
done
