#!/usr/bin/env bash
# A three-node mqchat cluster behind HAProxy on one machine, in the foreground; Ctrl-C stops it all.
#
#   config/cluster/run-local.sh
#
# Then: HTTP on 127.0.0.1:12003, MQTT on 12001, MQTT over WebSocket on 12002, HAProxy's stats
# on http://127.0.0.1:12004/stats; the nodes themselves on 12k01-12k03 (config/cluster/nk.toml).
#
# Needs PostgreSQL and Redis running, haproxy installed, mqchat importable. Environment:
#   MQCHAT_DATABASE_URL  default postgresql+asyncpg://postgres@127.0.0.1:5432/mqchat (created if missing)
#   MQCHAT_REDIS_URL     default redis://127.0.0.1:6379/0
#   MQCHAT_AUTH__SECRET  the token key every node shares; default: generated once into
#                        ./mqchat-data/cluster/secret (so tokens survive a restart)
#   MQCHAT               how to run mqchat (default: `mqchat` on PATH, else `python3 -m mqchat.cli`)
#   HAPROXY              default: haproxy on PATH, else /usr/sbin/haproxy
# Nodes' logs go to ./mqchat-data/cluster/nk.log, HAProxy's to ./mqchat-data/cluster/haproxy.log.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"  # the tomls' data_dir is relative to where mqchat starts

export MQCHAT_DATABASE_URL=${MQCHAT_DATABASE_URL:-postgresql+asyncpg://postgres@127.0.0.1:5432/mqchat}
export MQCHAT_REDIS_URL=${MQCHAT_REDIS_URL:-redis://127.0.0.1:6379/0}
if command -v mqchat >/dev/null; then read -r -a mqchat <<<"${MQCHAT:-mqchat}"
else read -r -a mqchat <<<"${MQCHAT:-python3 -m mqchat.cli}"; fi
haproxy=${HAPROXY:-$(command -v haproxy || echo /usr/sbin/haproxy)}
state=./mqchat-data/cluster
mkdir -p "$state"

# The database, created if missing: libpq wants postgresql://, without SQLAlchemy's driver.
libpq_url=${MQCHAT_DATABASE_URL/postgresql+asyncpg:/postgresql:}
dbname=${libpq_url##*/}; dbname=${dbname%%\?*}
admin_url=${libpq_url%/*}/postgres
if [[ -z $(psql "$admin_url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$dbname'") ]]; then
    echo "run-local: creating database $dbname"
    psql "$admin_url" -qc "CREATE DATABASE \"$dbname\""
fi

if [[ -z ${MQCHAT_AUTH__SECRET:-} ]]; then
    [[ -s $state/secret ]] || (umask 077; head -c 48 /dev/urandom | base64 | tr -d '\n/+=' >"$state/secret")
    MQCHAT_AUTH__SECRET=$(cat "$state/secret")
fi
export MQCHAT_AUTH__SECRET
# The browser page (served by whichever node HAProxy picks) connects to HAProxy's WebSocket port.
export MQCHAT_MQTT__PUBLIC_WS_PORT=${MQCHAT_LB_WS_PORT:-12002}

pids=()
stop() {
    trap - INT TERM EXIT
    echo "run-local: stopping"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait || true
}
trap stop EXIT
trap 'exit 130' INT TERM  # exit runs stop

for k in 1 2 3; do
    "${mqchat[@]}" serve --config "$here/n$k.toml" >>"$state/n$k.log" 2>&1 &
    pids+=($!)
    echo "run-local: node n$k (pid $!), log $state/n$k.log"
done
"$haproxy" -db -f "$here/haproxy.cfg" >>"$state/haproxy.log" 2>&1 &
pids+=($!)
echo "run-local: haproxy (pid $!): MQTT 127.0.0.1:${MQCHAT_LB_MQTT_PORT:-12001}," \
    "WebSocket ${MQCHAT_LB_WS_PORT:-12002}, HTTP ${MQCHAT_LB_HTTP_PORT:-12003}," \
    "stats http://127.0.0.1:${MQCHAT_LB_STATS_PORT:-12004}/stats; Ctrl-C stops everything"

# One of them exiting (a port taken, a bad config) stops the rest: a partial cluster is confusing.
wait -n || true
echo "run-local: a process exited; see the logs in $state" >&2
exit 1
