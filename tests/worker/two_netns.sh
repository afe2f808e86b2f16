#!/bin/sh
# Run a game side and a worker side in two network namespaces joined by a veth pair:
# game 10.77.0.1 (this namespace), worker 10.77.0.2 (namespace "gpu"). Run it under
#   unshare -rmn --propagation private sh tests/worker/two_netns.sh GAME_CMD WORKERS_CMD WORKERS_LOG
# (tests/test_remote.py does). The workers command runs in the background; the exit code is
# the game command's.
set -e
mkdir -p /run/netns
mount -t tmpfs tmpfs /run/netns
ip netns add gpu
ip link add veth-game type veth peer name veth-gpu
ip link set veth-gpu netns gpu
ip addr add 10.77.0.1/24 dev veth-game
ip link set veth-game up
ip link set lo up
ip netns exec gpu ip addr add 10.77.0.2/24 dev veth-gpu
ip netns exec gpu ip link set veth-gpu up
ip netns exec gpu ip link set lo up
ip netns exec gpu sh -c "$2" > "$3" 2>&1 &
worker=$!
set +e
sh -c "$1"
rc=$?
wait $worker
exit $rc
