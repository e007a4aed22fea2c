#!/usr/bin/env bash
# What a fresh Debian machine needs besides Python 3.11+ for the whole test suite:
#   - mosquitto-clients: the interop tests drive mosquitto_pub and mosquitto_sub;
#   - tmux: the terminal chat is tested on a real terminal;
#   - redis-server and haproxy: the cluster tests start their own Redis (so they can kill it) and
#     put HAProxy in front of three nodes;
#   - prometheus (for promtool): the monitoring tests check the alert rules;
#   - chromium: the browser page's and /docs' tests drive Debian's Chromium through Playwright
#     (the Python package comes with the test extra; Playwright's own browser download is not used);
#   - a PostgreSQL server on 127.0.0.1:5432 with a database `test` (user postgres, no password),
#     started here if it is installed but not running. Without it the PostgreSQL tests skip
#     (they fail under MQCHAT_REQUIRE_SERVICES=1, as in CI).
# Needs root for apt-get. Safe to run again: it installs only what is missing.
set -euo pipefail

missing=()
command -v tmux >/dev/null || missing+=(tmux)
command -v mosquitto_pub >/dev/null && command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v promtool >/dev/null || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

if command -v pg_isready >/dev/null && ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
fi
