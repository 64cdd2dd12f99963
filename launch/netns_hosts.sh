#!/usr/bin/env bash
# Two real "hosts" on this machine for multi-node runs over ssh: Linux network namespaces joined by a veth pair, each
# with its own address and its own sshd (a throw-away key pair in DIR; host-key checks off for these two addresses
# only, through DIR/ssh_config).  Needs root (CAP_NET_ADMIN), openssh-server and pdsh.
#
#   launch/netns_hosts.sh up DIR      # prints the env to launch with; DIR/hostfile names the two hosts
#   ip netns exec "$(cat DIR/netns_a)" env HOSTFILE=DIR/hostfile SSH_CONFIG=DIR/ssh_config \
#       GLOO_SOCKET_IFNAME=npt0 MASTER_ADDR="$(cat DIR/addr_a)" launch/train_multinode.sh configs/tiny_debug.yaml
#   launch/netns_hosts.sh down DIR    # kills everything in both namespaces, removes them and what `up` wrote
#
# DIR must be new or empty: `up` refuses a non-empty DIR it did not make, and both `up` (on a failure half-way) and
# `down` remove only what `up` created, listed in DIR/.netns-created (a DIR that existed before stays).
#
# Each host also has a node-local disk: the path printed as NODE_LOCAL is DIR/local_a on host a and
# DIR/local_b on host b (a bind mount in each sshd's own mount namespace), for checkpoint.node_local runs.
#
# Env: NETNS_SUBNET (default 10.231.7: hosts .1 and .2).  The namespace names carry this script's pid, so a
# stale pair from a killed run never collides with a new one; `down` reads them from DIR.
set -euo pipefail
cmd="${1:-}"; dir="${2:-}"
if [[ -z "$cmd" || -z "$dir" ]]; then echo "usage: $0 up|down DIR" >&2; exit 2; fi
dir="$(realpath -m "$dir")"
manifest="$dir/.netns-created"

created() {  # record paths this run made (absolute), so `down` removes exactly those
  local p
  for p in "$@"; do echo "$p" >> "$manifest"; done
}

down() {
  if [[ ! -f "$manifest" ]]; then
    echo "error: $dir was not made by '$0 up' (no $(basename "$manifest")); nothing removed" >&2
    return 2
  fi
  for f in "$dir"/netns_a "$dir"/netns_b; do
    [[ -f "$f" ]] || continue
    ns="$(cat "$f")"
    pids="$(ip netns pids "$ns" 2>/dev/null || true)"
    [[ -n "$pids" ]] && kill -9 $pids 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  # newest first: files before the dirs that hold them; a dir is removed only when empty
  tac "$manifest" | while IFS= read -r path; do
    if [[ -d "$path" && ! -L "$path" ]]; then rmdir "$path" 2>/dev/null || true; else rm -f "$path"; fi
  done
  rm -f "$manifest"
  if [[ -f "$dir/.netns-made-dir" ]]; then rm -f "$dir/.netns-made-dir"; rmdir "$dir" 2>/dev/null || true; fi
  return 0
}

if [[ "$cmd" == "down" ]]; then down; exit $?; fi
if [[ "$cmd" != "up" ]]; then echo "usage: $0 up|down DIR" >&2; exit 2; fi
if [[ -e "$dir" && ! -d "$dir" ]]; then echo "error: $dir is not a directory; give a new or empty DIR" >&2; exit 2; fi
if [[ -f "$manifest" ]]; then
  echo "error: $dir already holds a pair of hosts (or a stale one); run '$0 down $dir' first" >&2; exit 2
fi
if [[ -d "$dir" && -n "$(ls -A "$dir")" ]]; then
  echo "error: $dir is not empty and was not made by this script; give a new or empty DIR (nothing was changed)" >&2
  exit 2
fi
for tool in ip /usr/sbin/sshd ssh ssh-keygen pdsh; do
  command -v "$tool" >/dev/null || { echo "error: $tool is missing (apt-get install iproute2 openssh-server pdsh)" >&2; exit 2; }
