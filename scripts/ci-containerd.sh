#!/usr/bin/env bash
# Set up a real containerd for the Kubernetes tests (issue 5), on private paths.
#
#   scripts/ci-containerd.sh [LANE] [ACTION] [INSTANCE]
#
#   LANE     v2 (default): containerd v2.2.9 built from source, NRI enabled
#            v1:           Debian's containerd 1.6 (apt), no NRI
#   ACTION   start (default): install/build what is missing, write the config,
#                             start the daemon if it is not answering, import
#                             the test images; idempotent
#            stop:    stop the daemon (shims and containers keep running, as
#                     when containerd is restarted on a node)
#            restart: stop, then start (no image import)
#            destroy: kill every task of the instance, stop the daemon, unmount
#                     and delete its root and state
#   INSTANCE a name for a separate daemon with its own paths (default
#            containerd2 for v2, containerd16 for v1); tests that restart
#            containerd start their own instance so they disturb nobody
#
#   scripts/ci-containerd.sh env
#            print the export lines the tests read (default instances)
#
# Runs as root on Debian 12 with Go at /usr/local/go; reaches only the Go
# module proxy and Debian's archive (runc, containernetworking-plugins, and
# containerd for v1). Pods that do not use the host network are attached to a
# bridge meshci0 (10.88.0.0/16, no NAT, no iptables; the bridge plugin turns
# on net.ipv4.ip_forward). Binaries and images are cached under
# $MESHAGENT_CI_CACHE (default /var/cache/meshagent-ci), so a second run is fast.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
SCRIPT=$REPO/scripts/ci-containerd.sh
CACHE=${MESHAGENT_CI_CACHE:-/var/cache/meshagent-ci}
V2_VERSION=v2.2.9
V2_BIN=$CACHE/containerd-$V2_VERSION/bin
IMAGES=$CACHE/images
PAUSE_IMAGE=meshagent.test/pause:1
CNI_BIN=/usr/lib/cni # Debian's containernetworking-plugins
CNI_BRIDGE=meshci0
CNI_SUBNET=10.88.0.0/16
export PATH=/usr/local/go/bin:$PATH

log() { echo "ci-containerd: $*" >&2; }
die() { log "$*"; exit 1; }

lane=${1:-v2}
action=${2:-start}
case $lane in
v2) default_inst=containerd2 ;;
v1) default_inst=containerd16 ;;
esac
case $lane in
v2 | v1) inst=${3:-$default_inst} ;;
env)
	cat <<EOF
export MESHAGENT_TEST_CONTAINERD=/run/meshagent-ci/containerd2/containerd.sock
export MESHAGENT_TEST_NRI_SOCKET=/run/meshagent-ci/containerd2/nri.sock
export MESHAGENT_TEST_CONTAINERD16=/run/meshagent-ci/containerd16/containerd.sock
export MESHAGENT_TEST_CONTAINERD_SCRIPT=$SCRIPT
EOF
	exit 0
	;;
*) die "unknown lane '$lane' (want v2, v1 or env)" ;;
esac
[[ $inst =~ ^[a-zA-Z0-9_.-]+$ ]] || die "bad instance name '$inst'"

RUN=/run/meshagent-ci/$inst
ROOT=/var/lib/meshagent-ci/$inst
SOCK=$RUN/containerd.sock
NRI_SOCK=$RUN/nri.sock
CONF=$RUN/config.toml
PIDFILE=$RUN/containerd.pid
LOG=$RUN/containerd.log

if [[ $lane == v2 ]]; then
	BIN_PATH=$V2_BIN:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
else
	# Debian's own shim must win over the v2 one for the 1.6 daemon.
	BIN_PATH=/usr/sbin:/usr/bin:/sbin:/bin
fi
# ctr warns about cgroup v1 on every call; keep its other messages.
CTR() { PATH=$BIN_PATH ctr --address "$SOCK" --namespace k8s.io "$@" 2> >(grep -v 'support for cgroup v1 is deprecated' >&2); }

