#!/usr/bin/env bash
# make demo: meshagent supervising two "pods" of local processes, from
# examples/demo.yaml. Works as any user: state and socket live in .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.demo
BIN=$ROOT/bin
SOCK=$DEMO/admin.sock
export MESHAGENT_SOCKET=$SOCK

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
say() { printf '   %s\n' "$*"; }
ctl() { "$BIN/meshagent" ctl "$@"; }
# get URL: one HTTP/1.0 request with bash alone (no curl needed); prints the body.
get() {
  local host=${1%:*} port=${1#*:} path=${2:-/}
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET %s HTTP/1.0\r\nHost: %s\r\n\r\n' "$path" "$host" >&3
  sed -e '1,/^\r$/d' <&3
  exec 3<&-
}
pid_of() { ctl pod "$1" --json | grep -A3 "\"name\": \"$2\"" | grep '"pid"' | head -1 | tr -dc 0-9; }
state_of() { ctl pod "$1" --json | grep -A4 "\"name\": \"$2\"" | grep '"state"' | head -1 | cut -d'"' -f4; }
wait_phase() { # pod phase [seconds]
  for _ in $(seq 1 $((${3:-15} * 20))); do
    ctl pod "$1" --json 2>/dev/null | grep -q "\"phase\": \"$2\"" && return 0
    sleep 0.05
  done
  echo "pod $1 not $2 in time" >&2; return 1
}

rm -rf "$DEMO"; mkdir -p "$DEMO"
AGENT_PID=
LOAD_PID=
cleanup() {
  if [ -n "$LOAD_PID" ]; then kill "$LOAD_PID" 2>/dev/null || true; fi
  if [ -n "$AGENT_PID" ] && kill -0 "$AGENT_PID" 2>/dev/null; then
    kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true
  fi
}
trap cleanup EXIT

bold "meshagent supervises pods of sidecars and apps (examples/demo.yaml)"
say "Each pod: a forwarding proxy (the sidecar, like MOSN/Envoy) in front of an HTTP app."
say "Rules: sidecars start first; apps start only once every sidecar is ready;"
say "a failed sidecar is restarted alone; on stop, apps drain first and sidecars outlive them."
if [ "$(id -u)" -ne 0 ]; then
  say "(running as $(id -un): root-only features such as cgroup CPU quotas and oom_score_adj are skipped)"
fi

bold "1. start the agent"
"$BIN/meshagent" run --config examples/demo.yaml 2>"$DEMO/agent.log" &
AGENT_PID=$!
say "agent pid $AGENT_PID, log in .demo/agent.log, admin socket .demo/admin.sock"
sleep 0.3
ctl pods
say "^ the sidecars are starting (they take ~1s to be ready); the apps wait at the gate."

wait_phase shop running; wait_phase search running
bold "2. the sidecars got ready, the gate opened, the apps started"
ctl pods
ctl events --pod shop | grep -E 'gate-open|ready |SEQ' || true
say "gate-open shows how long the apps were held; the app started right after the sidecar's readiness."

bold "3. traffic through the sidecar of pod shop (127.0.0.1:15001 -> app on :18080)"
for i in 1 2 3; do say "$(get 127.0.0.1:15001 /)"; done

bold "4. kill -9 the sidecar of pod shop: it is restarted alone"
APP_BEFORE=$(pid_of shop app); SC_BEFORE=$(pid_of shop proxy)
say "before: sidecar pid $SC_BEFORE, app pid $APP_BEFORE"
kill -9 "$SC_BEFORE"
for _ in $(seq 1 200); do
  SC_AFTER=$(pid_of shop proxy)
  [ -n "$SC_AFTER" ] && [ "$SC_AFTER" != "$SC_BEFORE" ] && [ "$(state_of shop proxy)" = ready ] && break
  sleep 0.05
done
APP_AFTER=$(pid_of shop app)
say "after:  sidecar pid $SC_AFTER, app pid $APP_AFTER"
if [ "$APP_BEFORE" = "$APP_AFTER" ]; then say "the app kept its pid: it never noticed."; else say "UNEXPECTED: the app was restarted"; exit 1; fi
ctl events --pod shop | grep -E 'restart|SEQ' || true
say "$(get 127.0.0.1:15001 /)"

bold "5. operator restart of one sidecar: meshagent ctl restart search/proxy"
ctl restart search/proxy
sleep 2
ctl pod search

# load SECONDS: bin/meshload against shop's sidecar in the background, table in .demo/load.txt.
load() {
  "$BIN/meshload" --target http://127.0.0.1:15001/ --rate 200 --duration "$1" --new-conn-ratio 0.5 >"$DEMO/load.txt" 2>&1 &
  LOAD_PID=$!
}
# load_report: wait for the client and tell its figures.
load_report() {
  wait "$LOAD_PID" || true
  sed 's/^/   | /' "$DEMO/load.txt"
  local total failed refused
  total=$(awk '$1 == "total" {print $2}' "$DEMO/load.txt")
  failed=$(awk '$1 == "total" {print $4}' "$DEMO/load.txt")
  refused=$(awk '$1 == "refused" {print $2}' "$DEMO/load.txt")
  if [ "$failed" = 0 ]; then
    say "the client saw zero errors: $total requests, 0 refused, 0 failed."
  elif [ "$refused" = 0 ]; then
    say "0 refused; $failed of $total requests were in flight on the killed process (a crash can lose those, nothing else)."
  else
    say "UNEXPECTED: $refused refused connections"; exit 1
  fi
}

bold "6. hot upgrade of shop's sidecar to v2 while a client sends 200 requests/s"
say "meshagent holds the sidecar's listening sockets (examples/demo.yaml: handoff), starts v2 beside v1 on"
say "the same sockets, waits for v2's READY=1, then lets v1 drain and exit. The app is not touched."
APP_BEFORE=$(pid_of shop app)
say "before: $(get 127.0.0.1:15000 /version)"
load 5s
sleep 1
UPGRADE_ARGS=()
for a in --listen 127.0.0.1:15001 --admin 127.0.0.1:15000 --upstream 127.0.0.1:18080 --ready-after 1s --version v2; do
  UPGRADE_ARGS+=("--arg=$a")
done
ctl upgrade shop/proxy --command "$BIN/demo-sidecar" "${UPGRADE_ARGS[@]}" --version v2
say "after:  $(get 127.0.0.1:15000 /version)"
load_report
[ "$(pid_of shop app)" = "$APP_BEFORE" ] && say "the app kept its pid $APP_BEFORE."
ctl events --pod shop | grep -E 'upgrade|cause=upgrade|SEQ' || true
say "a v2 that never got ready, or died within the watch window, would have been rolled back to v1."

bold "7. kill -9 shop's sidecar while a client sends 200 requests/s"
say "the sockets stay open in meshagent's fd store: connections wait in the kernel's queue"
say "for the restarted sidecar instead of being refused."
load 4s
sleep 1
SC_BEFORE=$(pid_of shop proxy)
kill -9 "$SC_BEFORE"
for _ in $(seq 1 200); do
  SC_AFTER=$(pid_of shop proxy)
  [ -n "$SC_AFTER" ] && [ "$SC_AFTER" != "$SC_BEFORE" ] && [ "$(state_of shop proxy)" = ready ] && break
  sleep 0.05
done
say "sidecar pid $SC_BEFORE killed, restarted as pid $SC_AFTER"
load_report
say "requests sent while it was down waited in the queue (the demo sidecar takes 1s to get ready): slower, not failed."

bold "8. stop the agent: an ordered stop (apps first, then sidecars)"
LINES=$(wc -l <"$DEMO/agent.log")
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || true
AGENT_PID=
LOAD_PID=
tail -n +"$((LINES + 1))" "$DEMO/agent.log" | grep -E 'to=stopping|to=exited|to=stopped' |
  sed -e 's/^time=[^ ]* level=INFO //' | sed 's/^/   /'
say "each app exited before its sidecar was signalled."
bold "done (logs of every process in .demo/state/logs/)"