done
subnet="${NETNS_SUBNET:-10.231.7}"
tag="n$$"
a="npt-${tag}-a"; b="npt-${tag}-b"
if [[ ! -d "$dir" ]]; then mkdir -p "$dir"; touch "$dir/.netns-made-dir"; fi
: > "$manifest"
trap 'echo "error: netns_hosts.sh up failed; removing what it made in $dir" >&2; down' ERR
[[ -d /run/sshd ]] || { mkdir -p /run/sshd; }
echo "$a" > "$dir/netns_a"; echo "$b" > "$dir/netns_b"
echo "$subnet.1" > "$dir/addr_a"; echo "$subnet.2" > "$dir/addr_b"
created "$dir/netns_a" "$dir/netns_b" "$dir/addr_a" "$dir/addr_b"
local_mnt="/tmp/npt-node-local-$tag"
mkdir "$local_mnt" "$dir/local_a" "$dir/local_b"
echo "$local_mnt" > "$dir/node_local"
created "$local_mnt" "$dir/local_a" "$dir/local_b" "$dir/node_local"
created "$dir/id_ed25519" "$dir/id_ed25519.pub" "$dir/host_ed25519" "$dir/host_ed25519.pub" "$dir/authorized_keys"
ssh-keygen -q -t ed25519 -N '' -f "$dir/id_ed25519"
ssh-keygen -q -t ed25519 -N '' -f "$dir/host_ed25519"
cp "$dir/id_ed25519.pub" "$dir/authorized_keys"
chmod 600 "$dir/authorized_keys"

ip netns add "$a"; ip netns add "$b"
ip link add "${tag}a" type veth peer name "${tag}b"
ip link set "${tag}a" netns "$a"; ip link set "${tag}b" netns "$b"
for side in a b; do
  ns="$a"; [[ $side == b ]] && ns="$b"
  addr="$subnet.1"; [[ $side == b ]] && addr="$subnet.2"
  ip -n "$ns" link set "${tag}${side}" name npt0
  ip -n "$ns" addr add "$addr/24" dev npt0
  ip -n "$ns" link set npt0 up
  ip -n "$ns" link set lo up
  created "$dir/sshd_$side.conf" "$dir/sshd_$side.pid"
  cat > "$dir/sshd_$side.conf" <<EOF
ListenAddress $addr
Port 22
HostKey $dir/host_ed25519
PidFile $dir/sshd_$side.pid
AuthorizedKeysFile $dir/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel ERROR
EOF
  ip netns exec "$ns" unshare --mount --propagation private \
      sh -c "mount --bind '$dir/local_$side' '$local_mnt' && exec /usr/sbin/sshd -f '$dir/sshd_$side.conf'"
done
created "$dir/ssh_config" "$dir/hostfile"
cat > "$dir/ssh_config" <<EOF
Host $subnet.1 $subnet.2
  User $(id -un)
  IdentityFile $dir/id_ed25519
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
EOF
printf '%s slots=1\n%s slots=1\n' "$subnet.1" "$subnet.2" > "$dir/hostfile"
for i in $(seq 50); do  # both sshd answer (from host a, over the veth link for b)
  if ip netns exec "$a" ssh -F "$dir/ssh_config" -o BatchMode=yes "$subnet.2" true 2>/dev/null &&
     ip netns exec "$a" ssh -F "$dir/ssh_config" -o BatchMode=yes "$subnet.1" true 2>/dev/null; then
    trap - ERR
    echo "NETNS_A=$a NETNS_B=$b HOSTFILE=$dir/hostfile SSH_CONFIG=$dir/ssh_config GLOO_SOCKET_IFNAME=npt0 MASTER_ADDR=$subnet.1 NODE_LOCAL=$local_mnt"
    exit 0
  fi
  sleep 0.2
done
trap - ERR
echo "error: the namespace sshd did not answer; see $dir" >&2
down
exit 1