apt_install() {
	local missing=()
	for pkg in "$@"; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
	done
	((${#missing[@]})) || return 0
	log "apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null ||
		{ apt-get update >/dev/null && apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
}

build_v2() {
	if [[ -x $V2_BIN/containerd && -x $V2_BIN/containerd-shim-runc-v2 && -x $V2_BIN/ctr ]] &&
		"$V2_BIN/containerd" --version | grep -qF " $V2_VERSION "; then
		return 0
	fi
	log "building containerd $V2_VERSION (a few minutes when cold)"
	local tmp=$V2_BIN.tmp.$$ start=$SECONDS
	rm -rf "$tmp" && mkdir -p "$tmp"
	# Stamp the release version as containerd's own builds do: NRI plugins
	# infer the runtime's NRI features from it.
	GOBIN=$tmp GOFLAGS=-buildvcs=false go install -tags no_btrfs,no_devmapper,no_zfs \
		-ldflags "-X github.com/containerd/containerd/v2/version.Version=$V2_VERSION -X github.com/containerd/containerd/v2/version.Revision=go-install" \
		"github.com/containerd/containerd/v2/cmd/containerd@$V2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$V2_VERSION" \
		"github.com/containerd/containerd/v2/cmd/ctr@$V2_VERSION"
	rm -rf "$V2_BIN" && mv "$tmp" "$V2_BIN"
	log "built containerd $V2_VERSION in $((SECONDS - start))s"
}

build_images() {
	# Reproducible archives: rebuilding is cheap with a warm Go cache and a
	# re-import of unchanged digests is a no-op. A test's private instance
	# reuses the archives the lane's setup built.
	if [[ $inst != "$default_inst" && -f $IMAGES/pause.tar && -f $IMAGES/sidecar.tar && -f $IMAGES/app.tar ]]; then
		return 0
	fi
	(cd "$REPO" && go run ./internal/testimages/build -out "$IMAGES" >/dev/null)
}

render_config() {
	if [[ $lane == v2 ]]; then
		cat <<EOF
version = 3
root = '$ROOT'
state = '$RUN/state'

[grpc]
  address = '$SOCK'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '$PAUSE_IMAGE'

[plugins.'io.containerd.cri.v1.runtime']
  # Root here lacks CAP_SYS_RESOURCE: never ask for a score below our own.
  restrict_oom_score_adj = true
  # Stock Debian kernels enable AppArmor, but apparmor_parser may be missing.
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['$CNI_BIN']
    conf_dir = '$RUN/cni/conf'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'

[plugins.'io.containerd.nri.v1.nri']
  disable = false
  disable_connections = false
  socket_path = '$NRI_SOCK'
  plugin_path = '$RUN/nri/plugins'
  plugin_config_path = '$RUN/nri/conf.d'
  plugin_registration_timeout = '5s'
  plugin_request_timeout = '2s'
EOF
	else
		cat <<EOF
version = 2
root = '$ROOT'
state = '$RUN/state'

[grpc]
  address = '$SOCK'

[plugins.'io.containerd.grpc.v1.cri']
  sandbox_image = '$PAUSE_IMAGE'
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = '127.0.0.1'
  stream_server_port = '0'
  [plugins.'io.containerd.grpc.v1.cri'.containerd]
    snapshotter = 'overlayfs'
  [plugins.'io.containerd.grpc.v1.cri'.cni]
    bin_dir = '$CNI_BIN'
    conf_dir = '$RUN/cni/conf'

[plugins.'io.containerd.internal.v1.opt']
  path = '$ROOT/opt'
EOF
	fi
}

# Pods that do not use the host network get their own network namespace on
# one bridge shared by every instance (host-local IPAM locks its shared data
# dir, so concurrent daemons never hand out the same address). No masquerade,
# no port maps: nothing touches iptables. The host reaches pods through the
# bridge's gateway address.
render_cni() {
	cat <<EOF
{
  "cniVersion": "0.4.0",
  "name": "meshagent-ci",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$CNI_BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$CNI_SUBNET"}]],
        "dataDir": "/run/meshagent-ci/cni-ipam"
      }
    }
  ]
}
EOF
}

write_config() {
	mkdir -p "$RUN/state" "$ROOT" "$RUN/cni/conf" "$RUN/nri/plugins" "$RUN/nri/conf.d"
	render_cni >"$RUN/cni/conf/10-meshagent-ci.conflist"
	render_config >"$CONF.tmp"
	mv "$CONF.tmp" "$CONF"
}

# answering: the daemon is ours, alive, and serves its socket. (A stale socket
# file would make ctr wait for its full connect timeout.)
answering() { daemon_pid >/dev/null && CTR --connect-timeout 2s version >/dev/null 2>&1; }

# daemon_pid prints the pid of this instance's daemon if it is running: the pid
# file must name a live containerd started with this instance's config.
daemon_pid() {
	[[ -f $PIDFILE ]] || return 1
	local pid
	pid=$(<"$PIDFILE")
	[[ -r /proc/$pid/cmdline ]] || return 1
	tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "--config $CONF" || return 1
	echo "$pid"
}

start_daemon() {
	local pid
	if pid=$(daemon_pid); then
		if [[ $(readlink "/proc/$pid/exe") == *" (deleted)" ]]; then
			log "$inst: containerd binary was rebuilt; restarting"
			stop_daemon
		elif ! render_config | cmp -s - "$CONF"; then
			log "$inst: configuration changed; restarting"
			stop_daemon
		fi
	fi
	if answering; then
		log "$inst already answering on $SOCK"
		return 0
	fi
	if pid=$(daemon_pid); then
		die "$inst: containerd pid $pid is running but not answering on $SOCK; see $LOG"
	fi
	write_config
	log "starting $inst ($lane) on $SOCK, log $LOG"
	local start
	start=$(date +%s%N)
	# setsid + redirected stdio: the daemon must not hold CI's pipes open.
	PATH=$BIN_PATH setsid containerd --config "$CONF" </dev/null >>"$LOG" 2>&1 &
	echo $! >"$PIDFILE"
	for _ in $(seq 1 300); do
		if answering; then
			log "$inst answering after $((($(date +%s%N) - start) / 1000000))ms"
			return 0
		fi
		daemon_pid >/dev/null || { tail -n 30 "$LOG" >&2; die "$inst: containerd exited during start"; }
		sleep 0.1
	done
	tail -n 30 "$LOG" >&2
	die "$inst: containerd did not answer on $SOCK within 30s"
}

stop_daemon() {
	local pid
	pid=$(daemon_pid) || { rm -f "$PIDFILE"; return 0; }
	kill -TERM "$pid"
	for _ in $(seq 1 100); do
		[[ -e /proc/$pid ]] || break
		sleep 0.1
	done
	if [[ -e /proc/$pid ]]; then
		log "$inst: containerd pid $pid ignored SIGTERM for 10s; killing"
		kill -KILL "$pid" || true
		while [[ -e /proc/$pid ]]; do sleep 0.1; done
	fi
	rm -f "$PIDFILE"
}

import_images() {
	for tar in "$IMAGES"/*.tar; do
		CTR images import "$tar" >/dev/null
	done
	log "$inst: imported $(ls "$IMAGES"/*.tar | wc -l) images into k8s.io"
}

destroy() {
	# The daemon must be up to reap its tasks; bring it back if it is down
	# (a test may have stopped it), else its containers would run on.
	if [[ -f $CONF ]] && ! answering; then
		start_daemon || log "$inst: cannot start containerd to clean up; killing what is left"
	fi
	if answering; then
		local ids
		ids=$(CTR tasks ls -q 2>/dev/null || true)
		for id in $ids; do CTR tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
		for id in $ids; do
			for _ in $(seq 1 50); do
				CTR tasks delete "$id" >/dev/null 2>&1 && break
				sleep 0.1
			done
		done
		for id in $(CTR containers ls -q 2>/dev/null || true); do
			CTR containers delete "$id" >/dev/null 2>&1 || true
		done
	fi
	stop_daemon
	# Anything still mounted under the instance (sandbox shm, rootfs) goes now.
	awk -v r="$ROOT" -v s="$RUN" '$2 ~ "^(" r "|" s ")/" {print $2}' /proc/self/mounts | sort -r |
		while read -r m; do umount -l "$m" || true; done
	rm -rf "$ROOT" "$RUN"
}

case $action in
start)
	apt_install runc containernetworking-plugins
	if [[ $lane == v2 ]]; then build_v2; else apt_install containerd; fi
	build_images
	start_daemon
	import_images
	;;
stop) stop_daemon ;;
restart)
	stop_daemon
	start_daemon
	;;
destroy) destroy ;;
*) die "unknown action '$action' (want start, stop, restart or destroy)" ;;
esac
